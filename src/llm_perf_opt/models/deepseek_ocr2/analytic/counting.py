"""FLOPs and bytes of each stage, counted by running the session's own staged generation on
the meta-device model (shapes only, nothing computed), with a stage listener that splits the
counts by top-level stage range:

* FLOPs: torch's FlopCounterMode over the run, read at each stage call's entry and exit
  (2 FLOPs per multiply-add). Executed FLOPs: attention counts every score the kernel forms,
  masked or not. Scaled-dot-product attention is taken whole by ByteCounter (below), which
  still runs its decomposition on meta, uncounted there, so FlopCounterMode sees its two
  products (the same FLOPs as torch's SDPA formula).
* Bytes: a fresh llm_perf_opt.analytic.byte_count.ByteCounter around each stage call (weights
  = the parameters, KV = the cache tensors present when the call starts), and the largest
  tensor each stage allocates (its largest transient).

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

    def new_call(self, stage: str) -> dict[str, Cost]:
        """The (empty) op -> cost table of the stage's next call."""
        self.calls.setdefault(stage, []).append({})
        return self.calls[stage][-1]


class _LargestWrite(TorchDispatchMode):
    """The largest tensor any op allocates while active (views allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = Transient()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    size = t.numel() * t.element_size()
                    if size > self.largest.bytes:
                        self.largest = Transient(func.overloadpacket.__name__, tuple(t.shape), size)
        return out


class _StageCounter:
    """A stage listener: per top-level stage call, the FLOPs counted inside it, and the bytes and
    largest allocation of a ByteCounter opened for it."""

    def __init__(self, flops: FlopCounterMode, weights: Sequence[torch.Tensor],
                 kv: Callable[[], list[torch.Tensor]], counts: Counts) -> None:  # fmt: skip
        self._flops = flops
        self._weights = list(weights)
        self._kv = kv
        self._counts = counts
        self._open: tuple[dict[str, int], ByteCounter, _LargestWrite] | None = None

    def _flop_snapshot(self) -> dict[str, int]:
        return {_op_name(str(op)): n for op, n in self._flops.get_flop_counts().get("Global", {}).items()}

    def stage_entered(self, name: str) -> None:
        if SEPARATOR in name:
            return
        modes = (ByteCounter(weights=self._weights, kv=self._kv()), _LargestWrite())
        for mode in modes:
            mode.__enter__()
        self._open = (self._flop_snapshot(), *modes)

    def stage_exited(self, name: str) -> None:
        if SEPARATOR in name or self._open is None:
            return
        (start, counter, largest), self._open = self._open, None
        for mode in (largest, counter):
            mode.__exit__(None, None, None)
        call = self._counts.new_call(name)
        for op, n in self._flop_snapshot().items():
            if n > start.get(op, 0):
                call[op] = Cost(matmul_flops=n - start.get(op, 0))
        for op, cost in counter.by_op.items():
            call[op] = call.get(op, Cost()) + cost
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


def placeholder_mask(self: nn.Module, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                     image_features: torch.Tensor) -> torch.Tensor:  # fmt: skip
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


def count(run: Callable[[], Any], model: nn.Module, kv: Callable[[], list[torch.Tensor]]) -> Counts:
    """Counts of `run()` (a staged generation on the meta `model`), split by stage call.
    `kv()` gives the KV-cache tensors at the moment a stage call starts."""
    counts = Counts()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        with listening(_StageCounter(flops, list(model.parameters()), kv, counts)):
            run()
    return counts
