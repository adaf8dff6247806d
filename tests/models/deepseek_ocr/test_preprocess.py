"""Image loading, the resolution modes, tiling and token counts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm_perf_opt.config import group_options, load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec
from llm_perf_opt.models.deepseek_ocr.preprocess import candidate_grids, preprocess_image, select_tile_grid
from llm_perf_opt.models.pages import MAX_ASPECT_RATIO, MIN_SIDE, SAMPLE_PAGE, load_image

# The official release's resolution modes: (global view side, tile side, tiled?).
OFFICIAL_MODES = {
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}
# Gundam's tile-count bounds: the defaults of the official `dynamic_preprocess`.
OFFICIAL_GUNDAM_TILES = (2, 9)
PAD_VALUE = (127 / 255 - 0.5) / 0.5  # about -0.0039


def white(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), "white")


@pytest.fixture(scope="module")
def modes() -> dict[str, ModeSpec]:
    """Every option of the `mode` config group, composed as a run composes it."""
    return {name: load([f"mode={name}"]).model.mode for name in group_options("mode")}


@pytest.fixture(scope="module")
def gundam(modes: dict[str, ModeSpec]) -> ModeSpec:
    return modes["gundam"]


def test_shipped_modes_are_the_official_ones(modes: dict[str, ModeSpec]) -> None:
    assert {name: (m.base_size, m.image_size, m.crop_mode) for name, m in modes.items()} == OFFICIAL_MODES
    assert all(m.name == name for name, m in modes.items())
    assert (modes["gundam"].min_tiles, modes["gundam"].max_tiles) == OFFICIAL_GUNDAM_TILES


# --- token counts and shapes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "size", "tokens"),
    [("tiny", 512, 73), ("small", 640, 111), ("base", 1024, 273), ("large", 1280, 421)],
)
def test_no_crop_modes_give_one_view(modes: dict[str, ModeSpec], mode: str, size: int, tokens: int) -> None:
    views = preprocess_image(white(900, 700), modes[mode])
    assert views.global_view.shape == (1, 3, size, size)
    assert views.global_view.dtype == torch.float32
    assert views.tiles is None
    assert views.grid == (1, 1)
    assert views.source_size == (900, 700)
    assert views.image_tokens == tokens


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [
        ((1191, 1684), (2, 3), 903),
        ((1000, 1000), (2, 2), 693),
        ((800, 600), (3, 2), 893),
        ((3000, 1000), (3, 1), 583),
        ((600, 400), (1, 1), 273),
    ],
)
def test_gundam_grids_and_token_counts(
    gundam: ModeSpec, size: tuple[int, int], grid: tuple[int, int], tokens: int
) -> None:
    views = preprocess_image(white(*size), gundam)
    assert views.grid == grid == select_tile_grid(*size, gundam)
    assert views.image_tokens == tokens
    assert views.global_view.shape == (1, 3, 1024, 1024)
    if grid == (1, 1):
        assert views.tiles is None
    else:
        assert views.tiles is not None
        assert views.tiles.shape == (grid[0] * grid[1], 3, 640, 640)


def test_candidate_order_matches_reference() -> None:
    assert candidate_grids(2, 9) == [
        (1, 2),
        (2, 1),
        (3, 1),
        (1, 3),
        (2, 2),
        (4, 1),
        (1, 4),
        (5, 1),
        (1, 5),
        (1, 6),
        (6, 1),
        (3, 2),
        (2, 3),
        (7, 1),
        (1, 7),
        (4, 2),
        (2, 4),
        (1, 8),
        (8, 1),
        (1, 9),
        (3, 3),
        (9, 1),
    ]


def test_equal_ratio_tie_prefers_more_tiles_only_for_large_images(gundam: ModeSpec) -> None:
    # Square images tie between (2,2) and (3,3); (3,3) wins above half its 1920x1920 area.
    assert select_tile_grid(1300, 1300, gundam) == (2, 2)
    assert select_tile_grid(1400, 1400, gundam) == (3, 3)


def test_no_crop_modes_never_tile(modes: dict[str, ModeSpec]) -> None:
    assert select_tile_grid(3000, 1000, modes["base"]) == (1, 1)


def test_tiles_are_row_major(gundam: ModeSpec) -> None:
    # 1280x1920 is exactly a 2x3 grid of 640 tiles, so the resize is the identity.
    colours = np.arange(6 * 3, dtype=np.uint8).reshape(3, 2, 3) * 10  # [row, col, rgb]
    pixels = np.kron(colours, np.ones((640, 640, 1), dtype=np.uint8))
    views = preprocess_image(Image.fromarray(pixels), gundam)
    assert views.grid == (2, 3)
    for k in range(6):
        row, col = divmod(k, 2)
        expected = torch.tensor(colours[row, col], dtype=torch.float32) / 255 * 2 - 1
        assert torch.allclose(views.tiles[k].mean(dim=(1, 2)), expected, atol=1e-5)


# --- normalisation and padding --------------------------------------------------------


def test_values_in_range_and_pad_colour(modes: dict[str, ModeSpec]) -> None:
    # A wide white page in base mode: padded above and below with 127-grey.
    views = preprocess_image(white(1000, 500), modes["base"])
    view = views.global_view[0]
    assert view.min() >= -1 and view.max() <= 1
    assert torch.allclose(view[:, :200, :], torch.tensor(PAD_VALUE), atol=1e-6)
    assert PAD_VALUE == pytest.approx(-0.0039, abs=1e-4)
    assert torch.allclose(view[:, 400:600, :], torch.tensor(1.0))


def test_black_maps_to_minus_one(modes: dict[str, ModeSpec]) -> None:
    views = preprocess_image(Image.new("RGB", (640, 640)), modes["small"])
    assert torch.all(views.global_view == -1)


def test_tiny_and_small_stretch_instead_of_padding(modes: dict[str, ModeSpec]) -> None:
    views = preprocess_image(white(1000, 500), modes["tiny"])
    assert torch.all(views.global_view == 1)


def test_large_upscales_with_padding(modes: dict[str, ModeSpec]) -> None:
    views = preprocess_image(white(400, 200), modes["large"])
    view = views.global_view[0]
    assert torch.allclose(view[:, 0, :], torch.tensor(PAD_VALUE), atol=1e-6)  # 320 px pad bands
    assert torch.allclose(view[:, 640, :], torch.tensor(1.0))


# --- loading --------------------------------------------------------------------------


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 32), "blue")
    image.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (32, 64)
    assert loaded.getpixel((16, 8)) == (255, 0, 0)  # the left half is now on top
    assert loaded.getpixel((16, 56)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
        ("LA", (200, 50), (200, 200, 200)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
    ],
)
def test_colour_modes_convert_to_rgb(tmp_path: Path, mode: str, value, expected) -> None:
    path = tmp_path / f"{mode}.{'jpg' if mode in ('CMYK', 'YCbCr') else 'png'}"
    Image.new(mode, (32, 32), value).save(path, quality=100)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(loaded.getpixel((5, 5)), expected))


def test_palette_image_converts(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).quantize(4).save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (200, 10, 10)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(16, axis=0).repeat(16, axis=1)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    loaded = load_image(path)
    row = [loaded.getpixel((x, 0)) for x in (0, 16, 32, 48)]
    assert row == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)]


def test_thirty_two_bit_int_mode_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "grey32.tif"
    Image.fromarray(np.full((16, 16), 65535, dtype=np.int32)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


# --- bad input ------------------------------------------------------------------------


def assert_one_line_error(path: Path, *words: str) -> None:
    with pytest.raises(UserError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path / "nope.png", "not found")


def test_directory(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path, "directory")


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    assert_one_line_error(path, "empty")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n" * 10)
    assert_one_line_error(path, "not an image")


def test_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(path, "truncated")


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.png"
    white(32, 32).save(path)

    def refuse(self: Path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    # chmod cannot lock out root (CI containers), so simulate the failing open.
    monkeypatch.setattr(Path, "open", refuse)
    assert_one_line_error(path, "permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read mode-000 files")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    white(32, 32).save(path)
    path.chmod(0)
    assert_one_line_error(path, "permission denied")


def test_one_pixel(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    white(1, 1).save(path)
    assert_one_line_error(path, "too small", str(MIN_SIDE))


def test_extreme_aspect_ratio(tmp_path: Path) -> None:
    path = tmp_path / "strip.png"
    white(20000, 50).save(path)
    assert_one_line_error(path, "aspect ratio")


def test_aspect_ratio_at_limit_is_accepted(gundam: ModeSpec) -> None:
    side = 20
    image = white(int(side * MAX_ASPECT_RATIO), side)
    assert preprocess_image(image, gundam).grid == (9, 1)


def test_too_small_in_memory_image(gundam: ModeSpec) -> None:
    with pytest.raises(UserError, match="too small"):
        preprocess_image(white(8, 100), gundam)


def test_decompression_bomb_warning_is_an_error(tmp_path: Path) -> None:
    # Just over MAX_IMAGE_PIXELS (where Pillow only warns); 1-bit zeros compress to ~10 KB.
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 10
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)
    assert_one_line_error(path, "decompression bomb")


def test_decompression_bomb_error(tmp_path: Path) -> None:
    # Over twice the limit, where Pillow raises instead of warning.
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10
    path = tmp_path / "bigger_bomb.png"
    Image.new("1", (side, side)).save(path)
    assert_one_line_error(path, "decompression bomb")


# --- the bundled sample page ----------------------------------------------------------


def test_sample_page_is_a4_at_144_dpi_and_gives_903_tokens(gundam: ModeSpec) -> None:
    image = load_image(SAMPLE_PAGE)
    assert image.size == (1191, 1684)
    views = preprocess_image(image, gundam)
    assert views.grid == (2, 3)
    assert views.image_tokens == 903
    assert views.tiles is not None and views.tiles.shape == (6, 3, 640, 640)
    # A document: mostly white paper with dark text.
    grey = np.asarray(image.convert("L"))
    assert (grey > 240).mean() > 0.8
    assert (grey < 80).mean() > 0.01
