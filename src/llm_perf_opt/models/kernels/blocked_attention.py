"""Attention with a decomposed relative-position bias (SAM's), written a tile of queries at a
time instead of whole.

The plain form builds bias[B, heads, N, N] = rel_h[i, row_j] + rel_w[i, col_j] (N = H·W
tokens) and hands it to SDPA as an additive mask: in a global block of 4096 tokens and 12
heads that is 805 MB in fp32, written by a broadcast add into fresh, page-faulting memory,
copied once more (the add leaves it in the einsums' permuted layout, which the reshape to
[B, heads, N, N] cannot view), then read. Here queries go in tiles of whole grid rows: each
tile's slice of the bias, [B, heads, rows·W, N], is written by one add straight into SDPA's
layout and SDPA runs on that tile. Every query row gets the plain form's bias values and the
same kernel; the copy and all but one tile of the bias go away. SDPA's CPU kernel may block a
shorter query tile differently, which can change the last bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: Largest bias tile, in elements (256 MiB in fp32; a third of a 1024-pixel global block's
#: bias). Measured on a 2-core Zen 4 in fp32 (DeepSeek-OCR's SAM): tiles of 2^23, 2^24, 2^25,
#: 2^26 elements and the whole bias took 1.95, 1.45, 1.35, 1.17 and 1.48 s per global block
#: (CPU SDPA gets slower with many short calls; the whole bias pays for fresh, page-faulting
#: memory).
BIAS_TILE_ELEMENTS = 1 << 26

#: Where a tile's bias is written: (elements, a tensor of the dtype and device) -> a flat tensor.
Allocator = Callable[[int, torch.Tensor], torch.Tensor]


def fresh(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A new flat tensor for each call."""
    return like.new_empty(numel)


def tile_rows(batch: int, heads: int, h: int, w: int, tile_elements: int) -> int:
    """Grid rows of queries per tile over [batch, heads, h·w, h·w] bias elements: the fewest
    tiles of at most `tile_elements` (at least one grid row each), of equal height but the last."""
    n = h * w
    most_rows = max(1, min(h, tile_elements // (batch * heads * w * n)))
    return math.ceil(h / math.ceil(h / most_rows))


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    tile_elements: int = BIAS_TILE_ELEMENTS,
    allocate: Allocator = fresh,
) -> torch.Tensor:
    """softmax(q kᵀ/√D + rel_h[i, row_j] + rel_w[i, col_j]) v, a tile of whole grid rows of
    queries at a time (`tile_rows`). q, k, v [B, heads, N, D]; rel_h [B, heads, H, W, H] and
    rel_w [B, heads, H, W, W] (q's dot products with the row and column tables); returns
    [B, heads, N, D]. The bias goes into memory from `allocate` (a reused scratch buffer saves
    the page faults of a fresh one)."""
    b, heads, n, d = q.shape
    h, w = rel_h.shape[2], rel_h.shape[3]
    grid_rows = tile_rows(b, heads, h, w, tile_elements)
    if grid_rows == h:  # one tile: the bias fits, the output needs no reassembly
        # Written into a contiguous tensor: a plain broadcast add would follow the einsums'
        # permuted layout, which SDPA's [B, heads, N, N] view cannot take without a copy.
        bias = allocate(b * heads * n * n, q).view(b, heads, h, w, h, w)
        torch.add(rel_h[..., :, None], rel_w[..., None, :], out=bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(b, heads, n, n))
    buffer = allocate(b * heads * grid_rows * w * n, q)
    # Tiles are written straight into the token-major layout the caller transposes back to.
    out = q.new_empty(b, n, heads, d).transpose(1, 2)
    for top in range(0, h, grid_rows):
        bottom = min(h, top + grid_rows)
        start, end = top * w, bottom * w
        bias = buffer[: b * heads * (end - start) * n].view(b, heads, bottom - top, w, h, w)
        torch.add(rel_h[:, :, top:bottom, :, :, None], rel_w[:, :, top:bottom, :, None, :], out=bias)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end], k, v, attn_mask=bias.view(b, heads, end - start, n)
        )
    return out
