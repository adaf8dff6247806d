"""report.projection: the compute and bandwidth floors of a recorded run's stages on other devices,
on the committed CPU baselines (tiny model; the Zen 4 one in bfloat16, the Zen 3 one in float32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_perf_opt.hardware.ceilings import datasheet_roof
from llm_perf_opt.report.projection import FLOOR_COLUMNS, stage_floors
from llm_perf_opt.report.record import read_record

BASELINES = sorted((Path(__file__).parents[2] / "benchmarks" / "baselines").rglob("run.json"))
BASE = next(
    p
    for p in BASELINES
    if p.parent.name.endswith("_base") and "cpu-amd-epyc-f25-m17-2c-avx512-bf16" in p.parts
)


def test_floors_on_a_datasheet_are_the_work_at_its_ceilings():
    floors = stage_floors(read_record(BASE), {"h100_sxm": datasheet_roof("h100_sxm")})
    assert list(floors.columns) == list(FLOOR_COLUMNS)
    assert list(floors["stage"]) == ["sam", "clip", "projector", "prefill", "decode"]
    sam = floors.set_index("stage").loc["sam"]
    # The base run's sam: 12,031,339,456 useful FLOPs and 723,592,960 bytes; H100 SXM: 989.4
    # TFLOP/s bf16 and 3,350 GB/s.
    assert sam["compute_ms"] == pytest.approx(12_031_339_456 / 989.4e12 * 1e3)  # 0.0122 ms
    assert sam["bandwidth_ms"] == pytest.approx(723_592_960 / 3350e9 * 1e3)  # 0.216 ms
    assert (sam["floor_ms"], sam["bound"]) == (sam["bandwidth_ms"], "memory")


def test_floors_on_the_runs_own_ceilings_are_below_its_measured_times():
    # The calibrated roof is what this CPU reached: no stage can have run faster than its floor there.
    for path in BASELINES:
        record = read_record(path)
        floors = stage_floors(record, {"here": record.hardware.roofs[0]}).set_index("stage")
        for stage, floor in floors["floor_ms"].items():
            assert floor < record.timing.stages[stage].median, (path.parent.name, stage)
    # sam of the base run is compute-bound there: 12,031,339,456 FLOPs at 127.4 GFLOP/s bf16 take
    # longer than 723,592,960 bytes at 13.26 GB/s.
    base = read_record(BASE)
    sam = stage_floors(base, {"here": base.hardware.roofs[0]}).iloc[0]
    assert sam["stage"] == "sam" and sam["bound"] == "compute"
    assert sam["floor_ms"] == pytest.approx(12_031_339_456 / 127_414_648_789.82535 * 1e3)  # 94.4 ms
