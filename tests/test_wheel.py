"""The package works installed from a wheel, without the source tree: configs ship inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _site_packages() -> list[str]:
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed. It sees the running interpreter's
    site-packages for torch and friends (no network here), but llm_perf_opt comes from the wheel
    alone."""
    tmp = tmp_path_factory.mktemp("wheel")
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp / "dist"),
        str(REPO),
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("llm_perf_opt-*.whl")
    _run(sys.executable, "-m", "venv", str(tmp / "venv"), cwd=tmp)
    python = tmp / "venv" / "bin" / "python"
    purelib = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp)
    # The running interpreter's site-packages, not the system's: pytest may itself run in a venv
    # whose base Python has none of the dependencies (--system-site-packages would give that base).
    # Lines of a .pth file go after the venv's own site-packages, so the wheel wins over the
    # editable install; .pth files inside those folders are not run, so its path hook stays off.
    (Path(purelib.stdout.strip()) / "_running_interpreter.pth").write_text("\n".join(_site_packages()) + "\n")
    _run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel), cwd=tmp)
    return python


def test_the_wheel_is_what_runs(venv_python, tmp_path):
    proc = _run(str(venv_python), "-c", "import llm_perf_opt; print(llm_perf_opt.__file__)", cwd=tmp_path)
    location = Path(proc.stdout.strip())
    assert REPO not in location.parents  # not the source tree (nor the editable install)
    assert (location.parent / "conf" / "config.yaml").is_file()
    assert (location.parent / "conf" / "mode" / "gundam.yaml").is_file()


def test_the_console_command_is_installed(venv_python, tmp_path):
    proc = _run(str(venv_python.parent / "llm-perf-opt"), "run", "--help", cwd=tmp_path)
    assert "profiling.repeats=3" in proc.stdout and "mode: base, gundam, large, small, tiny" in proc.stdout


def test_cfg_job_composes_from_the_installed_package(venv_python, tmp_path):
    proc = _run(str(venv_python), "-m", "llm_perf_opt.run", "--cfg", "job", "mode=gundam", cwd=tmp_path)
    assert "name: gundam" in proc.stdout and "name: deepseek_ocr" in proc.stdout


def test_a_tiny_run_from_the_installed_package(venv_python, tmp_path):
    out = tmp_path / "run"
    _run(
        str(venv_python),
        "-m",
        "llm_perf_opt.run",
        "model=deepseek_ocr_tiny",
        "mode=tiny",
        "device=cpu",
        "dtype=float32",
        "profiling=quick",
        "profiling.trace=false",
        "max_new_tokens=2",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["generated_tokens"] == 2
    assert record["schema_version"] == 1
    assert record["versions"]["git_commit"] == "unknown"  # an installed wheel is no checkout
