"""The roofline PNG: a valid, non-blank image of the expected size, written atomically."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from llm_perf_opt.hardware.ceilings import Roof
from llm_perf_opt.report.roofline import roofline_table
from llm_perf_opt.report.roofline_plot import roofline_plot


def make_roof(label: str, flop_s: dict, byte_s: float) -> Roof:
    return Roof(label, flop_s, byte_s, source="test figures")


ROOFS = [
    make_roof("datasheet", {"bf16": 989.4e12}, 3.35e12),
    make_roof("calibrated", {"bf16": 800e12}, 3.0e12),
]
# The figure is 10 × 6.2 inches at 110 dpi.
WIDTH, HEIGHT = 1100, 682
# tab10's first colour, the first stage's, as 8-bit RGB.
FIRST_STAGE_RGB = (31, 119, 180)


def _table(rows: list[tuple]) -> pd.DataFrame:
    work = pd.DataFrame(rows, columns=["stage", "time_ms", "busy_ms", "flops", "bytes"])
    return roofline_table(work, ROOFS, "bf16")


STAGES = [
    ("preprocess", 3.0, 0.2, 0.0, 0.0),
    ("sam", 12.0, 11.0, 976.9e9, 7.12e9),
    ("clip", 1.6, 1.4, 161.7e9, 1.09e9),
    ("projector", 0.09, 0.05, 1.34e9, 7e6),
    ("prefill", 69.0, 14.6, 235.7e9, 6.38e9),
    ("decode", 545.0, 93.5, 31 * 1.166e9, 31 * 1.177e9),
]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (WIDTH, HEIGHT)
        return np.asarray(img.convert("RGB")).astype(int)


def _has_colour(px: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    return int((np.abs(px - np.array(rgb)).max(axis=2) <= tolerance).sum())


def test_stage_plot_is_a_non_blank_png(tmp_path):
    path = roofline_plot(_table(STAGES), ROOFS, "bf16", tmp_path / "roofline.png", title="base on H100")
    assert path == tmp_path / "roofline.png"
    px = _pixels(path)
    ink = (px < 235).any(axis=2).mean()
    # Axes, roofs, points and text cover a few percent of the picture, not most of it.
    assert 0.02 < ink < 0.5
    # sam, the first plotted stage, is drawn in the first palette colour.
    assert _has_colour(px, FIRST_STAGE_RGB) > 50
    assert [p.name for p in tmp_path.iterdir()] == ["roofline.png"]


def test_module_rows_and_unplottable_rows(tmp_path):
    rows = STAGES + [
        ("sam/attn", 7.5, 7.3, 500e9, 5e9),
        ("sam/mlp", 3.0, 2.9, 460e9, 1.8e9),
        ("prefill/moe", 50.0, 10.0, 190e9, 5.5e9),
        ("decode/moe", 350.0, 60.0, 30e9, 30e9),
        ("decode/norm", float("nan"), float("nan"), 1e8, 1e8),
        ("decode/embed", 1.0, 0.5, 0.0, 1e6),
    ]
    path = roofline_plot(_table(rows), ROOFS, "bf16", tmp_path / "module.png", title="module granularity")
    px = _pixels(path)
    assert 0.02 < (px < 235).any(axis=2).mean() < 0.5


def test_roofs_alone_when_no_row_can_be_placed(tmp_path):
    path = roofline_plot(
        _table([("preprocess", 3.0, 0.2, 0.0, 0.0)]), ROOFS, "bf16", tmp_path / "r.png", title="t"
    )
    px = _pixels(path)
    assert (px < 235).any(axis=2).mean() > 0.01
    assert _has_colour(px, FIRST_STAGE_RGB) == 0
