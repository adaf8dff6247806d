"""Linear projector into the LM width, and the image-token layout.

Per image the LM sees [stitched tile grid, a newline after each row] + [global grid, a
newline after each row] + [view separator]; without tiles only the last two parts.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Linear(in_dim, out_dim)  # key name as in the checkpoint

    def forward(self, sam_out: torch.Tensor, clip_out: torch.Tensor) -> torch.Tensor:
        """[B,1024,h,w] SAM + [B,1+h·w,1024] CLIP → [B, h·w, n_embed]; CLIP's CLS is dropped,
        CLIP channels come first."""
        feats = torch.cat([clip_out[:, 1:], sam_out.flatten(2).transpose(1, 2)], dim=-1)
        return self.layers(feats)


def _rows_with_newline(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """[H, W, C] → [H·(W+1), C] with the newline embedding closing every row."""
    h, _, c = grid.shape
    return torch.cat([grid, newline.to(grid.dtype).expand(h, 1, c)], dim=1).reshape(-1, c)


def layout_image_embeds(
    global_feats: torch.Tensor,
    tile_feats: torch.Tensor | None,
    grid: tuple[int, int],
    newline: torch.Tensor,
    separator: torch.Tensor,
) -> torch.Tensor:
    """global [1, q², C] and tiles [rows·cols, q_t², C] (row-major) → [N_img, C]."""
    c = global_feats.shape[-1]
    q = math.isqrt(global_feats.shape[1])
    parts = []
    cols, rows = grid
    if tile_feats is not None and cols * rows > 1:
        qt = math.isqrt(tile_feats.shape[1])
        stitched = (
            tile_feats.view(rows, cols, qt, qt, c).permute(0, 2, 1, 3, 4).reshape(rows * qt, cols * qt, c)
        )
        parts.append(_rows_with_newline(stitched, newline))
    parts.append(_rows_with_newline(global_feats.view(q, q, c), newline))
    parts.append(separator.to(global_feats.dtype)[None])
    return torch.cat(parts, dim=0)
