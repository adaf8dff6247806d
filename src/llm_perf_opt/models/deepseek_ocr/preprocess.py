"""The per-mode views DeepSeek-OCR's vision encoder sees (pages are loaded by models/pages.py).

Everything here follows the official HF `infer` path pixel for pixel (Pillow BICUBIC
resizes, `ImageOps.pad` with 127-grey, ToTensor + Normalize(0.5, 0.5)), written with
PIL, numpy and torch only (no torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec, image_token_count
from llm_perf_opt.models.pages import check_image_size, to_rgb

# int(0.5 * 255): the normalisation mean, so padding becomes ~0 after normalising.
PAD_COLOR = (127, 127, 127)
# The reference code compares against a literal 640 (not the mode's image_size) both for
# "stretch before padding" in no-crop modes and for "small enough to skip tiling".
SMALL_IMAGE_SIDE = 640


@dataclass(frozen=True)
class ImageViews:
    """The normalised views of one image for one mode.

    global_view: [1, 3, G, G] float32 in [-1, 1], G = mode.global_size.
    tiles: [cols*rows, 3, t, t] in row-major order, or None when the grid is (1, 1).
    grid: (cols, rows) of the tile grid.
    source_size: (width, height) of the image that was preprocessed.
    image_tokens: number of `<image>` positions the LM sequence needs for these views.
    """

    global_view: torch.Tensor
    tiles: torch.Tensor | None
    grid: tuple[int, int]
    source_size: tuple[int, int]
    image_tokens: int


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, sorted by tile count.

    Within one tile count the order is CPython's iteration order of the set the reference
    code builds (stable sort), e.g. for (2, 9): (1,2),(2,1),(3,1),(1,3),(2,2),(4,1),...
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def _closest_grid(width: int, height: int, tile_size: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """Grid whose cols/rows is closest to width/height.

    On an exact tie a later (more tiles) candidate wins only if the image has more than
    half the pixels of that grid: width*height > 0.5 * tile_size**2 * cols*rows.
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def select_tile_grid(width: int, height: int, mode: ModeSpec) -> tuple[int, int]:
    """(cols, rows) of tiles for an image of this size; (1, 1) means global view only.

    No-crop modes never tile; crop mode skips tiling when both sides are <= 640.
    """
    if not mode.crop_mode or (width <= SMALL_IMAGE_SIDE and height <= SMALL_IMAGE_SIDE):
        return (1, 1)
    grids = candidate_grids(mode.min_tiles, mode.max_tiles)
    return _closest_grid(width, height, mode.image_size, grids)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float32: ToTensor to [0, 1], then (x - 0.5) / 0.5 to [-1, 1]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    tensor = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
    return tensor.sub_(0.5).div_(0.5)


def _global_image(image: Image.Image, mode: ModeSpec) -> Image.Image:
    """No-crop modes at <= 640 stretch to a square first; every mode then pads to global_size."""
    size = mode.global_size
    if not mode.crop_mode and mode.image_size <= SMALL_IMAGE_SIDE:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (size, size), Image.Resampling.BICUBIC, color=PAD_COLOR)


def _tiles(image: Image.Image, grid: tuple[int, int], tile_size: int) -> torch.Tensor:
    """Resize the whole image to the grid (aspect not kept) and cut it into row-major tiles."""
    cols, rows = grid
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    full = to_tensor(resized)  # [3, rows*t, cols*t]
    tiles = full.reshape(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, 3, tile_size, tile_size).contiguous()


def preprocess_image(image: Image.Image, mode: ModeSpec) -> ImageViews:
    """The global view and (in crop mode, for large enough images) the tiles of one image."""
    image = to_rgb(image)
    check_image_size(image.width, image.height, "<in-memory image>")
    grid = select_tile_grid(image.width, image.height, mode)
    tiles = None if grid == (1, 1) else _tiles(image, grid, mode.image_size)
    return ImageViews(
        global_view=to_tensor(_global_image(image, mode)).unsqueeze(0),
        tiles=tiles,
        grid=grid,
        source_size=image.size,
        image_tokens=image_token_count(mode.global_size, mode.image_size, grid),
    )
