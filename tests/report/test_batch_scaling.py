"""report.batch_scaling: where a batch's decode step turns compute-bound, predicted from its
analytic step and the ridge, and where the measured TPOT stops being flat."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from PIL import Image

from llm_perf_opt.report.batch_scaling import (
    FLAT_LIMIT,
    BatchSweep,
    StepIntensity,
    batch_sweeps,
    crossing_text,
    step_intensity,
    throughput_plot,
)
from llm_perf_opt.report.record import RunRecord


def record(batch: int, flops: float, weight_bytes: float, other_bytes: float, tpot: float) -> RunRecord:
    """A run.json with what the batch analysis reads: a ridge of 5 FLOP/B (10 TFLOP/s, 2 TB/s)."""
    step = {
        "stage": "decode",
        "scope": "step",
        "useful_flops": flops,
        "weight_bytes": weight_bytes,
        "bytes": weight_bytes + other_bytes,
    }
    prefill = {"stage": "prefill", "scope": "step", "useful_flops": 1e12, "weight_bytes": 1.0, "bytes": 2.0}
    data = {
        "schema_version": 1,
        "status": "ok",
        "dtype": "bfloat16",
        "batch": {"size": batch},
        "stage_layout": {"per_step": ["decode"]},
        "analytic": {"stages": [step, prefill]},
        "hardware": {
            "roofs": [{"label": "datasheet", "flop_s": {"bfloat16": 10e12}, "byte_s": 2e12, "source": "x"}]
        },
        "headline": {
            "tpot_ms": tpot,
            "decode_tokens_per_s": batch * 1e3 / tpot,
            "tokens_per_s": 1.0,
            "pages_per_s": 0.1,
        },
    }
    return RunRecord.from_dict(data)


def test_the_crossing_is_where_the_intensity_meets_the_ridge():
    # Per sequence f = 100 FLOP and a = 10 B; W = 1000 B shared: 5·1000 / (100 − 5·10) = 100.
    step = step_intensity(record(2, 200.0, 1000.0, 20.0, 10.0))
    assert step.ridge == 5.0 and step.batch == 2
    assert step.intensity == pytest.approx(200 / 1020)
    assert step.crossing() == pytest.approx(100.0)
    assert step.at(100.0) == pytest.approx(5.0)
    assert "predicted compute-bound from batch ≈ 100.0" in crossing_text(step)


def test_a_step_whose_per_sequence_bytes_bind_it_never_crosses():
    # f / a = 4 FLOP/B, below the ridge of 5, whatever the batch.
    step = StepIntensity(
        batch=4, flops=160.0, weight_bytes=1000.0, other_bytes=40.0, ridge=5.0, roof="datasheet"
    )
    assert step.crossing() is None
    assert "memory-bound at any batch" in crossing_text(step)


def test_a_record_without_a_rate_for_its_dtype_has_no_step():
    bare = dataclasses.replace(record(1, 1.0, 1.0, 1.0, 1.0), dtype="float32")
    assert step_intensity(bare) is None


def test_tpot_stops_being_flat_at_the_first_batch_above_the_limit():
    points = pd.DataFrame({"batch": [1, 2, 4, 8], "tpot_ms": [100.0, 110.0, 140.0, 100 * FLAT_LIMIT + 1]})
    assert BatchSweep("x", points, None, None).measured_knee == 8
    flat = points.assign(tpot_ms=[100.0, 101.0, 102.0, 103.0])
    assert BatchSweep("x", flat, None, None).measured_knee is None


def test_sweeps_group_runs_by_all_but_the_batch_and_predict_from_the_largest(tmp_path):
    records = [
        record(1, 100.0, 1000.0, 10.0, 50.0),
        record(8, 800.0, 3000.0, 80.0, 55.0),
        record(1, 100.0, 1000.0, 10.0, 60.0),
        RunRecord(1, "failed"),
    ]
    sweeps = batch_sweeps(records, ["ref", "ref", "fast", "ref"])
    assert [s.label for s in sweeps] == ["ref"]  # "fast" has one batch only
    ref = sweeps[0]
    assert list(ref.points["batch"]) == [1, 8]
    # From batch 8: f = 100, a = 10, W = 3000: 5·3000 / (100 − 50) = 300.
    assert ref.predicted == pytest.approx(300.0)
    path = throughput_plot(sweeps, tmp_path / "throughput.png", title="t")
    with Image.open(path) as png:
        assert png.size == (1320, 528)
