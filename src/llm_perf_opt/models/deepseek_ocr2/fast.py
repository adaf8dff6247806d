"""The fast implementation of DeepSeek-OCR-2 (`model.impl=fast`), beside the reference
(`model.impl=reference`, transformers' code as it is).

Same model, same weights, same parameter names: `install_fast` replaces the `forward` of
transformers' SAM attention, SAM MLP and routed-experts modules of an already built model
(instance attributes, the classes are untouched), nothing else. What changes is what is written to
memory and how the work is cut into kernels, not what is computed:

* SAM attention (`blocked_sam_attention`, on `kernels.blocked_attention`). transformers builds the decomposed relative-position
  bias whole, bias[B·heads, H, W, H, W] = rel_h[.., r, c, r'] + rel_w[.., r, c, c'], reshapes it
  to [B, heads, N, N] (a copy: the broadcast add leaves it in the einsums' permuted layout)
  and hands it to SDPA as an additive mask. In a global block at 1024 pixels (N = 4096, 12
  heads) that is 805 MB in fp32, written into fresh, page-faulting memory, copied, then read.
  Here the queries go in tiles of whole grid rows; each tile's slice of the bias,
  [B, heads, rows·W, N], is written by one add straight into SDPA's layout in a scratch buffer
  reused by every tile, block and call, and SDPA runs on that tile of queries. Every query row
  gets the reference's bias values (the same einsums on the same q) and the same kernel; the
  copy, all but one tile of the bias and the page faults go away. A windowed block's whole
  bias (25 windows x 12 heads x 196², 46 MB) fits one tile.
* SAM MLP: GELU in place on lin1's output (one [N, 4·width] tensor fewer per block; the same
  exact-erf GELU).
* Routed experts of one token (every decode step): transformers' `grouped_mm` dispatch sorts,
  gathers and runs k single-row groups, which CPU's grouped GEMM runs one single-threaded
  product at a time. Here the k expert ids are read on the host (on a CPU that is no device
  sync) and each expert runs as two multi-threaded matrix-vector products on its slices of the
  fused weights, weighted and summed over k in fp32 as transformers does (the sum's order over
  k differs: last bits). More than one token (prefill) goes to the forward it had. Installed
  only where host reads were measured to win (`reads_ids_on_host`: the CPU, and meta, which
  counts a CPU run); on a GPU reading the ids would synchronise the host once per MoE layer
  per step, so the experts keep transformers' forward there.

The FLOPs are the reference's. Outputs match the reference within fp32 rounding: SDPA's CPU
kernel may block a shorter query tile differently, which can change the last bits (a test
compares embeddings, logits and greedy tokens on the tiny model).

Tile size: `kernels.blocked_attention.BIAS_TILE_ELEMENTS`, measured on DeepSeek-OCR's identical
SAM. Unlike DeepSeek-OCR's fast implementation, nothing here is chosen by measuring the device:
formulations that win on one CPU and lose on another (the split one-row products of
`kernels.linear`) are left out.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from llm_perf_opt.models.kernels.blocked_attention import BIAS_TILE_ELEMENTS, blocked_attention

SAM_ATTENTION = "DeepseekOcr2SamVisionSdpaAttention"
SAM_MLP = "DeepseekOcr2SamMLPBlock"
EXPERTS = "DeepseekOcr2TextExperts"


class Scratch:
    """One flat buffer per device and dtype, grown on demand and reused by every bias tile: a
    fresh 256 MiB tensor per tile would page-fault all of it again on each call."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        if like.is_meta:  # shapes only: nothing to keep
            return like.new_empty(numel)
        key = (like.device, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = like.new_empty(numel)
        return buffer[:numel]


def blocked_sam_attention(self: nn.Module, hidden_states: torch.Tensor, output_attentions: bool = False):
    """transformers' DeepseekOcr2SamVisionSdpaAttention.forward with the bias written a tile of
    query rows at a time (`kernels.blocked_attention`, into the shared scratch buffer). Returns
    (output, None) as the reference does."""
    b, h, w, _ = hidden_states.shape
    heads, n = self.num_attention_heads, h * w
    qkv = self.qkv(hidden_states).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, heads, N, D]
    d = q.shape[-1]
    if self.use_rel_pos:
        # The reference's einsums on the same (unscaled) queries, per grid row and column.
        r_q = q.reshape(b * heads, h, w, d)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.get_rel_pos(w, w, self.rel_pos_w))
        rel_h, rel_w = rel_h.unflatten(0, (b, heads)), rel_w.unflatten(0, (b, heads))
        out = blocked_attention(q, k, v, rel_h, rel_w, BIAS_TILE_ELEMENTS, self.scratch.get)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, h, w, -1)), None


def sam_mlp_gelu_in_place(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """lin2(gelu(lin1(x))) with the GELU written over lin1's output."""
    return self.lin2(torch.ops.aten.gelu_(self.lin1(hidden_states)))


def experts_one_token(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Σ_k w_k · expert_k(x) for one token [1, h], expert by expert (module docstring); more
    tokens go to `many_tokens`, the forward the module had. On meta, where ids have no values,
    the k slots take experts 0..k-1: the same shapes and weight bytes as any k experts."""
    if hidden_states.shape[0] != 1:
        return self.many_tokens(hidden_states, top_k_index, top_k_weights)
    ids = range(top_k_index.shape[1]) if hidden_states.is_meta else top_k_index[0].tolist()
    out = None
    for slot, e in enumerate(ids):
        up = self._apply_gate(F.linear(hidden_states, self.gate_up_proj[e]))
        y = F.linear(up, self.down_proj[e]) * top_k_weights[:, slot, None]
        out = y if out is None else out + y
    return out.to(hidden_states.dtype)


#: What each replaced forward does, by transformers' class name (run.json's execution notes).
DESCRIPTIONS = {
    SAM_ATTENTION: "SAM attention: the relative-position bias written a tile of query rows at a time into one "
    "reused buffer, not whole and then copied",
    SAM_MLP: "SAM MLP: GELU in place on lin1's output",
    EXPERTS: "routed experts of one token (decode): expert by expert, two multi-threaded matrix-vector "
    "products each, ids read on the host",
}


def reads_ids_on_host(device: torch.device) -> bool:
    """Whether the one-token experts (which read their ids on the host) are installed for
    `device`: where that was measured to win, the CPU (no device sync), and meta, which stands
    in for a CPU run in the analytic counts. Not on CUDA, where each read is a sync."""
    return device.type in ("cpu", "meta")


def install_fast(model: nn.Module, device: torch.device) -> tuple[str, ...]:
    """Give the built model's SAM attention and MLP modules and its routed experts the fast
    forwards (in place; the parameters are untouched). SAM attention only where transformers
    runs it through SDPA (`attn_impl=sdpa`), the MLP only where its activation is the exact
    GELU. The experts keep the forward they had (transformers', or on meta the stand-in of
    meta.py) for more than one token; they are replaced only where `reads_ids_on_host(device)`.
    Returns the class names whose forwards were replaced."""
    scratch = Scratch()
    replaced = []
    for module in model.modules():
        kind = type(module).__name__
        if kind == SAM_ATTENTION:
            module.scratch = scratch
            module.forward = types.MethodType(blocked_sam_attention, module)
        elif kind == SAM_MLP and getattr(module.act, "act", None) is F.gelu:
            module.forward = types.MethodType(sam_mlp_gelu_in_place, module)
        elif kind == EXPERTS and reads_ids_on_host(device):
            module.many_tokens = module.forward
            module.forward = types.MethodType(experts_one_token, module)
        else:
            continue
        replaced.append(kind)
    return tuple(dict.fromkeys(replaced))
