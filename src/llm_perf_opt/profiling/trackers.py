"""Trackers that attach to a session from outside and detach cleanly.

* :class:`RoutingRecorder` counts tokens per expert of every routed layer, per stage call;
* :class:`ModuleRanges` opens a nested `stage/family` range around each family module;
* :class:`StepCounter` calls back after every step of a per-step stage (progress bars).

Each is a context manager; the stage they attribute work to comes from the stage events
(`llm_perf_opt.runners.ranges`), never from state shared with the session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from llm_perf_opt.models.interface import RoutedLayer, RoutingCounts, Stage
from llm_perf_opt.runners.ranges import SEPARATOR, current_stage, module_range


def bincount(experts: torch.Tensor, n_experts: int) -> list[int]:
    """Tokens per expert of the expert ids [tokens, k] a routed layer chose (a device sync)."""
    return torch.bincount(experts.flatten(), minlength=n_experts).tolist()


class RoutingRecorder:
    """Observes MoE routing through each layer's `on_route` hook (one `count` per layer call:
    `bincount`, or on the meta device, where ids have no values, `interface.even_split`).

    `counts[stage]` holds one entry per call of that stage (a prefill, one decode step), each
    with the tokens per expert of every routed layer, in layer order.
    """

    def __init__(self, layers: list[RoutedLayer], count: Callable[[torch.Tensor, int], list[int]] = bincount):
        self._layers = layers
        self._count = count
        self.counts: RoutingCounts = {}

    def __enter__(self) -> RoutingRecorder:
        for slot, layer in enumerate(self._layers):
            layer.on_route = functools.partial(self._observe, slot)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self._layers:
            layer.on_route = None

    def _observe(self, slot: int, experts: torch.Tensor) -> None:
        stage = current_stage()
        if stage is None:
            raise RuntimeError("a routed layer ran outside every stage range")
        calls = self.counts.setdefault(stage, [])
        if slot == 0:  # layers run in order: the first routed layer opens a new call
            calls.append([[] for _ in self._layers])
        calls[-1][slot] = self._count(experts, self._layers[slot].n_experts)


class ModuleRanges:
    """Nested `stage/family` ranges around the modules of each family, through forward hooks.

    The model stays free of profiling code; each family module's forward runs inside a range
    named after the stage that is running and the family (`prefill/moe`, `sam/attn`).
    """

    def __init__(self, root: nn.Module, families: dict[str, str]):
        self._root = root
        self._families = families
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ModuleRanges:
        modules = dict(self._root.named_modules())
        for name, family in self._families.items():
            open_ranges = []

            def enter(_module, _args, family=family, open_ranges=open_ranges):
                stage = current_stage()
                if stage is not None:  # a family module called outside every stage gets no range
                    rng = module_range(stage, family)
                    rng.__enter__()
                    open_ranges.append(rng)
                else:
                    open_ranges.append(None)

            def leave(_module, _args, _out, open_ranges=open_ranges):
                rng = open_ranges.pop()
                if rng is not None:
                    rng.__exit__(None, None, None)

            self._handles.append(modules[name].register_forward_pre_hook(enter))
            self._handles.append(modules[name].register_forward_hook(leave, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class StepCounter:
    """A stage listener calling `on_step()` after every range of the per-step stages."""

    def __init__(self, stages: Iterable[Stage], on_step: Callable[[], None]):
        self._per_step = {s.name for s in stages if s.per_step}
        self._on_step = on_step

    def stage_entered(self, name: str) -> None:
        pass

    def stage_exited(self, name: str) -> None:
        if SEPARATOR not in name and name in self._per_step:
            self._on_step()
