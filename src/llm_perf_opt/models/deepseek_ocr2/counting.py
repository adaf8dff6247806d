"""FLOPs and bytes of each stage, counted by running the session's own staged generation on
the meta-device model (shapes only, nothing computed).

* FLOPs: torch's FlopCounterMode over the whole run; a stage listener takes the per-op
  counts at each top-level stage range's entry and exit (2 FLOPs per multiply-add). These are
  executed FLOPs: attention is counted over every score the kernel forms, masked or not.
* Bytes: a second run, with a fresh llm_perf_opt.analytic.byte_count.ByteCounter around each
  stage call (weights = the parameters, KV = the cache tensors present when the call starts),
  plus the largest tensor each stage writes (its largest transient).

Two separate runs because ByteCounter takes scaled-dot-product attention whole at the Python
level, where FlopCounterMode would otherwise see its decomposed matmuls.

Two places of transformers' code do not run on meta and are replaced on the meta model only:

* the routed experts: transformers picks `grouped_mm` on CPU and GPU, whose meta kernel
  accepts bf16 only, and whose `eager` alternative needs the expert ids' values (nonzero);
  `counted_experts_forward` runs the same dispatch (sort by expert, gather, per-expert up,
  gate, down, weighting, restore order, sum over k) with the grouped products as one product
  per expert that gets rows, the rows per expert taken from the routing the harness observed
  (or T·k spread evenly when none was);
* the check that the image features fill exactly the prompt's image positions
  (`get_placeholder_mask`), which reads a meta tensor's value: the meta model computes the
  same mask and skips the check (the real run made it).

This module is a model-local stand-in for a generic counter in analytic/ (issue 16, item 3).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from llm_perf_opt.analytic.byte_count import ByteCounter
from llm_perf_opt.analytic.families import Cost
from llm_perf_opt.runners.ranges import SEPARATOR, listening

#: Per stage, one entry per call: op name -> Cost (FLOPs and bytes of that op in that call).
CallCounts = list[dict[str, Cost]]


@dataclass
class Transient:
    """The largest tensor a stage wrote: its op, shape and bytes."""

    op: str = ""
    shape: tuple[int, ...] = ()
    bytes: int = 0


@dataclass
class Counts:
    """What one counted run found: per stage, per call, per op costs, and largest transients."""

    calls: dict[str, CallCounts] = field(default_factory=dict)
    transients: dict[str, Transient] = field(default_factory=dict)

    def add(self, stage: str, call: int, op: str, cost: Cost) -> None:
        per_call = self.calls.setdefault(stage, [])
        while len(per_call) <= call:
            per_call.append({})
        per_call[call][op] = per_call[call].get(op, Cost()) + cost


class _FlopListener:
    """Per top-level stage call, the FlopCounterMode counts added inside it."""

    def __init__(self, counter: FlopCounterMode, counts: Counts) -> None:
        self._counter = counter
        self._counts = counts
        self._start: dict[str, int] = {}
        self._calls: dict[str, int] = {}

    def _snapshot(self) -> dict[str, int]:
        return {str(op): n for op, n in self._counter.get_flop_counts().get("Global", {}).items()}

    def stage_entered(self, name: str) -> None:
        if SEPARATOR not in name:
            self._start = self._snapshot()

    def stage_exited(self, name: str) -> None:
        if SEPARATOR in name:
            return
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        for op, n in self._snapshot().items():
            delta = n - self._start.get(op, 0)
            if delta:
                self._counts.add(name, call, _op_name(op), Cost(matmul_flops=delta))
        self._counts.calls.setdefault(name, [])  # a stage with no FLOPs still has its calls
        while len(self._counts.calls[name]) <= call:
            self._counts.calls[name].append({})


class _LargestWrite(TorchDispatchMode):
    """The largest tensor any op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = Transient()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                if size > self.largest.bytes:
                    self.largest = Transient(func.overloadpacket.__name__, tuple(t.shape), size)
        return out


class _ByteListener:
    """A fresh ByteCounter (and largest-write tracker) around each top-level stage call."""

    def __init__(self, weights: Sequence[torch.Tensor], kv: Callable[[], list[torch.Tensor]], counts: Counts) -> None:
        self._weights = list(weights)
        self._kv = kv
        self._counts = counts
        self._open: tuple[ByteCounter, _LargestWrite] | None = None
        self._calls: dict[str, int] = {}

    def stage_entered(self, name: str) -> None:
        if SEPARATOR in name:
            return
        counter, largest = ByteCounter(weights=self._weights, kv=self._kv()), _LargestWrite()
        counter.__enter__()
        largest.__enter__()
        self._open = (counter, largest)

    def stage_exited(self, name: str) -> None:
        if SEPARATOR in name or self._open is None:
            return
        (counter, largest), self._open = self._open, None
        largest.__exit__(None, None, None)
        counter.__exit__(None, None, None)
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        for op, cost in counter.by_op.items():
            self._counts.add(name, call, op, cost)
        if largest.largest.bytes > self._counts.transients.get(name, Transient()).bytes:
            self._counts.transients[name] = largest.largest


def _op_name(op: str) -> str:
    """`aten.mm` / `aten.mm.default` -> `mm`, the name ByteCounter uses."""
    parts = op.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "aten" else op


# -- the meta model's stand-ins ---------------------------------------------------------------------
def even_split(assignments: int, n_experts: int) -> list[int]:
    """Tokens per expert when routing was not observed: the T·k assignments spread evenly."""
    return [assignments // n_experts + (e < assignments % n_experts) for e in range(n_experts)]


class RowPlan:
    """Rows per expert for each forward of one routed-experts module, in call order."""

    def __init__(self, calls: Sequence[Sequence[int]] = ()) -> None:
        self._calls = [list(c) for c in calls]
        self._next = 0

    def rows(self, assignments: int, n_experts: int) -> list[int]:
        if self._next < len(self._calls) and sum(self._calls[self._next]) == assignments:
            rows = self._calls[self._next]
        else:
            rows = even_split(assignments, n_experts)
        self._next += 1
        return rows


def _grouped_product(x: torch.Tensor, weight: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """x [S, in] by weight [E, out, in], rows grouped by expert: one product per expert with rows."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(rows):
        if n:
            torch.mm(x[start : start + n], weight[e].t(), out=out[start : start + n])
            start += n
    return out


def counted_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The routed experts as transformers' grouped dispatch runs them, on meta (module docstring)."""
    tokens, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    sorted_ids, order = torch.sort(ids)
    x = hidden_states[order // k]
    weights = top_k_weights.reshape(-1)[order]
    torch.cumsum(torch.histc(sorted_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1), 0)
    rows = self.row_plan.rows(tokens * k, self.num_experts)
    up = self._apply_gate(_grouped_product(x, self.gate_up_proj, rows))
    y = _grouped_product(up, self.down_proj, rows) * weights.unsqueeze(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return y[inverse].view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def placeholder_mask(self: nn.Module, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor):
    """transformers' image-position mask without its value check (module docstring)."""
    return (input_ids == self.config.image_token_id).unsqueeze(-1)


def prepare_meta_model(model: nn.Module, plans: Sequence[Sequence[Sequence[int]]] | None) -> list[nn.Module]:
    """Install the stand-ins on a meta model; `plans[j]` = rows per expert of routed layer j,
    one list per call (prefill, then each decode step). Returns the routed-experts modules."""
    experts = [m for m in model.modules() if type(m).__name__ == "DeepseekOcr2TextExperts"]
    for j, module in enumerate(experts):
        module.row_plan = RowPlan(plans[j] if plans is not None else ())
        module.forward = types.MethodType(counted_experts_forward, module)
    inner = model.model
    inner.get_placeholder_mask = types.MethodType(placeholder_mask, inner)
    return experts


def count(run: Callable[[], Any], model: nn.Module, kv: Callable[[], list[torch.Tensor]],
          reset: Callable[[], None]) -> Counts:  # fmt: skip
    """Counts of `run()` (the staged generation on the meta `model`): a FLOP pass, `reset()`,
    a byte pass. `kv()` gives the KV-cache tensors at the moment a stage call starts."""
    counts = Counts()
    with torch.no_grad():
        with FlopCounterMode(display=False) as flops, listening(_FlopListener(flops, counts)):
            run()
        reset()
        with listening(_ByteListener(list(model.parameters()), kv, counts)):
            run()
    return counts
