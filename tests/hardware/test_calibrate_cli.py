"""python -m llm_perf_opt.calibrate: the printout, the cache wiring and one-line argument errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llm_perf_opt.atomic import write_json
from llm_perf_opt.calibrate import comparison_table, main
from llm_perf_opt.hardware.calibration import cache_path
from llm_perf_opt.hardware.ceilings import datasheet_roof


def _exit_code_and_stderr(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_error_line(capsys):
    code, err = _exit_code_and_stderr(["--device", "cuda"], capsys)
    assert code == 2
    assert err == "error: device=cuda requested but no CUDA GPU is available here\n"


@pytest.mark.parametrize("argv", [["--bogus"], ["--device", "tpu"], ["--device"]])
def test_bad_arguments_are_one_error_line(argv, capsys):
    code, err = _exit_code_and_stderr(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cached_figures_are_printed_with_the_cache_path(tmp_path, fake_calibration, capsys):
    cached = fake_calibration()
    write_json(cache_path("cpu", tmp_path), dataclasses.asdict(cached))
    main(["--device", "cpu", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"cache:      {cache_path('cpu', tmp_path)}" in out
    assert "none (CPUs have no datasheet table" in out
    float32_row = next(line for line in out.splitlines() if "matmul float32" in line)
    assert "123.4" in float32_row  # 123.4e9 FLOP/s in GFLOP/s
    float16_row = next(line for line in out.splitlines() if "matmul float16" in line)
    assert "emulated" in float16_row


def test_quick_run_prints_every_ceiling_and_skips_the_cache(capsys):
    main(["--device", "cpu", "--quick"])
    out = capsys.readouterr().out
    for row in ("matmul bfloat16", "matmul float16", "matmul float32", "memory bandwidth"):
        assert row in out
    assert "cache:      not used (--quick)" in out


def test_comparison_with_a_datasheet(fake_calibration):
    calibration = fake_calibration(
        device_type="cuda",
        flop_s={"bfloat16": 96.8e12, "float32": 24.24e12},
        emulated={"bfloat16": False, "float32": False},
        matmul_sizes={"bfloat16": 8192, "float32": 8192},
        byte_s=240e9,
        launch_overhead_s=4.5e-6,
    )
    table = comparison_table(calibration, datasheet_roof("l4")).set_index("ceiling")
    # L4: 121 TFLOP/s bf16, 30.3 fp32, 300 GB/s; 96.8 / 121 = 0.8, 24.24 / 30.3 = 0.8, 240 / 300 = 0.8
    assert table.loc["matmul bfloat16", "calibrated"] == pytest.approx(96.8)
    assert table.loc["matmul bfloat16", "datasheet"] == pytest.approx(121)
    assert table.loc["matmul bfloat16", "unit"] == "TFLOP/s"
    for row in ("matmul bfloat16", "matmul float32", "memory bandwidth"):
        assert table.loc[row, "% of datasheet"] == pytest.approx(80.0)
    assert table.loc["kernel launch", "calibrated"] == pytest.approx(4.5)  # 4.5e-6 s in us
    assert math.isnan(table.loc["kernel launch", "datasheet"])


def test_cpu_table_has_no_datasheet_columns(fake_calibration):
    table = comparison_table(fake_calibration(), None)
    assert list(table.columns) == ["ceiling", "unit", "calibrated", "note"]
    assert table.set_index("ceiling").loc["memory bandwidth", "calibrated"] == pytest.approx(30.0)  # 30e9 B/s
