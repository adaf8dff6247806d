"""Trackers attached from outside: nested module ranges, the routing recorder, the step counter.

tiny_model comes from tests/conftest.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.models.deepseek_ocr.families import module_families
from llm_perf_opt.models.interface import Stage
from llm_perf_opt.profiling.trackers import ModuleRanges, RoutingRecorder, StepCounter
from llm_perf_opt.runners.ranges import listening, stage_range


@pytest.fixture(scope="module")
def model(tiny_model):
    return copy.deepcopy(tiny_model)  # hooks are attached to it; the shared model stays untouched


class Heard:
    """A stage listener that logs the ranges it hears."""

    def __init__(self):
        self.log: list[tuple[str, str]] = []

    def stage_entered(self, name):
        self.log.append(("enter", name))

    def stage_exited(self, name):
        self.log.append(("exit", name))


def hook_count(m: torch.nn.Module) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def test_module_ranges_attach_name_the_running_stage_and_detach(model):
    heard = Heard()
    moe = model.model.layers[1].mlp
    x = torch.randn(1, 3, model.cfg.lm.hidden_size)
    assert hook_count(model) == 0
    with ModuleRanges(model, module_families(model)), listening(heard), torch.inference_mode():
        assert hook_count(model) == 2 * len(module_families(model))
        with stage_range("decode"):
            moe(x)
            model.lm_head(x[:, -1])
        model.lm_head(x[:, -1])  # outside every stage: no nested range
        # A forward that raises still closes its range.
        with pytest.raises(RuntimeError), stage_range("decode"):
            model.lm_head(torch.randn(1, 7))
    assert heard.log == [
        ("enter", "decode"),
        ("enter", "decode/moe"),
        ("exit", "decode/moe"),
        ("enter", "decode/lm_head"),
        ("exit", "decode/lm_head"),
        ("exit", "decode"),
        ("enter", "decode"),
        ("enter", "decode/lm_head"),
        ("exit", "decode/lm_head"),
        ("exit", "decode"),
    ]
    assert hook_count(model) == 0


def test_module_ranges_reach_the_profiler(model):
    x = torch.randn(1, 4, model.cfg.lm.hidden_size)
    with ModuleRanges(model, module_families(model)), torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU]) as prof, stage_range("prefill"):
            model.model.layers[1].mlp(x)
    names = [e.name for e in prof.events()]
    assert names.count("prefill/moe") == 1
    assert "prefill/mlp" not in names  # the experts run inside prefill/moe, not as ranges of their own
    assert hook_count(model) == 0


class FakeLayer:
    """A routed layer: calls on_route with the expert ids it picked."""

    def __init__(self, n_experts):
        self.on_route = None
        self.n_experts = n_experts

    def route(self, ids):
        if self.on_route is not None:
            self.on_route(torch.tensor(ids))


def test_routing_recorder_counts_per_stage_call_and_detaches():
    layers = [FakeLayer(4), FakeLayer(4)]
    with RoutingRecorder(layers) as recorder:
        with stage_range("prefill"):  # 3 tokens, top-2
            layers[0].route([[0, 1], [0, 2], [3, 0]])
            layers[1].route([[1, 2], [1, 2], [1, 3]])
        for step in ([[2, 3]], [[0, 3]]):
            with stage_range("decode"):
                layers[0].route(step)
                layers[1].route([[1, 0]])
    assert recorder.counts == {
        "prefill": [[[3, 1, 1, 1], [0, 3, 2, 1]]],
        "decode": [[[0, 0, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 1], [1, 1, 0, 0]]],
    }
    assert all(layer.on_route is None for layer in layers)


def test_routing_outside_every_stage_is_a_bug():
    layer = FakeLayer(2)
    with RoutingRecorder([layer]), pytest.raises(RuntimeError):
        layer.route([[0, 1]])


def test_step_counter_ticks_after_each_per_step_stage():
    ticks = []
    counter = StepCounter((Stage("prefill"), Stage("decode", per_step=True)), lambda: ticks.append(1))
    with listening(counter):
        with stage_range("prefill"):
            pass
        for _ in range(3):
            with stage_range("decode"), stage_range("decode/attn"):
                pass
    assert len(ticks) == 3
