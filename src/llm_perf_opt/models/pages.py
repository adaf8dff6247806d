"""A page image as every model reads it: the bundled sample page, the pages of a batch (`images=`),
and loading a file as RGB with its EXIF orientation applied, with each way a file can be wrong
reported as one UserError line."""

from __future__ import annotations

import glob
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from llm_perf_opt.errors import UserError

SAMPLE_PAGE: Path = Path(__file__).parent / "assets" / "sample_page.png"

# One SAM patch is 16 px; a side shorter than that carries no content the encoder can see.
MIN_SIDE = 16
# Beyond 50:1 the padded global view is a sliver (a 50:1 page padded to 1024 is 20 px,
# about a third of one token row) and tiling can only offer up to 9:1, so the content
# would be stretched more than 5x. Such inputs are almost always mistakes.
MAX_ASPECT_RATIO = 50.0

# 16-bit greyscale modes (and 32-bit "I", which Pillow uses for 16-bit data from some formats).
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


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


def image_suffixes() -> set[str]:
    """File suffixes Pillow opens (".png", ".jpg", ...), lower case."""
    Image.init()
    return {suffix.lower() for suffix in Image.registered_extensions()}


def list_pages(images: str | Sequence[str]) -> list[Path]:
    """The page files `images=` names: a list of files, a directory (its image files in name
    order; any other file is a mistake), a glob, or one file. Files are checked when loaded."""
    if not isinstance(images, str):
        pages = [Path(p).expanduser() for p in images]
        if not pages:
            raise UserError("images=: the list is empty")
        return pages
    if glob.has_magic(images):
        pages = sorted(Path(p) for p in glob.glob(str(Path(images).expanduser())))
        if not pages:
            raise UserError(f"images={images}: no file matches")
        return pages
    path = Path(images).expanduser()
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    others = [p.name for p in files if p.is_dir() or p.suffix.lower() not in image_suffixes()]
    if others:
        raise UserError(
            f"images={images}: {others[0]} is not an image file"
            + (f" (and {len(others) - 1} more)" if len(others) > 1 else "")
            + "; give a directory of pages only"
        )
    if not files:
        raise UserError(f"images={images}: the directory holds no image")
    return files


def batch_pages(
    images: str | Sequence[str] | None, image: str | None, batch_size: int
) -> tuple[Path | None, ...]:
    """The batch_size pages of one request: the first of `images`, repeated in order when it
    names fewer; without `images`, `image` (None: the model's bundled page) batch_size times."""
    if images is None:
        return (None if image is None else Path(image).expanduser(),) * batch_size
    pages = list_pages(images)
    return tuple(pages[i % len(pages)] for i in range(batch_size))
