"""Fast SAM: attention without the whole decomposed relative-position bias, in-place GELU.

The reference (`sam.SamAttention`) builds bias[B, heads, N, N] = rel_h[i, row_j] + rel_w[i, col_j]
(N = H·W tokens) and hands it to SDPA as an additive mask. In base mode's global blocks
(N = 4096, 12 heads) that is 805 MB in fp32 per block: written by a broadcast add into a
freshly allocated (page-faulting) tensor, copied once more because the add leaves it in a
permuted layout that the reshape to [B, heads, N, N] cannot view, then read by the kernel.

Two formulations of the same attention, picked by device:

* blocked (CPU; `kernels.blocked_attention`): queries are processed in tiles of whole grid rows.
  Each tile's slice of the bias, [B, heads, rows, N], is written into one reused buffer in
  SDPA's layout and passed with that tile of queries: every query row gets the reference's bias
  values and kernel, and what goes away is the copy of the permuted bias and all but one tile of
  it. A tile holds at most BIAS_TILE_ELEMENTS, so a global block of base mode runs in 4 tiles of
  16 grid rows, while a windowed block's whole bias (25 windows x 12 heads x 196², 46 MB) fits
  one tile and is written once. In fp32 the output matched the reference bit for bit in the
  cases measured; SDPA's CPU kernel may block a shorter query tile differently, which can change
  the last bits.
* folded (CUDA): the bias becomes part of the dot product. With
  q' = [q/√D, rel_h(q_i) (H values), rel_w(q_i) (W values)] and k' = [k, onehot(row_j), onehot(col_j)],
  q'·k' = q·k/√D + rel_h[i, row_j] + rel_w[i, col_j], so one unmasked SDPA call with scale 1
  is the biased attention and nothing N×N is ever written to memory. QK does (D+H+W)/D times
  the multiply-adds of the reference (3x at D = H = W = 64), which tensor cores absorb; on this
  2-core CPU it ran 1.6x (global) and 1.7x (windowed) slower than the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_perf_opt.models.kernels.blocked_attention import blocked_attention

from ..sam import SamAttention, SamMLP, resized_rel_pos
from .paths import FOLDED_ALIGN, FastPaths, choose_paths


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """rel_h [B, heads, H, W, H] and rel_w [B, heads, H, W, W] of q [B, heads, N, D]:
    rel_h[.., r, c, r'] = q_(r,c)·R_h[r, r'] and rel_w[.., r, c, c'] = q_(r,c)·R_w[c, c'], with
    the unscaled q (the reference's two einsums, unchanged; split by grid row and column so
    that the blocked form slices them without a copy, where the folded form's reshape to
    [B, heads, N, H] copies each once)."""
    b, heads, n, d = q.shape
    r_q = q.reshape(b * heads, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, resized_rel_pos(rel_pos_h, h, h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, resized_rel_pos(rel_pos_w, w, w))
    return rel_h.unflatten(0, (b, heads)), rel_w.unflatten(0, (b, heads))


def folded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """The same attention as one unmasked SDPA call over widened q' and k' (see the module
    docstring); v keeps its head dimension D. Returns [B, heads, N, D]."""
    b, heads, n, d = q.shape
    h, w = rel_h.shape[2], rel_h.shape[3]
    token = torch.arange(n, device=q.device)
    # One-hot rows and columns by comparison: F.one_hot would check its input on the host.
    onehot = torch.cat(
        [
            (token // w)[:, None] == torch.arange(h, device=q.device),
            (token % w)[:, None] == torch.arange(w, device=q.device),
        ],
        dim=-1,
    ).to(q.dtype)
    pad = -(d + h + w) % FOLDED_ALIGN
    q2 = F.pad(
        torch.cat([q * d**-0.5, rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)], dim=-1),
        (0, pad),
    )
    k2 = F.pad(torch.cat([k, onehot.expand(b, heads, n, h + w)], dim=-1), (0, pad))
    return F.scaled_dot_product_attention(q2, k2, v, scale=1.0)


class FastSamAttention(SamAttention):
    """SAM attention with the relative-position bias applied without the [B, heads, N, N] tensor:
    blocked over query tiles (bit-identical to the reference on CPU) or folded into the dot
    product, or the reference's materialised bias where that measures fastest (the fixed
    `paths`, else `paths.choose_paths`). Same parameters and names as the reference."""

    paths: FastPaths | None = None  # None: chosen by the input's device and dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = self.paths or choose_paths(x.device, x.dtype)
        if paths.sam_attention == "reference":
            return super().forward(x)
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, D]
        rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, h, w)
        if paths.sam_attention == "folded":
            out = folded_attention(q, k, v, rel_h, rel_w)
        else:
            out = blocked_attention(q, k, v, rel_h, rel_w, paths.bias_tile_elements)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class FastSamMLP(SamMLP):
    """The SAM MLP with GELU applied in place on lin1's output: the same values, one fresh
    [tokens, 4·width] tensor fewer per block (50 MB at base mode's 4096 tokens in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lin1(x)
        return self.lin2(torch.ops.aten.gelu_(hidden))
