"""Stage ranges: names, NVTX + record_function emission, and the global switch."""

import pytest
import torch

from llm_perf_opt.profiling import ranges
from llm_perf_opt.profiling.ranges import (
    DECODE,
    PREFILL,
    STAGES,
    is_range_name,
    module_range,
    module_range_name,
    ranges_enabled,
    stage_of,
    stage_range,
)
from llm_perf_opt.profiling.trace import load_trace, record_trace


def _annotations(path):
    return [e for e in load_trace(path) if e.get("cat") == "user_annotation"]


def test_stage_names_in_run_order():
    assert STAGES == ("preprocess", "sam", "clip", "projector", "prefill", "decode")
    assert ranges.NVTX_DOMAIN == "llm_perf_opt"


def test_module_range_names():
    assert module_range_name(PREFILL, "attn") == "prefill/attn"
    assert stage_of("prefill/attn") == "prefill"
    assert stage_of(DECODE) == "decode"
    for stage, family in [("vision", "attn"), (PREFILL, ""), (PREFILL, "a/b")]:
        with pytest.raises(ValueError):
            module_range_name(stage, family)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("prefill", True), ("prefill/attn", True), ("prefill/", False), ("prefill/a/b", False),
     ("prefil", False), ("ProfilerStep#1", False), ("attn/prefill", False)],
)
def test_is_range_name(name, expected):
    assert is_range_name(name) is expected


def test_unknown_range_name_is_rejected():
    with pytest.raises(ValueError):
        stage_range("prefil")


def test_ranges_work_without_a_profiler_or_gpu():
    with stage_range(PREFILL), module_range(PREFILL, "attn"):
        torch.ones(2) + 1


def test_nested_ranges_appear_in_a_real_trace(tmp_path):
    x = torch.randn(32, 32)

    def run():
        with stage_range(PREFILL):
            with module_range(PREFILL, "attn"):
                x @ x
            with module_range(PREFILL, "mlp"):
                torch.relu(x)
        with stage_range(DECODE):
            x.sum()

    events = _annotations(record_trace(run, tmp_path / "trace.json", cuda=False))
    by_name = {e["name"]: e for e in events}
    assert set(by_name) == {"prefill", "prefill/attn", "prefill/mlp", "decode"}

    def inside(inner, outer):
        return (inner["tid"] == outer["tid"] and outer["ts"] <= inner["ts"]
                and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"])

    assert inside(by_name["prefill/attn"], by_name["prefill"])
    assert inside(by_name["prefill/mlp"], by_name["prefill"])
    assert not inside(by_name["decode"], by_name["prefill"])


def test_ranges_can_be_switched_off(tmp_path):
    def run():
        with ranges_enabled(False), stage_range(PREFILL):
            torch.ones(4).sum()
        with stage_range(DECODE):
            torch.ones(4).sum()

    names = [e["name"] for e in _annotations(record_trace(run, tmp_path / "trace.json", cuda=False))]
    assert names == ["decode"]


def test_range_closes_when_the_block_raises(tmp_path):
    def run():
        with pytest.raises(RuntimeError), stage_range(PREFILL):
            raise RuntimeError("boom")
        with stage_range(DECODE):
            torch.ones(4).sum()

    events = _annotations(record_trace(run, tmp_path / "trace.json", cuda=False))
    assert sorted(e["name"] for e in events) == ["decode", "prefill"]
