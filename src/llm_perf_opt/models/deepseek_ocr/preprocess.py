"""Image loading and the per-mode views DeepSeek-OCR's vision encoder sees.

Everything here follows the official HF `infer` path pixel for pixel (Pillow BICUBIC
resizes, `ImageOps.pad` with 127-grey, ToTensor + Normalize(0.5, 0.5)), written with
PIL, numpy and torch only (no torchvision).
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec, image_token_count

SAMPLE_PAGE: Path = Path(__file__).parent / "assets" / "sample_page.png"

# One SAM patch is 16 px; a side shorter than that carries no content the encoder can see.
MIN_SIDE = 16
# Beyond 50:1 the padded global view is a sliver (a 50:1 page padded to 1024 is 20 px,
# about a third of one token row) and tiling can only offer up to 9:1, so the content
# would be stretched more than 5x. Such inputs are almost always mistakes.
MAX_ASPECT_RATIO = 50.0

# int(0.5 * 255): the normalisation mean, so padding becomes ~0 after normalising.
PAD_COLOR = (127, 127, 127)
# The reference code compares against a literal 640 (not the mode's image_size) both for
# "stretch before padding" in no-crop modes and for "small enough to skip tiling".
SMALL_IMAGE_SIDE = 640

# 16-bit greyscale modes (and 32-bit "I", which Pillow uses for 16-bit data from some formats).
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(path: Path | str, problem: str) -> UserError:
    return UserError(f"image {path}: {_one_line(problem)}")


def check_image_size(width: int, height: int, source: Path | str) -> None:
    """Reject images too small to encode or with an aspect ratio beyond MAX_ASPECT_RATIO."""
    if min(width, height) < MIN_SIDE:
        raise _fail(source, f"{width}x{height} px is too small; each side must be at least {MIN_SIDE} px")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise _fail(
            source,
            f"{width}x{height} px has an extreme aspect ratio ({ratio:.0f}:1); "
            f"at most {MAX_ASPECT_RATIO:.0f}:1 is accepted",
        )


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255 with rounding; Pillow's own convert clips at 255 instead."""
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image, source: Path | str = "<in-memory image>") -> Image.Image:
    """Convert any Pillow mode to RGB.

    Alpha is dropped as the reference `convert("RGB")` does (no compositing), so the
    pixels match what the official pipeline feeds the model.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "P":
        # Via RGBA so palette transparency is resolved instead of warned about.
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise _fail(source, f"cannot convert colour mode {image.mode} to RGB ({exc})") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "file not found")
    if path.is_dir():
        raise _fail(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty (0 bytes)")


def _decode(path: Path) -> Image.Image:
    """Open and fully decode, turning every Pillow failure into one UserError line."""
    try:
        with warnings.catch_warnings():
            # Over MAX_IMAGE_PIXELS Pillow only warns; a page that large is a mistake or an attack.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with path.open("rb") as fh:
                image = Image.open(fh)
                image.load()  # full decode now, so truncated files fail here
                return ImageOps.exif_transpose(image)
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(path, f"rejected as a possible decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise _fail(path, "not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # Pillow reports truncated and corrupt data with these types.
        raise _fail(path, f"corrupt or truncated image ({exc})") from None


def load_image(path: Path | str) -> Image.Image:
    """Load an image file as RGB with EXIF orientation applied, or raise a one-line UserError."""
    path = Path(path)
    _check_file(path)
    image = to_rgb(_decode(path), path)
    check_image_size(image.width, image.height, path)
    return image


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
