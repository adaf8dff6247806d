"""The host memory allocator of a run (`cpu.allocator`), chosen when the process starts.

* ``tuned`` (the default): glibc's malloc keeping large allocations in the heap and never trimming
  it (:data:`TUNED`), through ``GLIBC_TUNABLES``. By default glibc maps every allocation above
  its mmap threshold (128 KiB, rising to at most 32 MiB) with its own mmap and unmaps it when
  freed, so each new large tensor costs the kernel a page fault and a zeroed page per 4 KiB it
  touches. CPU deployments of PyTorch run a tuned or a replaced allocator for this reason.
* ``jemalloc``, ``tcmalloc``: the system's library (Debian's ``libjemalloc2``,
  ``libtcmalloc-minimal4``) through ``LD_PRELOAD``; one line naming the package when it is not
  installed.
* ``system``: glibc as it comes (the settings above removed where the environment has them).

Both variables are read by the dynamic loader and by glibc when a process starts, so a process
is re-executed (``os.execve``, the same command line) with them set, before torch is imported.
Only the command-line entry points do this (`python -m llm_perf_opt.run`, `llm-perf-opt run`), and
only when the arguments they run are the process's own command line (``sys.orig_argv``): a job
run in-process (tests, a notebook, a launcher's worker) keeps the process's allocator and records
which one it is. The value is read from the command line's ``cpu.allocator=`` override, before
Hydra composes; Hydra validates the same value later, and a job whose composed value differs from
what the process started with (a preset setting it) is refused in one line. An environment marker
(:data:`MARKER`) stops a second re-execution. This module imports neither torch nor the package's
config, so that it runs before them.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_perf_opt.errors import UserError

ALLOCATORS = ("tuned", "system", "jemalloc", "tcmalloc")
DEFAULT = "tuned"
#: glibc's tunables of `tuned`: no allocation below 4 GiB gets its own mmap, and the heap is
#: trimmed only above 16 GiB free at its top, so freed tensors' pages are reused, not refaulted.
TUNED = ("glibc.malloc.mmap_threshold=4294967296", "glibc.malloc.trim_threshold=17179869184")
#: allocator -> (library file, Debian package that installs it)
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}
#: Folders searched for the libraries, ':'-separated (default: :func:`library_dirs`).
LIB_PATH = "LLM_PERF_OPT_ALLOCATOR_LIB_PATH"
#: Set in the environment of the re-executed process to the allocator it was started for.
MARKER = "LLM_PERF_OPT_ALLOCATOR"
_KEY = "cpu.allocator"


@dataclass(frozen=True)
class Started:
    """What the command-line entry point did for this process."""

    allocator: str
    how: str


_started: Started | None = None


def started() -> Started | None:
    """The allocator the command-line entry point set for this process; None for a job run
    in-process (no entry point ran)."""
    return _started


def check(allocator: str) -> None:
    if allocator not in ALLOCATORS:
        raise UserError(f"config: {_KEY}={allocator!r} is not one of {', '.join(ALLOCATORS)}")


def library_dirs(environ: Mapping[str, str]) -> list[Path]:
    if environ.get(LIB_PATH):
        return [Path(p) for p in environ[LIB_PATH].split(":") if p]
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    return [Path("/usr/lib") / multiarch, Path("/usr/lib64"), Path("/usr/lib")]


def library(allocator: str, environ: Mapping[str, str]) -> Path:
    """The shared library of ``jemalloc`` or ``tcmalloc``; UserError naming its package if absent."""
    name, package = LIBRARIES[allocator]
    dirs = library_dirs(environ)
    for folder in dirs:
        if (folder / name).is_file():
            return folder / name
    raise UserError(
        f"{_KEY}={allocator} needs {name}, found in none of {', '.join(map(str, dirs))}: install the "
        f"package {package} (apt-get install {package}), or run with {_KEY}=tuned"
    )


def in_force(environ: Mapping[str, str]) -> str:
    """Which allocator the environment gives a process started with it."""
    for allocator in LIBRARIES:
        if any(Path(p).name.startswith(f"lib{allocator}") for p in _preloads(environ)):
            return allocator
    if any(t.startswith(TUNED[0].split("=")[0] + "=") for t in _tunables(environ)):
        return "tuned"
    return "system"


def environment(allocator: str, environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment a process needs for ``allocator``, or None when ``environ`` gives it
    already (an mmap threshold the user set counts as tuned: theirs is kept)."""
    check(allocator)
    if in_force(environ) == allocator:
        return None
    env = dict(environ)
    preloads = [p for p in _preloads(environ) if not _is_allocator_library(p)]
    tunables = [t for t in _tunables(environ) if t.split("=")[0] not in {x.split("=")[0] for x in TUNED}]
    if allocator == "tuned":
        tunables += TUNED
    elif allocator in LIBRARIES:
        preloads.insert(0, str(library(allocator, environ)))
    _set(env, "LD_PRELOAD", " ".join(preloads))
    _set(env, "GLIBC_TUNABLES", ":".join(tunables))
    return env


def _parsed(argv: Sequence[str]):
    """Hydra's reading of the command line: (its flags, its overrides), or None when no job runs
    (help, --cfg, shell completion) or Hydra will refuse it (a malformed override)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        args = get_args_parser().parse_args(list(argv))
        overrides = OverridesParser.create().parse_overrides(list(args.overrides))
    except (HydraException, SystemExit):
        return None
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg:
        return None
    return args, overrides


def requested(argv: Sequence[str]) -> str | None:
    """The ``cpu.allocator`` the command line asks for: None where it gives none, or where no
    job runs (:func:`_parsed`). A sweep of several values is refused."""
    parsed = _parsed(argv)
    if parsed is None:
        return None
    args, overrides = parsed
    values = None
    for override in overrides:
        if override.get_key_element().lstrip("+~") != _KEY:
            continue
        if override.is_delete():
            values = [DEFAULT]
        elif override.is_sweep_override():
            values = list(dict.fromkeys(override.sweep_string_iterator())) if args.multirun else None
        else:
            values = [str(override.value())]
    if values is None:
        return None
    if len(values) > 1:
        raise UserError(
            f"{_KEY} is set when the process starts, so one command runs one allocator, not "
            f"{','.join(values)}: run one command per allocator (benchmarks/allocator.py runs them all)"
        )
    check(values[0])
    return values[0]


def start(argv: Sequence[str], command_line: Sequence[str]) -> None:
    """At a command-line entry point, before torch is imported: re-execute the process with the
    allocator the command line asks for (``argv``: its overrides), unless the environment gives
    it already, this process is that re-execution, or ``command_line`` (the entry point's own
    words: its arguments) is not how this process was started (a main() called in-process)."""
    global _started
    words = list(command_line)
    if words and list(sys.orig_argv[-len(words) :]) != words:
        return
    if _parsed(argv) is None:  # Hydra answers or refuses it; no job runs
        return
    allocator = requested(argv) or DEFAULT
    env = environment(allocator, os.environ)
    marked = os.environ.pop(MARKER, None)  # read once: a child process of the job starts afresh
    if env is None or marked == allocator:
        how = "re-executed at start with " if marked == allocator else "already in force in the environment: "
        _started = Started(allocator, how + describe(os.environ))
        return
    env[MARKER] = allocator
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def start_or_exit(argv: Sequence[str], command_line: Sequence[str]) -> None:
    """:func:`start`, a mistake in one ``error:`` line and exit 2 (as the entry points do)."""
    try:
        start(argv, command_line)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def describe(environ: Mapping[str, str]) -> str:
    """The allocator settings of an environment, as run.json records them."""
    parts = [f"{key}={environ[key]}" for key in ("GLIBC_TUNABLES", "LD_PRELOAD") if environ.get(key)]
    return ", ".join(parts) or "no allocator settings (glibc's defaults)"


def _preloads(environ: Mapping[str, str]) -> list[str]:
    # ld.so takes LD_PRELOAD entries separated by spaces or colons.
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()


def _tunables(environ: Mapping[str, str]) -> list[str]:
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def _is_allocator_library(path: str) -> bool:
    return any(Path(path).name.startswith(f"lib{allocator}") for allocator in LIBRARIES)


def _set(env: dict[str, str], key: str, value: str) -> None:
    if value:
        env[key] = value
    else:
        env.pop(key, None)
