"""Attribution of torch.profiler Chrome traces to stage ranges."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.attribution import (
    KERNEL_COLUMNS,
    STAGE_COLUMNS,
    UNATTRIBUTED,
    attribute_trace,
)
from llm_perf_opt.profiling.trace import load_trace, record_trace
from llm_perf_opt.runners.ranges import module_range, stage_range

FIXTURE = Path(__file__).parent / "fixtures" / "cuda_trace.json"
#: The stages the traces below open ranges for, in report order.
STAGES = ("sam", "prefill", "decode")


def _rows(df: pd.DataFrame, key: str = "stage") -> dict:
    return {row[key]: row for row in df.to_dict("records")}


@pytest.fixture(scope="module")
def cuda_attribution():
    return attribute_trace(json.loads(FIXTURE.read_text()), STAGES)


def test_device_time_follows_the_launch_not_the_kernel_time(cuda_attribution):
    # Fixture (µs): sam launches conv 30; prefill launches add 10 and, after prefill/attn has
    # closed, softmax 25 that runs after prefill itself closed; prefill/attn launches bmm 40
    # (runs after the range closed) and a 6 µs memcpy; decode (2 calls) launches gemv 8 and a
    # 2 µs memset, its nested decode/lm_head another gemv 8; a launch on another thread (20)
    # is unattributed even though it happens during prefill/attn on the main thread.
    a = cuda_attribution
    assert a.basis == "device"
    assert list(a.stages.columns) == list(STAGE_COLUMNS)
    assert list(a.stages["stage"]) == ["sam", "prefill", "prefill/attn", "decode", "decode/lm_head"]
    rows = _rows(a.stages)
    expected = {
        # stage: (calls, host, cpu_self, device == busy, self_busy)
        "sam": (1, 0.100, 0.035, 0.030, 0.030),
        "prefill": (1, 0.200, 0.045, 0.081, 0.035),
        "prefill/attn": (1, 0.080, 0.035, 0.046, 0.046),
        "decode": (2, 0.100, 0.0, 0.018, 0.010),
        "decode/lm_head": (1, 0.020, 0.0, 0.008, 0.008),
    }
    for stage, (calls, host, cpu, device, self_busy) in expected.items():
        row = rows[stage]
        assert row["range_calls"] == calls, stage
        assert row["range_ms"] == pytest.approx(host), stage
        assert row["cpu_self_ms"] == pytest.approx(cpu), stage
        assert row["device_ms"] == pytest.approx(device), stage
        assert row["busy_ms"] == pytest.approx(device), stage
        assert row["self_busy_ms"] == pytest.approx(self_busy), stage
        assert row["share"] == pytest.approx(device / 0.149), stage


def test_totals_and_coverage(cuda_attribution):
    a = cuda_attribution
    assert a.total_busy_ms == pytest.approx(0.149)
    assert a.unattributed_ms == pytest.approx(0.020)
    assert a.coverage == pytest.approx(129 / 149)
    # Innermost-only figures add up to the attributed total: nothing is counted twice.
    assert a.stages["self_busy_ms"].sum() + a.unattributed_ms == pytest.approx(a.total_busy_ms)


def test_kernel_table(cuda_attribution):
    kernels = cuda_attribution.kernels
    assert list(kernels.columns) == list(KERNEL_COLUMNS)
    got = [(r["stage"], r["name"], r["calls"], round(r["total_ms"], 6)) for r in kernels.to_dict("records")]
    assert got == [
        ("sam", "conv_kernel", 1, 0.030),
        ("prefill", "softmax_kernel", 1, 0.025),
        ("prefill", "add_kernel", 1, 0.010),
        ("prefill/attn", "bmm_kernel", 1, 0.040),
        ("prefill/attn", "Memcpy HtoD (Pageable -> Device)", 1, 0.006),
        ("decode", "gemv_kernel", 1, 0.008),
        ("decode", "Memset (Device)", 1, 0.002),
        ("decode/lm_head", "gemv_kernel", 1, 0.008),
        (UNATTRIBUTED, "stray_kernel", 1, 0.020),
    ]


def _op(name, ts, dur=None, tid=1, cat="cpu_op", **extra):
    event = {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, **extra}
    if dur is not None:
        event["dur"] = dur
    return event


def test_cpu_trace_uses_op_self_time_of_innermost_range():
    events = [
        _op("prefill", 0.0, 100.0, cat="user_annotation"),
        _op("aten::linear", 1.5, 50.0),  # self 50 - 30 = 20, in prefill
        _op("aten::addmm", 2.0, 30.0),  # self 30, in prefill
        _op("prefill/attn", 60.0, 30.0, cat="user_annotation"),
        _op("aten::bmm", 61.0, 10.0),  # in prefill/attn
        _op("aten::bmm", 75.0, 5.0),  # in prefill/attn
        _op("aten::view", 90.0),  # no dur: contributes nothing
        {**_op("aten::t", 91.0), "dur": None},
        _op("not_a_stage", 92.0, 5.0, cat="user_annotation"),  # ignored annotation
        _op("aten::relu", 93.0, 4.0),  # innermost *stage* range is prefill
        _op("aten::sum", 150.0, 25.0),  # outside every range
        _op("prefill", 0.0, 500.0, tid=2, cat="user_annotation"),  # another thread's range
    ]
    a = attribute_trace({"traceEvents": events}, STAGES)
    assert a.basis == "cpu"
    rows = _rows(a.stages)
    assert rows["prefill"]["range_calls"] == 2
    assert rows["prefill"]["busy_ms"] == pytest.approx(0.069)
    assert rows["prefill"]["self_busy_ms"] == pytest.approx(0.054)
    assert rows["prefill/attn"]["busy_ms"] == pytest.approx(0.015)
    assert rows["prefill"]["device_ms"] == 0.0
    assert a.unattributed_ms == pytest.approx(0.025)
    assert a.coverage == pytest.approx(69 / 94)
    ops = {(r["stage"], r["name"]): (r["calls"], r["total_ms"]) for r in a.kernels.to_dict("records")}
    assert ops[("prefill/attn", "aten::bmm")] == (2, pytest.approx(0.015))
    assert ops[("prefill", "aten::linear")] == (1, pytest.approx(0.020))
    assert ops[(UNATTRIBUTED, "aten::sum")] == (1, pytest.approx(0.025))


def test_kernel_without_a_recorded_launch_is_unattributed():
    events = [
        _op("decode", 0.0, 10.0, cat="user_annotation"),
        _op("cudaLaunchKernel", 1.0, 1.0, cat="cuda_runtime", args={"correlation": 1}),
        {
            "ph": "X",
            "cat": "kernel",
            "name": "k",
            "pid": 0,
            "tid": 7,
            "ts": 2.0,
            "dur": 4.0,
            "args": {"correlation": 1},
        },
        {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 6.0, "dur": 1.0},
        {
            "ph": "X",
            "cat": "kernel",
            "name": "k",
            "pid": 0,
            "tid": 7,
            "ts": 7.0,
            "dur": 3.0,
            "args": {"correlation": 99},
        },
    ]
    a = attribute_trace(events, STAGES)
    assert a.unattributed_ms == pytest.approx(0.004)
    assert a.coverage == pytest.approx(0.5)


def test_only_the_given_stages_count_as_ranges():
    events = [
        _op("vision", 0, 10, cat="user_annotation"),
        _op("prefill", 20, 10, cat="user_annotation"),
        _op("aten::a", 1, 4),
        _op("aten::b", 21, 6),
    ]
    a = attribute_trace(events, stages=("vision",))
    assert list(a.stages["stage"]) == ["vision"]
    assert a.coverage == pytest.approx(0.4)


def test_stage_table_follows_the_given_order():
    a = attribute_trace(json.loads(FIXTURE.read_text()), ("decode", "prefill", "sam"))
    assert list(a.stages["stage"]) == ["decode", "decode/lm_head", "prefill", "prefill/attn", "sam"]
    assert a.kernels["stage"].iloc[0] == "decode"


def test_empty_trace_has_zero_coverage():
    a = attribute_trace({"traceEvents": []}, STAGES)
    assert a.stages.empty and a.kernels.empty
    assert list(a.stages.columns) == list(STAGE_COLUMNS)
    assert (a.total_busy_ms, a.coverage) == (0.0, 0.0)


def test_not_a_trace_is_a_user_error():
    with pytest.raises(UserError):
        attribute_trace({"events": []}, STAGES)


def test_large_trace_is_attributed_exactly():
    # 25k decode ranges, each with an op, a launch and its kernel: 100k events (a sweep that
    # grew quadratically would not finish; its speed is a benchmark's business, not a test's).
    events = []
    for i in range(25_000):
        t = i * 10.0
        events += [
            _op("decode", t, 8.0, cat="user_annotation"),
            _op("aten::mm", t + 1, 5.0),
            _op("cudaLaunchKernel", t + 2, 1.0, cat="cuda_runtime", args={"correlation": i}),
            {
                "ph": "X",
                "cat": "kernel",
                "name": "gemv",
                "pid": 0,
                "tid": 7,
                "ts": t + 5,
                "dur": 3.0,
                "args": {"correlation": i},
            },
        ]
    a = attribute_trace(events, STAGES)
    assert _rows(a.stages)["decode"]["range_calls"] == 25_000
    assert a.coverage == 1.0
    assert a.total_busy_ms == pytest.approx(75.0)


def test_real_cpu_trace_is_covered_by_its_ranges(tmp_path):
    x = torch.randn(64, 64)

    def run():
        with stage_range("prefill"):
            with module_range("prefill", "attn"):
                torch.softmax(x @ x.T, dim=-1)
            torch.relu(x) + 1
        for _ in range(3):
            with stage_range("decode"):
                (x * 2).sum()

    a = attribute_trace(load_trace(record_trace(run, tmp_path / "trace.json", torch.device("cpu"))), STAGES)
    assert a.basis == "cpu"
    assert list(a.stages["stage"]) == ["prefill", "prefill/attn", "decode"]
    rows = _rows(a.stages)
    assert rows["decode"]["range_calls"] == 3
    assert rows["prefill"]["busy_ms"] > rows["prefill/attn"]["busy_ms"] > 0
    assert a.coverage > 0.95
    attn_ops = set(a.kernels.loc[a.kernels["stage"] == "prefill/attn", "name"])
    assert {"aten::mm", "aten::softmax"} <= attn_ops


def test_real_cuda_trace_from_an_h100():
    # Recorded with record_trace on a CUDA device (torch 2.11, CUDA 13): prefill/attn issues 21 sgemm
    # kernels (launched through cuLaunchKernel) that mostly run after the range closed on the
    # host, prefill copies the result to the host, decode runs a sum and a zeros (fill +
    # memset), and one add kernel runs outside every range.
    a = attribute_trace(load_trace(Path(__file__).parent / "fixtures" / "cuda_trace_h100.json"), STAGES)
    assert a.basis == "device"
    rows = _rows(a.stages)
    assert rows["prefill/attn"]["device_ms"] > rows["prefill/attn"]["range_ms"]
    kernels = a.kernels.groupby("stage")["calls"].sum().to_dict()
    assert kernels == {"prefill": 1, "prefill/attn": 21, "decode": 3, UNATTRIBUTED: 1}
    memcpy = a.kernels[a.kernels["name"].str.startswith("Memcpy DtoH")]
    assert list(memcpy["stage"]) == ["prefill"]
    assert a.unattributed_ms == pytest.approx(0.007392)
    assert a.stages["self_busy_ms"].sum() + a.unattributed_ms == pytest.approx(a.total_busy_ms)
