"""The roofline picture of a :func:`~llm_perf_opt.report.roofline.roofline_table` as a PNG.

Log-log: x = arithmetic intensity (FLOP/byte), y = TFLOP/s. Each roof is drawn as
min(peak, intensity × bandwidth), in the order given: solid, dashed, dotted, dash-dot (pass the
datasheet roof first and the calibrated one second). Each row is one point per time basis:
achieved over busy (kernel/op) time as a filled marker, over wall time as a hollow marker of the
same colour, joined by a thin line; the gap between them is host time. Colour is the stage;
rows named ``stage/family`` (module granularity) take their stage's colour and a marker per
family, listed in the legend; stage rows get a text label, and family rows a small one
(the family's name) wherever it fits without covering another label, marker or roof, so that
some twenty points stay readable. Rows that cannot sit on log axes (no FLOPs, no bytes, no time) are named in a
footnote instead.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

from llm_perf_opt.atomic import atomic_path

from .roofline import RoofLike

_ROOF_STYLES = ("-", "--", ":", "-.")
_ROOF_COLOURS = ("black", "dimgray", "gray", "darkgray")
_FAMILY_MARKERS = ("s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "8")
_STAGE_MARKER = "o"
# Label positions tried around a point, in points from it: beside, above, below, then further out.
_LABEL_OFFSETS = (
    (7, 0, "left", "center"),
    (-7, 0, "right", "center"),
    (0, 7, "center", "bottom"),
    (0, -7, "center", "top"),
    (7, 9, "left", "bottom"),
    (7, -9, "left", "top"),
    (-7, 9, "right", "bottom"),
    (-7, -9, "right", "top"),
    (10, 20, "left", "bottom"),
    (10, -20, "left", "top"),
    (-10, 20, "right", "bottom"),
    (-10, -20, "right", "top"),
    (14, 34, "left", "bottom"),
    (14, -34, "left", "top"),
    (-14, 34, "right", "bottom"),
    (-14, -34, "right", "top"),
)
_MARKER_PX = 6.0
# The x axis reaches at least this factor beyond the highest ridge.
_FLAT_SPAN = 10.0
_FIGSIZE = (10.0, 6.2)
_DPI = 110
# Longer legend lines would run off the right edge of the figure; they wrap instead.
_LEGEND_CHARS = 44


def roofline_plot(
    table: pd.DataFrame, roofs: Sequence[RoofLike], dtype: str, path: str | os.PathLike[str], *, title: str
) -> Path:
    """Draw the roofline chart of ``table`` against ``roofs`` for ``dtype``; write it atomically as PNG.

    ``table`` needs ``stage``, ``flops``, ``bytes``, ``intensity``, ``achieved_tflop_s_busy`` and
    ``achieved_tflop_s_wall``. Axis limits cover every placed point, every roof's ridge and
    peak, with margins. Returns ``path``.
    """
    if not roofs:
        raise ValueError("roofline_plot: at least one roof is needed")
    points, skipped = _points(table)
    peaks = [roof.peak(dtype) / 1e12 for roof in roofs]
    ridges = [roof.peak(dtype) / roof.byte_s for roof in roofs]

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    # Fixed margins rather than a layout engine: label placement below measures text in screen
    # coordinates, which must not move afterwards. The legend goes in the right margin.
    fig.subplots_adjust(left=0.08, right=0.70, bottom=0.11 if skipped else 0.09, top=0.92)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    # The right margin leaves every roof's flat part long enough to carry its label.
    ax.set_xlim(*_limits([*points["x"], *ridges], 4.0, 4.0, right=max(ridges) * _FLAT_SPAN))
    ax.set_ylim(*_limits([*points["y_busy"].dropna(), *points["y_wall"].dropna(), *peaks], 4.0, 3.0))
    ax.set_title(title)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("performance (TFLOP/s)")
    ax.grid(True, which="major", color="0.82", linewidth=0.7)
    ax.grid(True, which="minor", color="0.93", linewidth=0.5)
    ax.set_axisbelow(True)

    handles = _draw_roofs(ax, roofs, dtype)
    colours = _stage_colours(points["parent"])
    families = points.loc[points["family"] != "", "family"].unique()
    markers = {f: _FAMILY_MARKERS[i % len(_FAMILY_MARKERS)] for i, f in enumerate(families)}
    _draw_points(ax, points, colours, markers)
    _place_labels(ax, canvas, points[points["family"] == ""], colours)
    _place_labels(ax, canvas, points[points["family"] != ""], colours, small=True)

    handles += _basis_handles()
    if markers:
        handles += [Line2D([], [], linestyle="", marker="o", color=c, label=s) for s, c in colours.items()]
        handles += [Line2D([], [], linestyle="", marker=m, color="0.35", label=f) for f, m in markers.items()]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=8,
        frameon=False,
    )
    if skipped:
        fig.text(
            0.08,
            0.015,
            "not plotted: " + "; ".join(skipped),
            fontsize=7.5,
            color="0.3",
            ha="left",
            va="bottom",
            wrap=True,
        )

    with atomic_path(path) as tmp:
        canvas.print_png(tmp)
    return Path(path)


def _points(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Plottable rows (x, y over busy, y over wall, parent stage, family or "") and why the others are not."""
    rows, skipped = [], []
    for stage, flops, nbytes, x, busy, wall in zip(
        table["stage"],
        table["flops"],
        table["bytes"],
        table["intensity"],
        table["achieved_tflop_s_busy"],
        table["achieved_tflop_s_wall"],
    ):
        y_busy, y_wall = (_positive(v) for v in (busy, wall))
        x = _positive(x)
        if x is None:
            skipped.append(f"{stage} ({_why_no_intensity(flops, nbytes)})")
        elif y_busy is None and y_wall is None:
            skipped.append(f"{stage} (no time)")
        else:
            parent, _, family = str(stage).partition("/")
            rows.append(
                {
                    "stage": stage,
                    "x": x,
                    "y_busy": y_busy,
                    "y_wall": y_wall,
                    "parent": parent,
                    "family": family,
                }
            )
    columns = ["stage", "x", "y_busy", "y_wall", "parent", "family"]
    return pd.DataFrame(rows, columns=columns).astype({"x": float, "y_busy": float, "y_wall": float}), skipped


def _why_no_intensity(flops: float, nbytes: float) -> str:
    if pd.isna(flops) or pd.isna(nbytes):
        return "no analytic cost"
    return "no FLOPs" if flops == 0 else "no bytes"


def _positive(value: object) -> float | None:
    if value is None or pd.isna(value):
        return None
    v = float(value)
    return v if v > 0 and math.isfinite(v) else None


def _limits(
    values: Sequence[float], below: float, above: float, *, right: float = 0.0
) -> tuple[float, float]:
    """(min / below, max(max × above, right)) of the positive values: margins on a log axis."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return min(positive) / below, max(max(positive) * above, right)


def _draw_roofs(ax, roofs: Sequence[RoofLike], dtype: str) -> list[Line2D]:
    """Each roof as a line with its label and peak written on the flat part; legend handles."""
    lo, hi = ax.get_xlim()
    x = np.geomspace(lo, hi, 512)
    order = sorted(range(len(roofs)), key=lambda i: -roofs[i].peak(dtype))
    handles = []
    for i, roof in enumerate(roofs):
        peak, bandwidth = roof.peak(dtype), roof.byte_s
        style, colour = _ROOF_STYLES[i % len(_ROOF_STYLES)], _ROOF_COLOURS[i % len(_ROOF_COLOURS)]
        (line,) = ax.plot(
            x,
            np.minimum(peak, x * bandwidth) / 1e12,
            linestyle=style,
            color=colour,
            linewidth=1.4,
            label=textwrap.fill(
                f"{roof.label}: {_rate(peak / 1e12)} TFLOP/s {dtype}, {_rate(bandwidth / 1e9)} GB/s",
                _LEGEND_CHARS,
            ),
        )
        handles.append(line)
        # The highest roof's text sits above its line and the others' below theirs, so that two
        # close peaks (datasheet and calibrated) do not write over each other.
        above = order[0] == i
        ax.text(
            hi / 1.2,
            peak / 1e12 * (1.12 if above else 1 / 1.12),
            f"{roof.label} {_rate(peak / 1e12)} TFLOP/s",
            ha="right",
            va="bottom" if above else "top",
            fontsize=8,
            color=colour,
        )
    return handles


def _stage_colours(parents: pd.Series) -> dict[str, tuple]:
    cmap = colormaps["tab10"]
    # tab10's grey (index 7) is skipped: it reads as one of the roofs.
    palette = [cmap(i) for i in range(10) if i != 7]
    return {stage: palette[i % len(palette)] for i, stage in enumerate(parents.unique())}


def _draw_points(ax, points: pd.DataFrame, colours: dict[str, tuple], markers: dict[str, str]) -> None:
    for p in points.itertuples(index=False):
        colour = colours[p.parent]
        marker = markers.get(p.family, _STAGE_MARKER)
        size = 30 if p.family else 50
        if not (math.isnan(p.y_busy) or math.isnan(p.y_wall)):
            ax.plot([p.x, p.x], [p.y_busy, p.y_wall], color=colour, linewidth=0.8, alpha=0.7, zorder=3)
        if not math.isnan(p.y_busy):
            # Filled markers above hollow ones: where two stages' points overlap, both busy points show.
            ax.scatter([p.x], [p.y_busy], s=size, marker=marker, color=colour, edgecolors=colour, zorder=5)
        if not math.isnan(p.y_wall):
            ax.scatter(
                [p.x],
                [p.y_wall],
                s=size,
                marker=marker,
                facecolors="white",
                edgecolors=colour,
                linewidths=1.3,
                zorder=4,
            )


def _basis_handles() -> list[Line2D]:
    return [
        Line2D([], [], linestyle="", marker="o", color="0.35", label="over busy time (kernels/ops)"),
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markerfacecolor="white",
            markeredgecolor="0.35",
            label="over wall time",
        ),
    ]


def _place_labels(
    ax, canvas: FigureCanvasAgg, labelled: pd.DataFrame, colours: dict[str, tuple], *, small: bool = False
) -> None:
    """Label each point where its text overlaps no placed label, marker or roof line.

    Greedy: labels go in order of height, each at the first offset in ``_LABEL_OFFSETS`` that
    is free and inside the axes; a label moved away from its point gets a thin leader line.
    When no offset is free the first one is used for a stage; a ``small`` label (a family's
    name beside its marker) is left out instead, the legend's marker key still naming it.
    """
    renderer = canvas.get_renderer()
    to_px = ax.transData.transform
    obstacles = [
        _box(xy, _MARKER_PX / 2) for line in ax.get_lines() for xy in _dense(to_px(line.get_xydata()))
    ]
    obstacles += [_box(xy, _MARKER_PX) for c in ax.collections for xy in to_px(c.get_offsets())]
    obstacles += [t.get_window_extent(renderer) for t in ax.texts]
    frame = ax.get_window_extent(renderer)
    anchored = labelled.assign(y=labelled["y_busy"].fillna(labelled["y_wall"])).sort_values(
        "y", ascending=False
    )
    for p in anchored.itertuples(index=False):
        text = ax.annotate(
            p.family if small else p.stage,
            (p.x, p.y),
            xytext=(0, 0),
            textcoords="offset points",
            fontsize=7 if small else 9,
            color=colours[p.parent],
            fontweight="normal" if small else "bold",
            zorder=6,
        )
        chosen = None
        for offset in _LABEL_OFFSETS[:8] if small else _LABEL_OFFSETS:
            _move(text, offset)
            box = text.get_window_extent(renderer).expanded(1.06, 1.1)
            if _inside(box, frame) and not any(box.overlaps(o) for o in obstacles):
                chosen = offset
                break
        if chosen is None and small:
            text.remove()
            continue
        chosen = chosen or _LABEL_OFFSETS[0]
        _move(text, chosen)
        dx, dy = chosen[:2]
        if abs(dy) > 10:
            ax.annotate(
                "",
                (p.x, p.y),
                xytext=(dx, dy),
                textcoords="offset points",
                arrowprops={
                    "arrowstyle": "-",
                    "color": colours[p.parent],
                    "linewidth": 0.6,
                    "shrinkA": 0,
                    "shrinkB": 4,
                },
                zorder=2,
            )
        obstacles.append(text.get_window_extent(renderer))


def _move(text, offset: tuple[float, float, str, str]) -> None:
    dx, dy, ha, va = offset
    text.set_position((dx, dy))
    text.set_ha(ha)
    text.set_va(va)


def _dense(px: np.ndarray, step: float = _MARKER_PX / 2) -> np.ndarray:
    """The polyline through ``px`` (screen points) resampled at most ``step`` pixels apart."""
    pieces = [px[:1]]
    for a, b in zip(px[:-1], px[1:]):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / step)))
        pieces.append(a + (b - a) * np.linspace(0, 1, n + 1)[1:, None])
    return np.concatenate(pieces)


def _box(xy: Sequence[float], half: float) -> Bbox:
    return Bbox.from_extents(xy[0] - half, xy[1] - half, xy[0] + half, xy[1] + half)


def _inside(box: Bbox, frame: Bbox) -> bool:
    return box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def _rate(value: float) -> str:
    """A rate with 3 significant digits (trailing zeros kept: 3.00), without an exponent from 0.001 up."""
    return f"{value:,.0f}" if value >= 100 else f"{value:#.3g}"
