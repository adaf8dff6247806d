"""Fast MoE: the routed experts run without the host reading how many tokens each one got.

The reference (`decoder.MoE`) copies the per-expert token counts to the host (one device sync
per MoE layer), then launches every selected expert's three GEMMs one by one and scatters the
results back with an fp32 `index_add_`. Here the routed experts' weights live in two stacked
tensors per layer, gate+up [E, 2I, d] and down [E, d, I]; each expert's `nn.Linear` weights are
views into them, so state-dict keys, checkpoint loading and dummy initialisation are those of
the reference and no expert parameter exists twice. Routing (fp32 gate, softmax, top-k without
renormalisation) is the reference's, so the same experts are chosen.

Four ways to run the experts (`paths.FastPaths`), picked per call by `paths.choose_paths`:

* grouped: the T·k (token, expert) pairs are sorted by expert, the group ends come from a
  `searchsorted` on the device, and two `F.grouped_mm` calls (gate+up, then down) run every
  expert on its rows. Nothing is read on the host and only the chosen experts' weights are
  read. Used where `F.grouped_mm` runs without a sync: CUDA bf16 on SM 9.x/10.x (its CUTLASS
  kernel; elsewhere it copies the offsets to the host), and CPU prefill.
* gathered (one token, CUDA without the grouped kernel): the k chosen experts' weights are
  gathered into [k, ...] tensors and run as two batched matmuls. Sync-free, hence usable in a
  CUDA graph, at the price of writing and re-reading a copy of those weights.
* one by one (a decode step on CPU): the expert ids are read on the host, which on a CPU costs
  no device sync, and each chosen expert runs as two products on its slices of the stacks
  (CPU's grouped GEMM runs each group as a single-threaded GEMM, half the bandwidth): for one
  token two `kernels.linear.matvec` products; for a decode step of a batch the reference's
  dispatch and combine around the experts, each expert's rows through
  `kernels.linear.rows_product` (every expert, even one of a single row, so the bytes moved do
  not depend on the routing).
* looped: the reference's per-expert loop, which reads the counts on the host once per layer
  (prefill on CUDA without the grouped kernel, or wherever it measures fastest).

The weighted sum over the k experts stays in fp32 as in the reference; for one token it is a
[1, k] x [k, d] product instead of an `index_add_` into a zeroed buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_perf_opt.models.kernels.linear import matvec, rows_product

from ..config import LMConfig
from ..decoder import MoE
from .paths import FastPaths, choose_paths, grouped_mm_op


class FastMoE(MoE):
    """Same parameters, names and routing as the reference MoE; the routed experts' weights are
    views of stacked per-layer tensors, run without a device sync on CUDA and as bandwidth-bound
    products on CPU (see the module docstring).

    The views survive `FastDeepSeekOCR.to_empty` and loading; anything that replaces the
    parameters' storage afterwards (`.to(dtype)`, `copy.deepcopy`) must call `tie_experts()`.
    """

    paths: FastPaths | None = None  # None: chosen by the input's device and dtype

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        # Not in the state dict: the per-expert parameters (views of these) are.
        self.register_buffer("gate_up_weight", torch.empty(e, 2 * i, d), persistent=False)
        self.register_buffer("down_weight", torch.empty(e, d, i), persistent=False)
        self.tie_experts()

    def tie_experts(self) -> None:
        """Point every routed expert's weights at its slices of the stacked tensors."""
        i = self.gate_up_weight.shape[1] // 2
        for e, expert in enumerate(self.experts):
            expert.gate_proj.weight = nn.Parameter(self.gate_up_weight[e, :i], requires_grad=False)
            expert.up_proj.weight = nn.Parameter(self.gate_up_weight[e, i:], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(self.down_weight[e], requires_grad=False)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · expert_k(x) in fp32 [T, d], by the fastest path for this device and dtype."""
        paths = self.paths or choose_paths(x.device, x.dtype)
        return getattr(self, paths.routed_for(x.shape[0]))(x, weights, experts)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · expert_k(x) in fp32 [T, d], with two grouped GEMMs over the expert-sorted rows."""
        t, k = experts.shape
        sorted_ids, order = experts.flatten().sort(stable=True)
        ids = torch.arange(self.n_experts, device=x.device)
        ends = torch.searchsorted(sorted_ids, ids, right=True).to(torch.int32)  # end row of each group
        # One token: every row is that token, whatever the order.
        rows = x.expand(k, x.shape[1]).contiguous() if t == 1 else x.index_select(0, order // k)
        grouped_mm = grouped_mm_op()
        hidden = grouped_mm(rows, self.gate_up_weight.transpose(1, 2), offs=ends)  # [T·k, 2I]
        out = grouped_mm(_swiglu(hidden), self.down_weight.transpose(1, 2), offs=ends)  # [T·k, d]
        w = weights.flatten().gather(0, order).float()
        if t == 1:
            return w[None] @ out.float()
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return y.index_add_(0, order // k, out.float() * w[:, None])

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """One token [1, d]: the k chosen experts as two batched matmuls over gathered weights."""
        ids = experts[0]
        k, d = ids.shape[0], x.shape[1]
        gate_up = self.gate_up_weight.index_select(0, ids)  # [k, 2I, d]
        down = self.down_weight.index_select(0, ids)  # [k, d, I]
        hidden = torch.bmm(gate_up, x.expand(k, d)[:, :, None])[:, :, 0]  # [k, 2I]
        out = torch.bmm(down, _swiglu(hidden)[:, :, None])[:, :, 0]  # [k, d]
        return weights.float() @ out.float()

    def one_by_one(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The chosen experts in turn, ids read on the host: for one token [1, d] two products
        each; for more, each expert on its rows between the reference's dispatch and combine."""
        paths = self.paths or choose_paths(x.device, x.dtype)
        if x.shape[0] > 1:
            return self._experts_on_their_rows(x, weights, experts, paths.rows == "weight_major")
        split = paths.linear == "split"
        outs = [
            matvec(self.down_weight[e], _swiglu(matvec(self.gate_up_weight[e], x, split)), split)
            for e in experts[0].tolist()
        ]  # k x [1, d]
        return weights.float() @ torch.cat(outs).float()

    def _experts_on_their_rows(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, weight_major: bool
    ) -> torch.Tensor:
        """Σ_k w_k · expert_k(x) in fp32 [T, d] with the reference's dispatch and combine, each
        expert's gate+up and down as one product each (`rows_product` on CPU in fp32 with
        `weight_major`)."""
        product = (
            rows_product if weight_major and x.device.type == "cpu" and x.dtype == torch.float32 else _linear
        )

        def run_expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            return product(self.down_weight[e], _swiglu(product(self.gate_up_weight[e], rows)))

        return super().routed(x, weights, experts, run_expert)

    def looped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The reference's per-expert loop (counts read on the host)."""
        return super().routed(x, weights, experts)


def _linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _swiglu(hidden: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of a [rows, 2I] gate+up product."""
    gate, up = hidden.chunk(2, dim=-1)
    return F.silu(gate) * up
