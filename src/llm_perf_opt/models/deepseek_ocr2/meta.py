"""DeepSeek-OCR-2 on the meta device: what makes transformers' code run without values.

A session loaded on meta (`DeepSeekOCR2Session.load` with device meta) runs its own staged
generation at the request's shapes, nothing computed, for counting FLOPs and bytes
(`analytic.counted`'s stage listener). Two places of transformers' code do not run on meta and
are replaced on the meta model only:

* the routed experts: transformers picks `grouped_mm` on CPU and GPU, whose meta kernel
  accepts bf16 only, and whose `eager` alternative needs the expert ids' values (nonzero).
  `meta_experts_forward` runs the same dispatch (sort by expert, gather, per-expert up, gate,
  down, weighting, restore order, sum over k) with the grouped products as one product per
  expert that gets rows. Which experts get how many rows has no value on meta: by default the
  T·k assignments spread evenly (`interface.even_split`, what the harness's routing recorder
  records on meta); `replay_routing` sets observed rows per expert instead, call by call.
* the check that the image features fill exactly the prompt's image positions
  (`get_placeholder_mask`), which reads a tensor's value: the meta model computes the same
  mask and skips the check (a real run makes it).
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import nn

from .build import meta_model

EXPERTS = "DeepseekOcr2TextExperts"


def even_rows(assignments: int, n_experts: int) -> list[int]:
    """Rows per expert when routing has no values: the T·k assignments spread evenly."""
    return [assignments // n_experts + (e < assignments % n_experts) for e in range(n_experts)]


class RowPlan:
    """Rows per expert for each forward of one routed-experts module, in call order; a call
    without a plan (or whose plan does not add up to its T·k) gets `even_rows`."""

    def __init__(self, calls: Sequence[Sequence[int]] = ()) -> None:
        self._calls = [list(c) for c in calls]
        self._next = 0

    def rows(self, assignments: int, n_experts: int) -> list[int]:
        if self._next < len(self._calls) and sum(self._calls[self._next]) == assignments:
            rows = self._calls[self._next]
        else:
            rows = even_rows(assignments, n_experts)
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


def meta_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
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


def placeholder_mask(
    self: nn.Module, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
) -> torch.Tensor:
    """transformers' image-position mask without its value check (module docstring)."""
    return (input_ids == self.config.image_token_id).unsqueeze(-1)


def meta_runnable_model(config, dtype: torch.dtype) -> nn.Module:
    """The model on meta in `dtype` (the MoE gates in fp32, as transformers keeps them), with
    the stand-ins installed and every routed layer on even rows."""
    model = meta_model(config).to(dtype)
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.data = param.data.float()
    for module in model.modules():
        if type(module).__name__ == EXPERTS:
            module.row_plan = RowPlan()
            module.forward = types.MethodType(meta_experts_forward, module)
    model.model.get_placeholder_mask = types.MethodType(placeholder_mask, model.model)
    return model


def replay_routing(model: nn.Module, plans: Sequence[Sequence[Sequence[int]]] | None) -> None:
    """From now on, routed layer j of the meta model takes `plans[j]` (rows per expert, one
    list per call: the prefill, then each decode step); None: even rows again."""
    experts = [m for m in model.modules() if type(m).__name__ == EXPERTS]
    for j, module in enumerate(experts):
        module.row_plan = RowPlan(plans[j] if plans is not None and j < len(plans) else ())
