"""What the command-line tools do before Hydra runs anything: paths quoted for Hydra's
grammar, and every job's config composed and validated, so a mistake is one line before any
work (or output folder) is made."""

from __future__ import annotations

import importlib
import itertools
import os
import uuid
from collections.abc import Mapping, Sequence
from importlib.metadata import metadata
from pathlib import Path
from typing import Any

from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from llm_perf_opt.config import compose, validate
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.pages import batch_pages


def quote_paths(argv: Sequence[str]) -> list[str]:
    """`image=` values Hydra's override grammar cannot read (spaces, non-ASCII: `image=/data/página
    1.png`) are quoted for it, so paths work as typed; values it reads (quoted ones, sweeps) are kept."""
    parser = OverridesParser.create()
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "image":
            try:
                parser.parse_override(arg)
            except HydraException:
                escaped = value.replace("\\", "\\\\").replace("'", "\\'")
                arg = f"{key}='{escaped}'"
        out.append(arg)
    return out


def job_overrides(multirun: bool, overrides: Sequence[str]) -> list[list[str]]:
    """The overrides of every job: sweeps expanded by Hydra's own parser."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise UserError(f"cannot read the overrides: {' '.join(str(exc).split())}") from None
    choices = []
    for override, text in zip(parsed, overrides):
        if multirun and override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(job) for job in itertools.product(*choices)]


def preflight(multirun: bool, overrides: Sequence[str]) -> None:
    """Compose and validate every job's config, list each job's pages (`images=`), and check the
    output folder can be made."""
    jobs = job_overrides(multirun, overrides)
    for overrides in jobs:
        run = validate(compose([o for o in overrides if not o.startswith("hydra")]))
        batch_pages(run.images, run.image, run.batch_size)
    hydra_cfg = compose(jobs[0], return_hydra_config=True).hydra
    check_callbacks(hydra_cfg.callbacks or {})
    check_creatable(Path(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir))


def check_callbacks(callbacks: Mapping[str, Any]) -> None:
    """Every Hydra callback's module imports; one whose package is missing (an extra not
    installed: hydra/callbacks=mlflow without mlflow) is one line, not Hydra's traceback."""
    for name, callback in callbacks.items():
        module = str(callback["_target_"]).rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            extras = metadata("llm-perf-opt").get_all("Provides-Extra") or []
            hint = f': pip install "llm-perf-opt[{name}]"' if name in extras else ""
            package = (exc.name or module).partition(".")[0]
            raise UserError(
                f"hydra.callbacks.{name} needs the package {package}, which is not installed{hint}"
            ) from None


def check_creatable(folder: Path) -> None:
    """The output folder exists as a folder or can be created: no file in the way, and its
    nearest existing folder takes a new entry."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output folder {folder} cannot be created: {parent} is a file")
            _probe(folder, parent)
            return


def _probe(folder: Path, parent: Path) -> None:
    # Permission bits do not tell (root passes os.access on /proc, a read-only mount looks
    # writable): making a folder of a unique name there, and removing it, does. Nothing else
    # uses that name, so a concurrent run making the same output folder is not disturbed.
    probe = parent / f".llm-perf-opt-probe-{uuid.uuid4().hex}"
    try:
        probe.mkdir()
    except OSError as exc:
        raise UserError(
            f"output folder {folder} cannot be created in {parent}: {exc.strerror or exc}"
        ) from None
    os.rmdir(probe)


def checked_argv(argv: Sequence[str]) -> list[str]:
    """The command line for Hydra: image paths quoted, and every job's config composed and
    validated first (not for --help, --info and shell completion, which Hydra answers itself).
    A mistake raises UserError before anything runs."""
    argv = quote_paths(argv)
    args = get_args_parser().parse_args(argv)
    if not (args.help or args.hydra_help or args.info or args.shell_completion):
        preflight(args.multirun, args.overrides)
    return argv
