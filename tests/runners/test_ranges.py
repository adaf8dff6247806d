"""Stage ranges: names, NVTX + record_function emission, stage events, and the global switch."""

import pytest
import torch

from llm_perf_opt.profiling.trace import load_trace, record_trace
from llm_perf_opt.runners import ranges
from llm_perf_opt.runners.ranges import (
    current_stage,
    is_range_name,
    listening,
    module_range,
    module_range_name,
    ranges_enabled,
    stage_of,
    stage_range,
)

CPU = torch.device("cpu")
STAGES = ("prefill", "decode")


def _annotations(path):
    return [e for e in load_trace(path) if e.get("cat") == "user_annotation"]


class Recorder:
    def __init__(self):
        self.events = []

    def stage_entered(self, name):
        self.events.append(("enter", name, current_stage()))

    def stage_exited(self, name):
        self.events.append(("exit", name, current_stage()))


def test_nvtx_domain():
    assert ranges.NVTX_DOMAIN == "llm_perf_opt"


def test_module_range_names():
    assert module_range_name("prefill", "attn") == "prefill/attn"
    assert stage_of("prefill/attn") == "prefill"
    assert stage_of("decode") == "decode"
    for stage, family in [("", "attn"), ("prefill", ""), ("prefill", "a/b"), ("a/b", "attn")]:
        with pytest.raises(ValueError):
            module_range_name(stage, family)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("prefill", True),
        ("prefill/attn", True),
        ("prefill/", False),
        ("prefill/a/b", False),
        ("prefil", False),
        ("ProfilerStep#1", False),
        ("attn/prefill", False),
    ],
)
def test_is_range_name(name, expected):
    assert is_range_name(name, STAGES) is expected


@pytest.mark.parametrize("name", ["", "/attn", "prefill/", "prefill/a/b"])
def test_malformed_range_name_is_rejected(name):
    with pytest.raises(ValueError):
        stage_range(name)


def test_listeners_hear_every_range_with_the_current_stage_and_detach():
    recorder = Recorder()
    assert current_stage() is None
    with listening(recorder):
        with stage_range("prefill"), module_range("prefill", "attn"):
            pass
    with stage_range("decode"):  # after the block: not heard
        pass
    assert recorder.events == [
        ("enter", "prefill", "prefill"),
        ("enter", "prefill/attn", "prefill"),
        ("exit", "prefill/attn", "prefill"),
        ("exit", "prefill", "prefill"),
    ]
    assert current_stage() is None


def test_a_listener_is_detached_when_the_block_raises():
    recorder = Recorder()
    with pytest.raises(RuntimeError), listening(recorder), stage_range("prefill"):
        raise RuntimeError("boom")
    assert recorder.events[-1] == ("exit", "prefill", "prefill")
    with stage_range("decode"):
        pass
    assert len(recorder.events) == 2
    assert current_stage() is None


def test_ranges_work_without_a_profiler_or_gpu():
    with stage_range("prefill"), module_range("prefill", "attn"):
        torch.ones(2) + 1


def test_nested_ranges_appear_in_a_real_trace(tmp_path):
    x = torch.randn(32, 32)

    def run():
        with stage_range("prefill"):
            with module_range("prefill", "attn"):
                x @ x
            with module_range("prefill", "mlp"):
                torch.relu(x)
        with stage_range("decode"):
            x.sum()

    events = _annotations(record_trace(run, tmp_path / "trace.json", CPU))
    by_name = {e["name"]: e for e in events}
    assert set(by_name) == {"prefill", "prefill/attn", "prefill/mlp", "decode"}

    def inside(inner, outer):
        return (
            inner["tid"] == outer["tid"]
            and outer["ts"] <= inner["ts"]
            and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
        )

    assert inside(by_name["prefill/attn"], by_name["prefill"])
    assert inside(by_name["prefill/mlp"], by_name["prefill"])
    assert not inside(by_name["decode"], by_name["prefill"])


def test_ranges_can_be_switched_off_while_listeners_still_hear_them(tmp_path):
    recorder = Recorder()

    def run():
        with listening(recorder):
            with ranges_enabled(False), stage_range("prefill"):
                torch.ones(4).sum()
            with stage_range("decode"):
                torch.ones(4).sum()

    names = [e["name"] for e in _annotations(record_trace(run, tmp_path / "trace.json", CPU))]
    assert names == ["decode"]
    assert [name for kind, name, _ in recorder.events if kind == "enter"] == ["prefill", "decode"]


def test_range_closes_when_the_block_raises(tmp_path):
    def run():
        with pytest.raises(RuntimeError), stage_range("prefill"):
            raise RuntimeError("boom")
        with stage_range("decode"):
            torch.ones(4).sum()

    events = _annotations(record_trace(run, tmp_path / "trace.json", CPU))
    assert sorted(e["name"] for e in events) == ["decode", "prefill"]
