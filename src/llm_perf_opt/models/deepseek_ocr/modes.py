"""Resolution modes: how a page becomes the views the vision encoder sees."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llm_perf_opt.errors import UserError

# SAM patch 16, then two stride-2 convs: one LM token per 64x64 pixels of a view.
PIXELS_PER_TOKEN_SIDE = 64


@dataclass
class ModeSpec:
    """One resolution mode; the options are conf/mode/*.yaml (placed under `model.mode`)."""

    name: str
    base_size: int  # side of the global view
    image_size: int  # side of a tile (and of the global view when crop_mode is false)
    crop_mode: bool
    min_tiles: int = 2
    max_tiles: int = 9

    def __post_init__(self) -> None:
        if self.base_size % PIXELS_PER_TOKEN_SIDE or self.image_size % PIXELS_PER_TOKEN_SIDE:
            raise UserError(
                f"mode {self.name}: base_size and image_size must be multiples of {PIXELS_PER_TOKEN_SIDE}"
            )
        if self.crop_mode and not (1 <= self.min_tiles <= self.max_tiles):
            raise UserError(f"mode {self.name}: need 1 <= min_tiles <= max_tiles")

    @property
    def global_size(self) -> int:
        """Side of the global view: padded/resized to base_size, or image_size without cropping."""
        return self.base_size if self.crop_mode else self.image_size


def tokens_per_side(view_size: int) -> int:
    """q = ceil((size // 16) / 4): tokens along one side of a view after SAM's 16x compression."""
    return math.ceil((view_size // 16) / 4)


def image_token_count(global_size: int, tile_size: int, grid: tuple[int, int]) -> int:
    """LM embeddings of one image: global rows with a newline each, the separator, and the
    stitched tile grid (rows with a newline each) when there is more than one tile.

    N = q_g*(q_g+1) + 1 + [cols*rows > 1] * (rows*q_t) * (cols*q_t + 1)
    """
    cols, rows = grid
    q_g = tokens_per_side(global_size)
    n = q_g * (q_g + 1) + 1
    if cols * rows > 1:
        q_t = tokens_per_side(tile_size)
        n += (rows * q_t) * (cols * q_t + 1)
    return n
