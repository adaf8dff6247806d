"""Counted costs from stage events: the FLOPs and bytes of every stage a session's own `generate`
runs, counted on its meta-device model (shapes only: no memory, no arithmetic).

    session = SessionClass(model_cfg, SessionOptions(torch.device("meta"), torch.bfloat16))
    session.load()
    request = session.prepare(image, prompt)
    run = count_run(session, request, max_new_tokens=3)
    run.calls["decode"]      one StageCount per decode step (two steps here)
    run.total("sam")         SAM over the run: FLOPs, bytes by category
    run.routing              tokens per expert the meta run fed its routed layers

:class:`StageCounter` is a stage listener (`runners.ranges.listening`): entering a stage range
opens a FLOP counter and a :class:`~llm_perf_opt.analytic.byte_count.ByteCounter`, leaving it
closes them and keeps that call's counts. The stages are the session's own ranges, so the stage
sequence is written once, in the session; any model with a session counts this way. Nested
`stage/family` ranges count with their stage.

The FLOP counter is FlopCounterMode's (matrix products, convolutions, attention: 2 per
multiply-add, executed work), with a formula for CPU flash SDPA, which torch lacks, and without
its module tracking: that registers global module hooks, which a model may take for observers
(DeepSeek-OCR's fast decode falls back to eager steps under them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from llm_perf_opt.analytic.byte_count import ByteCounter
from llm_perf_opt.analytic.families import Cost
from llm_perf_opt.models.interface import ModelSession, Request, RoutingCounts, even_split
from llm_perf_opt.profiling.trackers import RoutingRecorder
from llm_perf_opt.runners.ranges import SEPARATOR, listening


def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    """Forward FLOPs of CPU flash SDPA: QK^T and PV, 2 * 2*B*H*Sq*Sk*D (causal masking not discounted)."""
    b, h, sq, _ = query_shape
    return 4 * b * h * sq * key_shape[2] * value_shape[3]


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP counts for "Global" alone, and
    no global module hook is registered."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode counting in total only (no module hooks), plus a formula for CPU flash
    SDPA (4*B*H*Sq*Sk*D, as torch's own SDPA formulas)."""
    aten = torch.ops.aten
    counter = FlopCounterMode(
        display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flop}
    )
    counter.mod_tracker = _GlobalOnly()
    return counter


@dataclass(frozen=True)
class StageCount:
    """One call of a stage (or a sum of calls): counted FLOPs and bytes, in total and by aten op."""

    flops: int = 0  # FlopCounterMode's: executed matmul work
    bytes: Cost = field(default_factory=Cost)  # ByteCounter's: weights, activations, KV cache (bytes only)
    #: aten op name (`mm`, `scaled_dot_product_attention`) -> its FLOPs (as matmul_flops) and bytes
    ops: dict[str, Cost] = field(default_factory=dict)

    def __add__(self, other: StageCount) -> StageCount:
        ops = dict(self.ops)
        for op, cost in other.ops.items():
            ops[op] = ops.get(op, Cost()) + cost
        return StageCount(self.flops + other.flops, self.bytes + other.bytes, ops)


def _by_op(flops: FlopCounterMode, moved: ByteCounter) -> dict[str, Cost]:
    """Per aten op, FlopCounterMode's FLOPs and ByteCounter's bytes (named as ByteCounter names them)."""
    ops = dict(moved.by_op)
    for op, n in flops.get_flop_counts().get("Global", {}).items():
        name = str(op).removeprefix("aten.").split(".")[0]
        ops[name] = ops.get(name, Cost()) + Cost(matmul_flops=n)
    return ops


class StageCounter:
    """A stage listener counting the FLOPs and bytes of each stage range, call by call.

    weights: the model's parameters; kv: gives the KV-cache buffers of the running request
    (`ModelSession.kv_buffers`), asked at every op as the cache is allocated inside a stage.
    """

    def __init__(self, weights: list[torch.Tensor], kv) -> None:
        self._weights = weights
        self._kv = kv
        self._open: tuple[str, FlopCounterMode, ByteCounter] | None = None
        self.calls: dict[str, list[StageCount]] = {}

    def stage_entered(self, name: str) -> None:
        if SEPARATOR in name:  # a nested range counts with its stage
            return
        if self._open is not None:
            raise RuntimeError(f"stage {name!r} entered inside stage {self._open[0]!r}")
        flops, moved = flop_counter(), ByteCounter(weights=self._weights, kv=self._kv)
        # The byte counter last: it sees each op first, whole, as it would alone.
        flops.__enter__()
        moved.__enter__()
        self._open = (name, flops, moved)

    def stage_exited(self, name: str) -> None:
        if SEPARATOR in name:
            return
        if self._open is None or self._open[0] != name:
            raise RuntimeError(f"stage {name!r} left without being entered")
        _, flops, moved = self._open
        self._open = None
        moved.__exit__(None, None, None)
        flops.__exit__(None, None, None)
        self.calls.setdefault(name, []).append(
            StageCount(flops.get_total_flops(), moved.total, _by_op(flops, moved))
        )


@dataclass(frozen=True)
class CountedRun:
    """The counted costs of one `generate`, per stage and call, and the routing it fed."""

    calls: dict[str, list[StageCount]]  # stage -> one count per call (per step for per-step stages)
    routing: RoutingCounts | None  # tokens per expert per routed layer and call; None without routed layers

    def total(self, stage: str) -> StageCount:
        return sum(self.calls[stage][1:], self.calls[stage][0])


@contextmanager
def _routing(session: ModelSession) -> Iterator[RoutingRecorder | None]:
    layers = session.routed_layers()
    if not layers:
        yield None
        return
    with RoutingRecorder(layers, count=even_split) as recorder:
        yield recorder


def count_run(session: ModelSession, request: Request, max_new_tokens: int) -> CountedRun:
    """Count every stage of `session.generate(request, max_new_tokens)` on a session loaded on
    the meta device. A first, uncounted run comes before, as the harness's warm-up comes before
    its measured runs: what a model allocates once and reuses (a static KV cache, filled with
    zeros when it is made) is not part of a run's cost."""
    if session.options.device.type != "meta":
        raise ValueError(f"count_run: the session must run on the meta device, not {session.options.device}")
    session.generate(request, max_new_tokens)
    counter = StageCounter(list(session.module.parameters()), session.kv_buffers)
    with _routing(session) as recorder, listening(counter):
        session.generate(request, max_new_tokens)
    return CountedRun(counter.calls, None if recorder is None else recorder.counts)
