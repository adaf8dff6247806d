"""runners/gpu_check.py (`make gpu-check`): one line and exit 0 without a GPU, from a bare copy
of the tree too; on CPU, with the tiny model, every step runs and lands in the markdown file; a
step's failure, a timeout and the budget are each recorded and the check goes on."""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "runners" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.md")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip()]
    assert "no CUDA GPU" in proc.stdout and not (tmp_path / "x.md").exists()


def _uninstalled_site(tmp_path: Path) -> Path:
    """The interpreter's site-packages without this project (its dist-info and the editable
    install's .pth): one folder of links, put on PYTHONPATH under `python -S`, where no .pth
    file is read."""
    folder = tmp_path / "site"
    folder.mkdir()
    for packages in site.getsitepackages():
        for entry in Path(packages).iterdir():
            name = entry.name.lower()
            if "llm_perf_opt" in name or "llm-perf-opt" in name or entry.suffix == ".pth":
                continue
            if not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make")
def test_make_gpu_check_runs_from_a_bare_copy_of_the_tree(tmp_path):
    """The first GPU session gets the working tree and nothing installed: `make gpu-check` there
    imports the copy's code and resolves its models without package metadata."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    copy = tmp_path / "tree"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(_uninstalled_site(tmp_path)),
    }
    # Without the path set-up the project would not import at all here:
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import llm_perf_opt"], env=env, cwd=copy, capture_output=True
    )
    assert probe.returncode != 0
    proc = subprocess.run(
        ["make", "-s", "gpu-check", f"PYTHON={sys.executable} -S"],
        env=env,
        cwd=copy,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip()] and "no CUDA GPU" in proc.stdout


def test_an_unknown_model_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "nope", "--out", str(tmp_path / "x.md")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_a_step_that_raises_is_recorded_with_its_traceback_and_the_check_goes_on(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path / "c.md", budget_s=60)

    def broken():
        return [f"{int(float('nan'))}"]

    check.step("graph", broken)
    check.step("after", lambda: ["still ran"])
    text = (tmp_path / "c.md").read_text()
    assert check.failed == ["graph"] and "still ran" in text
    assert "**failed**: ValueError: cannot convert float NaN to integer" in text
    assert "in broken" in text  # the traceback's tail names where it happened
    assert check.verdict() == "failed: graph"


def test_a_step_the_budget_has_no_room_for_is_not_run_not_failed(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path / "c.md", budget_s=5)
    check.step("heavy", lambda: pytest.fail("must not run"), needs_s=60)
    assert check.failed == [] and check.skipped == ["heavy"]
    assert "**not run (budget)**" in (tmp_path / "c.md").read_text()
    assert check.verdict() == "not run (budget): heavy"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_timeout_ends_the_whole_process_group(gpu_check, tmp_path):
    """A shell that starts a child and waits on it, as nsys does with its Python: on a timeout
    both end, not only the shell."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    start = time.monotonic()
    with pytest.raises(gpu_check.StepFailed, match="ran past 1 s"):
        gpu_check.run(["bash", "-c", script], 1)
    assert time.monotonic() - start < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_job_cut_short_by_the_budget_is_not_run_not_failed(gpu_check):
    with pytest.raises(gpu_check.OutOfBudget, match="cut short by the budget"):
        gpu_check.run(["sleep", "30"], 1, budget_bound=True)


def test_the_budget_not_the_cap_limits_a_late_job(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path / "c.md", budget_s=100)
    timeout, bound = check.job_timeout(150)
    assert bound and timeout <= 100
    timeout, bound = check.job_timeout(50)
    assert not bound and timeout == 50


def test_a_machine_without_git_still_names_the_code(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_check.code_version() == "unknown commit (no git here)"


def test_replayed_decode_is_compared_with_eager_launches_per_step(gpu_check):
    eager = {"launches": 700, "calls": 7}
    ok, lines = gpu_check.compare_launches({"launches": 693, "calls": 7}, eager)
    assert ok and "99.0 replayed" in lines[0] and "100.0 launched" in lines[0]
    # Replays credited only their graph launch (one kernel row per step) fail, busy time or not.
    ok, lines = gpu_check.compare_launches({"launches": 7, "calls": 7}, eager)
    assert not ok and "ratio 0.010" in lines[-1]
    ok, _ = gpu_check.compare_launches({"launches": float("nan"), "calls": 7}, eager)
    assert not ok


def test_every_step_runs_on_cpu_with_the_tiny_model(tmp_path):
    out = tmp_path / "check" / "gpu-check.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--model",
            "deepseek_ocr_tiny",
            "--modes",
            "gundam",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    for section in (
        "calibrate",
        "harness runs",
        "CUDA-graph decode",
        "parity",
        "other configurations",
        "Nsight Systems",
        "compare",
        "not checked here",
    ):
        assert f"## {section}" in text
    assert "| gundam | reference |" in text and "| gundam | fast |" in text
    for configuration in ("DeepSeek-OCR-2", "batch of 2", "profiling.warmup=0"):
        assert f"| {configuration} |" in text
    assert "- TTFT without warm-up / with:" in text
    # What a CPU cannot reach is listed, not passed over.
    for item in ("a second GPU (cuda:1): not on CUDA", "model.attn_impl=flash_attn:", "graph attribution:"):
        assert item in text
    # The fp32 row of the parity table: the GPU's formulations decode the reference's tokens.
    fp32 = next(line for line in text.splitlines() if line.startswith("| float32 |"))
    assert fp32.rstrip(" |").endswith("True")
    assert text.rstrip().endswith("all steps passed")
