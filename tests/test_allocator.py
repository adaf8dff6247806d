"""cpu.allocator: the environment each allocator needs, how a command line asks for one, and the
re-execution at start (only from the command line, once). The faults of a run under `system`
against `tuned` are counted in subprocesses: the allocator is fixed when a process starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from llm_perf_opt import allocator
from llm_perf_opt.allocator import LIB_PATH, MARKER, TUNED, UserError

TUNABLES = ":".join(TUNED)
SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD", MARKER, LIB_PATH)


@pytest.fixture
def libs(tmp_path) -> Path:
    """A folder holding (stand-ins for) both libraries."""
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    return tmp_path


def test_tuned_adds_glibcs_tunables_and_keeps_the_users_others():
    env = allocator.environment("tuned", {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "HOME": "/h"})
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F:" + TUNABLES and env["HOME"] == "/h"
    assert allocator.in_force(env) == "tuned"
    # Set already (by us, or an mmap threshold of the user's own): nothing to do.
    assert allocator.environment("tuned", {"GLIBC_TUNABLES": TUNABLES}) is None
    assert allocator.environment("tuned", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) is None


def test_jemalloc_and_tcmalloc_are_preloaded_from_the_library_folder(libs):
    env = allocator.environment("jemalloc", {LIB_PATH: str(libs), "LD_PRELOAD": "/opt/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{libs / 'libjemalloc.so.2'} /opt/libfoo.so"
    assert allocator.in_force(env) == "jemalloc"
    # From jemalloc to tcmalloc: one allocator library at a time, the user's own preload kept.
    env = allocator.environment("tcmalloc", env)
    assert env["LD_PRELOAD"] == f"{libs / 'libtcmalloc_minimal.so.4'} /opt/libfoo.so"
    assert allocator.in_force(env) == "tcmalloc"


def test_system_removes_the_other_allocators_settings(libs):
    env = allocator.environment(
        "system", {"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off:" + TUNABLES, "LD_PRELOAD": "libjemalloc.so.2"}
    )
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.x86_shstk=off" and "LD_PRELOAD" not in env
    assert allocator.in_force(env) == "system"
    assert allocator.environment("system", {}) is None


def test_a_missing_library_names_its_package(tmp_path):
    with pytest.raises(UserError, match=r"libjemalloc\.so\.2.*install the package libjemalloc2"):
        allocator.environment("jemalloc", {LIB_PATH: str(tmp_path / "none")})
    with pytest.raises(UserError, match=r"libtcmalloc-minimal4"):
        allocator.environment("tcmalloc", {LIB_PATH: str(tmp_path / "none")})


def test_the_command_line_asks_for_one_allocator():
    assert allocator.requested(["mode=base", "cpu.allocator=system"]) == "system"
    assert allocator.requested(["++cpu.allocator=jemalloc"]) == "jemalloc"
    assert allocator.requested(["mode=base"]) is None  # the default, or the config's
    assert allocator.requested(["-m", "mode=tiny,base", "cpu.allocator=tcmalloc"]) == "tcmalloc"
    assert allocator.requested(["--help", "cpu.allocator=system"]) is None  # Hydra answers, nothing runs
    assert allocator.requested(["cpu.allocator=system,tuned"]) is None  # Hydra refuses it without -m
    with pytest.raises(UserError, match="one command per allocator"):
        allocator.requested(["-m", "cpu.allocator=tuned,system"])
    with pytest.raises(UserError, match=r"cpu\.allocator='glibc' is not one of tuned, system, jemalloc"):
        allocator.requested(["cpu.allocator=glibc"])


@pytest.fixture
def clean_start(monkeypatch):
    """No allocator settings in the environment, no start recorded, and os.execve recording its call."""
    for key in SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(allocator, "_started", None)
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    return calls


def test_start_re_executes_the_same_command_line_with_the_allocator(monkeypatch, clean_start):
    line = [sys.executable, "-m", "llm_perf_opt.run", "mode=base"]
    monkeypatch.setattr(sys, "orig_argv", line)
    allocator.start(["mode=base"], ["mode=base"])
    ((path, argv, env),) = clean_start
    assert path == sys.executable and argv == line
    assert env["GLIBC_TUNABLES"] == TUNABLES and env[MARKER] == "tuned"
    # The re-executed process: marked, the allocator in force; it goes on, and says how.
    monkeypatch.setenv("GLIBC_TUNABLES", TUNABLES)
    monkeypatch.setenv(MARKER, "tuned")
    allocator.start(["mode=base"], ["mode=base"])
    assert len(clean_start) == 1 and MARKER not in os.environ  # the job's own children start afresh
    assert allocator.started().allocator == "tuned"
    assert allocator.started().how == f"re-executed at start with GLIBC_TUNABLES={TUNABLES}"


def test_start_never_re_executes_twice(monkeypatch, clean_start):
    # A re-executed process whose environment still lacks the setting (a loader that ignored it).
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "llm_perf_opt.run"])
    monkeypatch.setenv(MARKER, "tuned")
    allocator.start([], [])
    assert clean_start == [] and allocator.started().allocator == "tuned"


def test_help_and_a_malformed_command_line_run_no_job_and_re_execute_nothing(monkeypatch, clean_start):
    for argv in (["--help"], ["--cfg", "job"], ["mode=(base"]):
        monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "llm_perf_opt.run", *argv])
        allocator.start(argv, argv)
    assert clean_start == [] and allocator.started() is None


def test_a_main_called_in_process_does_not_re_execute_the_process(monkeypatch, clean_start):
    # As under pytest: the process's command line is not the one the entry point was given.
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pytest", "tests"])
    allocator.start(["cpu.allocator=system"], ["run", "cpu.allocator=system"])
    assert clean_start == [] and allocator.started() is None


# -- from the command line -----------------------------------------------------------------------
def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "HYDRA_FULL_ERROR"}
    env.setdefault("OMP_NUM_THREADS", "1")  # behaviour, not speed; the cores are shared
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _run(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_perf_opt.run", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_bad_allocator_is_one_error_line(tmp_path):
    proc = _run(tmp_path, "cpu.allocator=glibc")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: config: cpu.allocator='glibc' is not one of tuned, system, jemalloc, tcmalloc"
    ]
    assert not (tmp_path / "run").exists()


def test_jemalloc_without_its_library_is_one_error_line_naming_the_package(tmp_path):
    proc = _run(tmp_path, "cpu.allocator=jemalloc", env=_env(**{LIB_PATH: str(tmp_path / "no-libs")}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: cpu.allocator=jemalloc needs libjemalloc.so.2") and "libjemalloc2" in line


def _sam(tmp_path: Path, name: str) -> tuple[pd.Series, dict]:
    folder = tmp_path / name
    folder.mkdir()
    tiny = ["model=deepseek_ocr_tiny", "mode=base", "device=cpu", "dtype=float32", "profiling=quick"]
    proc = _run(folder, *tiny, "profiling.trace=false", "max_new_tokens=2", f"cpu.allocator={name}")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((folder / "run" / "run.json").read_text())
    return pd.read_csv(folder / "run" / "stages.csv").set_index("stage").loc["sam"], record["cpu"]


def test_the_system_allocator_faults_more_in_sam_than_the_tuned_one(tmp_path):
    # SAM's global attention over the 64 x 64 patches of the 1024 view makes a relative-position
    # bias and scores of 2 heads x 4096 x 4096 fp32 (134 MB) on every run. glibc's system malloc
    # maps each block above 32 MiB (its largest mmap threshold) afresh and the kernel faults in
    # every 4 KiB page of it (32,768 per block); tuned keeps them in the heap, whose pages the
    # warm-up run faulted in already.
    system, system_cpu = _sam(tmp_path, "system")
    tuned, tuned_cpu = _sam(tmp_path, "tuned")
    assert (system_cpu["in_force"], tuned_cpu["in_force"]) == ("system", "tuned")
    assert tuned_cpu["applied"] == f"re-executed at start with GLIBC_TUNABLES={TUNABLES}"
    assert system_cpu["applied"].startswith("already in force")
    assert system["minor_faults"] >= 32_768  # one such block at least
    assert tuned["minor_faults"] * 10 < system["minor_faults"]
