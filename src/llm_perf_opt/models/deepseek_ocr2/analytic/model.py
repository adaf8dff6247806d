"""DeepSeek-OCR-2's analytic model behind the harness: the FLOPs and bytes of each stage of one
run, and its memory footprint, counted by running the session's own staged generation on a
session loaded on the meta device, at the request's shapes, under the harness's generic stage
listener (`analytic.counted.StageCounter`, extended in counting.py). No hand-written formulas:
the counts follow whatever transformers' code (and, with `model.impl=fast`, fast.py) does.

Decode is counted at its first and its last step only: a step feeds one token (k experts per
MoE layer, whichever they are) against a cache one position longer than the step before, so
every op's FLOPs and bytes are affine in the step index and the n steps sum to exactly
n * (first + last) / 2 (a test checks this against counting every step). The cache is grown
between the two with transformers' own `DynamicCache.update`, outside every stage range.

The harness reads them as the typed `StageCosts` of models.interface: each stage over the run,
the first decode step, the per-op breakdown (as families), the distinct routed experts per MoE
layer; no nested ranges (this model has no module families).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from llm_perf_opt.analytic.counted import StageCount
from llm_perf_opt.analytic.families import Cost, expected_distinct_experts
from llm_perf_opt.models.interface import (
    ExpertUsage,
    FamilyWork,
    Footprint,
    RoutingCounts,
    SessionOptions,
    StageCosts,
    StageMemory,
)
from llm_perf_opt.runners.ranges import listening

from ..build import hf_config
from ..checkpoint import checkpoint_config
from ..config import DeepSeekOCR2ModelConfig
from ..meta import replay_routing
from ..session import DeepSeekOCR2Session, Execution, Request
from ..stages import DECODE, LANGUAGE_MODEL, MODEL_STAGES, PREFILL
from .counting import Transient, TransientListener, TransientStageCounter

L = TypeVar("L", TransientListener, TransientStageCounter)

RUN, STEP = "run", "step"
METRICS = tuple(Cost().as_dict())
NOTE = (
    "FLOPs and bytes counted on the meta-device model running this request's shapes "
    "(FlopCounterMode, ByteCounter): executed FLOPs, attention over every score formed (no causal "
    "discount), matmul/conv/attention ops only; bytes of every aten op, attention fused."
)


@dataclass(frozen=True)
class Ocr2StageModel:
    """Per-op costs of each stage of one run, plus the first decode step and expert usage."""

    stages: dict[str, dict[str, Cost]]  # MODEL_STAGES -> op -> cost over the run
    decode_step: dict[str, Cost]  # the first decode step
    expert_usage: tuple[ExpertUsage, ...]

    def total(self, stage: str) -> Cost:
        return sum(self.stages[stage].values(), Cost())

    def costs(self) -> StageCosts:
        """The run's figures as the harness reads them (models.interface.StageCosts)."""
        families = [
            FamilyWork(s, RUN, op, c.work()) for s, ops in self.stages.items() for op, c in ops.items()
        ]
        families += [FamilyWork(DECODE, STEP, op, c.work()) for op, c in self.decode_step.items()]
        return StageCosts(
            stages={stage: self.total(stage).work() for stage in self.stages},
            steps={DECODE: sum(self.decode_step.values(), Cost()).work()},
            families=tuple(families),
            experts=self.expert_usage,
            note=NOTE,
        )


class DeepSeekOCR2Analytic:
    """The analytic side of DeepSeek-OCR-2 (named by DeepSeekOCR2ModelConfig.analytic)."""

    def __init__(self, cfg: DeepSeekOCR2ModelConfig) -> None:
        self.cfg = cfg
        self._last: tuple | None = None  # the last count: (shapes, counter, meta model)
        self._sessions: dict[str, DeepSeekOCR2Session] = {}  # by dtype: building one takes seconds
        self.config = (
            hf_config(cfg.arch, cfg.attn_impl)
            if cfg.dummy_weights
            else checkpoint_config(Path(cfg.weights).expanduser(), cfg.attn_impl)
        )

    def stage_model(
        self,
        request: Request,
        decode_steps: int,
        dtype: str,
        routing: RoutingCounts | None,
        execution: Execution | None = None,
    ) -> StageCosts:
        """The FLOPs and bytes of exactly this run: its views, prompt, decode steps and observed routing."""
        counts = self.count(request, decode_steps, dtype, routing)
        return self.stage_costs(request, decode_steps, routing, counts).costs()

    def stage_costs(
        self,
        request: Request,
        decode_steps: int,
        routing: RoutingCounts | None,
        counts: TransientStageCounter,
    ) -> Ocr2StageModel:
        """The per-op costs of this run from a count of it (see :meth:`count`)."""
        stages = {s: _sum_calls(counts.calls.get(s, [])) for s in MODEL_STAGES}
        decode = counts.calls.get(DECODE, [])
        if len(decode) == 2 and decode_steps > 2:  # the first and the last step (module docstring)
            stages[DECODE] = {op: decode_steps / 2 * cost for op, cost in stages[DECODE].items()}
        return Ocr2StageModel(
            stages,
            dict(decode[0].ops) if decode else {},
            self._expert_usage(request.prompt_tokens, decode_steps, routing),
        )

    def footprint(
        self, request: Request, max_new_tokens: int, dtype: str, execution: Execution | None = None
    ) -> Footprint:
        """Weights per stage, the KV cache at the end of the run, and each stage's largest
        tensor: from the last count where it had these shapes (after a run, the stage model's),
        else from a meta run with one decode step that looks for the largest tensors only."""
        if self._last is not None and self._last[0] == _shapes(request, dtype):
            counts, model = self._last[1], self._last[2]
        else:
            counts = self._meta_run(
                request, min(1, max_new_tokens - 1), dtype, None, False, TransientListener()
            )
            model = self.meta_session(dtype).module
        params: dict[str, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            params.setdefault(_stage_of(name), []).append(param)
        rows = []
        for stage in MODEL_STAGES:
            held = params.get(LANGUAGE_MODEL if stage in (PREFILL, DECODE) else stage, [])
            largest = counts.transients.get(stage, Transient())
            rows.append(
                StageMemory(
                    stage,
                    weight_params=sum(p.numel() for p in held),
                    weight_bytes=sum(p.numel() * p.element_size() for p in held),
                    transient=f"{largest.op} {list(largest.shape)}",
                    transient_bytes=largest.bytes,
                )
            )
        text = self.config.text_config
        b = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * b
        return Footprint(
            stages=tuple(rows),
            kv_cache_bytes=per_token * (request.prompt_tokens + max_new_tokens - 1),
            kv_bytes_per_token=per_token,
            logits_bytes=text.vocab_size * b,
            total_weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )

    # -- counting --------------------------------------------------------------------------------
    def meta_session(self, dtype: str) -> DeepSeekOCR2Session:
        """This config's session loaded on the meta device in `dtype` (built once per dtype)."""
        if dtype not in self._sessions:
            session = DeepSeekOCR2Session(
                self.cfg, SessionOptions(torch.device("meta"), getattr(torch, dtype))
            )
            session.load()
            self._sessions[dtype] = session
        return self._sessions[dtype]

    def count(
        self,
        request: Request,
        decode_steps: int,
        dtype: str,
        routing: RoutingCounts | None,
        every_step: bool = False,
    ) -> TransientStageCounter:
        """Run the session's staged generation on its meta model at this request's shapes, under
        the stage listener: the vision stages, prefill, and the first and last decode steps (or,
        with `every_step`, all of them). Returns the listener: `calls` per stage, `transients`."""
        session = self.meta_session(dtype)
        counter = TransientStageCounter(list(session.module.parameters()), session.kv_buffers)
        self._meta_run(request, decode_steps, dtype, routing, every_step, counter)
        self._last = (_shapes(request, dtype), counter, session.module)
        return counter

    def _meta_run(
        self,
        request: Request,
        decode_steps: int,
        dtype: str,
        routing: RoutingCounts | None,
        every_step: bool,
        listener: L,
    ) -> L:
        """The staged generation of :meth:`count` on the meta session, heard by `listener`."""
        session = self.meta_session(dtype)
        model = session.module
        plans = _plans(routing)
        counted = range(decode_steps) if every_step else sorted({0, decode_steps - 1} - {-1})
        if plans is not None:  # the observed routing of the prefill and of the counted steps
            plans = [[calls[0], *(calls[1 + i] for i in counted if 1 + i < len(calls))] for calls in plans]
        replay_routing(model, plans)
        runner = session.staged_run()
        views = request.views
        ids = torch.empty(request.input_ids.shape, dtype=torch.long, device="meta")
        meta_views = dataclasses.replace(
            views,
            pixel_values=torch.empty(views.pixel_values.shape, dtype=model.dtype, device="meta"),
            pixel_values_local=None
            if views.pixel_values_local is None
            else torch.empty(views.pixel_values_local.shape, dtype=model.dtype, device="meta"),
        )

        with torch.no_grad(), listening(listener):
            token = runner.prefill(ids, runner.encode_images(meta_views))
            done = 0
            for step in counted:
                _grow(runner.cache, step - done)
                runner.decode(token, 1)
                done = step + 1
        return listener

    def _expert_usage(
        self, prompt_tokens: int, decode_steps: int, routing: RoutingCounts | None
    ) -> tuple[ExpertUsage, ...]:
        """Expected (uniform routing) and observed distinct experts per MoE layer."""
        text = self.config.text_config
        e, k = text.n_routed_experts, text.num_experts_per_tok
        layers = [i for i, kind in enumerate(text.mlp_layer_types) if kind == "sparse"]
        plans = _plans(routing)
        rows = []
        for j, layer in enumerate(layers):
            calls = plans[j] if plans is not None and j < len(plans) else []
            observed = {"prefill": None, "decode_step": None, "decode_run": None}
            if calls:
                observed["prefill"] = _distinct(calls[0])
                steps = calls[1:]
                if steps:
                    observed["decode_step"] = sum(_distinct(c) for c in steps) / len(steps)
                    observed["decode_run"] = _distinct([sum(col) for col in zip(*steps)])
            for scope, tokens in (
                ("prefill", prompt_tokens),
                ("decode_step", 1),
                ("decode_run", decode_steps),
            ):
                rows.append(
                    ExpertUsage(
                        layer, scope, tokens, e, k, expected_distinct_experts(tokens, e, k), observed[scope]
                    )
                )
        return tuple(rows)


def _shapes(request: Request, dtype: str) -> tuple:
    """What a count depends on besides the decode steps: the views, the prompt length, the dtype."""
    return (tuple(request.views.pixel_values.shape), request.views.tiles, request.prompt_tokens, dtype)


def _grow(cache, positions: int) -> None:
    """Append `positions` meta positions to every layer of the cache (transformers' update)."""
    if positions <= 0:
        return
    for i, layer in enumerate(cache.layers):
        shape = list(layer.keys.shape)
        shape[-2] = positions
        cache.update(layer.keys.new_empty(shape), layer.values.new_empty(shape), i)


def _stage_of(name: str) -> str:
    """The stage (or language-model group) a parameter belongs to: the longest matching prefix."""
    prefixes = DeepSeekOCR2Session.stage_prefixes
    best = max((p for p in prefixes if name == p or name.startswith(p + ".")), key=len, default=None)
    return prefixes[best] if best is not None else LANGUAGE_MODEL


def _plans(routing: RoutingCounts | None) -> list[list[list[int]]] | None:
    """Per routed layer, the observed tokens per expert of each call: the prefill, then each decode step."""
    if not routing or len(routing.get(PREFILL, [])) != 1:
        return None
    calls = routing[PREFILL] + routing.get(DECODE, [])
    return [[call[j] for call in calls] for j in range(len(calls[0]))]


def _sum_calls(calls: list[StageCount]) -> dict[str, Cost]:
    out: dict[str, Cost] = {}
    for call in calls:
        for op, cost in call.ops.items():
            out[op] = out.get(op, Cost()) + cost
    return out


def _distinct(counts: list[int]) -> int:
    return sum(1 for c in counts if c > 0)
