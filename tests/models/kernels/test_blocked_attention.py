"""kernels.blocked_attention: its tiles and what it allocates (its values against the plain
attention: tests/models/deepseek_ocr/test_fast.py, on SAM's own terms)."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.models.kernels.blocked_attention import BIAS_TILE_ELEMENTS, blocked_attention, tile_rows


@pytest.mark.parametrize(
    ("groups", "heads", "side", "tile", "rows"),
    [
        # base, global block: 2^26 // (12 heads * 64 * 4096) = 21 rows at most -> 4 tiles of 16
        (1, 12, 64, BIAS_TILE_ELEMENTS, 16),
        # base, windowed: 25 windows * 12 heads * 14 * 196 = 823,200 elements per row: all 14 fit
        (25, 12, 14, BIAS_TILE_ELEMENTS, 14),
        # a bound below one grid row still makes progress, one row at a time
        (1, 12, 64, 1000, 1),
        # 10 rows of a 64-row grid at most -> 7 tiles; equal heights of ceil(64 / 7) = 10
        (1, 1, 64, 10 * 64 * 4096, 10),
    ],
)
def test_tile_rows(groups, heads, side, tile, rows):
    assert tile_rows(groups, heads, side, side, tile) == rows


def test_blocked_attention_allocates_tiles_not_the_whole_bias(monkeypatch):
    """At a 64×64 grid with 2 heads (N = 4096) and a tile bound of 2^22 elements, a tile holds
    2^22 // (2·64·4096) = 8 grid rows: its bias buffer has 2·8·64·4096 elements, 1/8 of the
    2·4096·4096 of the whole bias, and nothing larger is allocated."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 4096, 8, generator=gen) for _ in range(3))
    rel_h = torch.randn(1, 2, 64, 64, 64, generator=gen)
    rel_w = torch.randn(1, 2, 64, 64, 64, generator=gen)
    sizes = []
    real_new_empty = torch.Tensor.new_empty

    def recording_new_empty(self, *size, **kwargs):
        out = real_new_empty(self, *size, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "new_empty", recording_new_empty)
    blocked_attention(q, k, v, rel_h, rel_w, tile_elements=1 << 22)
    assert max(sizes) == 2 * 8 * 64 * 4096


def test_the_bias_goes_where_the_allocator_says():
    """An allocator handing out one reused buffer gives the values of fresh tensors; each call
    asks it for one tile's worth (an 8x8 grid, 2 heads, tiles of 3 grid rows: 2*3*8*64)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))
    rel_h, rel_w = torch.randn(1, 2, 8, 8, 8, generator=gen), torch.randn(1, 2, 8, 8, 8, generator=gen)
    scratch, asked = torch.full((10_000,), float("nan")), []

    def from_scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
        asked.append(numel)
        return scratch[:numel]

    tile = 3 * 2 * 8 * 64
    expected = blocked_attention(q, k, v, rel_h, rel_w, tile_elements=tile)
    assert torch.equal(
        blocked_attention(q, k, v, rel_h, rel_w, tile_elements=tile, allocate=from_scratch), expected
    )
    assert asked == [tile]
