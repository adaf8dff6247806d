"""runners/gpu_check.py (`make gpu-check`): one line and exit 0 without a GPU; on CPU, with the
tiny model, every step runs and lands in the markdown file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "runners" / "gpu_check.py"


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
    for section in ("calibrate", "harness runs", "CUDA-graph decode", "parity", "Nsight Systems", "compare"):
        assert f"## {section}" in text
    assert "| gundam | reference |" in text and "| gundam | fast |" in text
    # The fp32 row of the parity table: the GPU's formulations decode the reference's tokens.
    fp32 = next(line for line in text.splitlines() if line.startswith("| float32 |"))
    assert fp32.rstrip(" |").endswith("True")
    assert text.rstrip().endswith("all steps passed")
