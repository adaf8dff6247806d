"""Batch against throughput and latency: where the per-step stages (decode) stop being bound by
reading the weights, predicted from a run's analytic step and its ceilings, and measured over
the jobs of a batch sweep.

A decode step of B sequences reads the weights it uses once for the batch (W bytes) and, per
sequence, does f FLOPs and moves a bytes (its KV cache and activations). Its arithmetic
intensity, I(B) = B·f / (W + B·a), rises with B towards f / a; the step turns compute-bound
where I(B) reaches the ridge R = peak FLOP/s / peak bytes/s of the roof:

    B* = R·W / (f − R·a)          (never, if f / a <= R: the per-sequence bytes alone bind it)

W, f and a come from the analytic first step of the run (`analytic.stages`, scope "step"),
useful FLOPs, divided by the run's batch. W is that batch's: with a mixture of experts a larger
batch touches more experts, so B* from a small batch is a lower bound; the sweep predicts from
its largest batch.

Measured, a memory-bound step takes about the same time whatever B: the sweep names the first
batch whose TPOT exceeds FLAT_LIMIT times the smallest batch's, where the step time starts to
grow with the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from llm_perf_opt.atomic import atomic_path

from .record import RunRecord

#: TPOT above this multiple of the smallest batch's no longer counts as flat.
FLAT_LIMIT = 1.5


@dataclass(frozen=True)
class StepIntensity:
    """The analytic first step of a run's per-step stages, split as the prediction needs it."""

    batch: int
    flops: float  # useful FLOPs of the step, all sequences
    weight_bytes: float  # read once for the batch
    other_bytes: float  # KV cache and activations, all sequences
    ridge: float  # FLOP/B of the run's first roof in its dtype
    roof: str

    @property
    def intensity(self) -> float:
        return self.flops / (self.weight_bytes + self.other_bytes)

    def at(self, batch: float) -> float:
        """Intensity at another batch, the weights held fixed: B·f / (W + B·a)."""
        f, a = self.flops / self.batch, self.other_bytes / self.batch
        return batch * f / (self.weight_bytes + batch * a)

    def crossing(self) -> float | None:
        """B* where the step reaches the ridge (module docstring), None when it never does."""
        f, a = self.flops / self.batch, self.other_bytes / self.batch
        if f <= self.ridge * a:
            return None
        return self.ridge * self.weight_bytes / (f - self.ridge * a)


def step_intensity(record: RunRecord) -> StepIntensity | None:
    """The run's per-step stages (summed) from run.json, or None without them or a FLOP roof."""
    per_step = set(record.stage_layout.per_step if record.stage_layout else ())
    steps = record.analytic.stage_rows("step") if record.analytic else []
    rows = [row for row in steps if row.stage in per_step]
    roofs = record.hardware.roofs if record.hardware else ()
    peak = roofs[0].flop_s.get(record.dtype) if roofs else None
    if not rows or not peak:
        return None
    flops = sum(row.useful_flops for row in rows)
    weights = sum(row.weight_bytes for row in rows)
    other = sum(row.bytes for row in rows) - weights
    return StepIntensity(record.batch_size, flops, weights, other, peak / roofs[0].byte_s, roofs[0].label)


def crossing_text(step: StepIntensity, what: str = "decode") -> str:
    """One line: the step's intensity against the ridge and the predicted crossing batch."""
    crossing = step.crossing()
    head = (
        f"{what} step at batch {step.batch}: {step.intensity:.2f} FLOP/B against the {step.roof} ridge of "
        f"{step.ridge:.2f}"
    )
    if crossing is None:
        return (
            head
            + "; it stays memory-bound at any batch (the KV cache and activations of each sequence alone "
            "are below the ridge)"
        )
    if crossing <= step.batch:
        return (
            head + f"; compute-bound from batch ≈ {crossing:.1f} on (predicted, analytic step and ceilings)"
        )
    return (
        head + f"; predicted compute-bound from batch ≈ {crossing:.1f} (analytic step and ceilings, weights "
        "as read at this batch)"
    )


@dataclass(frozen=True)
class BatchSweep:
    """The ok jobs of one model, mode and implementation at several batch sizes, by batch."""

    label: str
    points: pd.DataFrame  # batch, tpot_ms, decode_tokens_per_s, tokens_per_s, pages_per_s, intensity
    largest: StepIntensity | None  # the largest batch's step (the prediction)
    ridge: float | None

    @property
    def predicted(self) -> float | None:
        return None if self.largest is None else self.largest.crossing()

    @property
    def measured_knee(self) -> int | None:
        """The first batch whose TPOT exceeds FLAT_LIMIT times the smallest batch's."""
        points = self.points.dropna(subset=["tpot_ms"])
        if len(points) < 2:
            return None
        flat = points["tpot_ms"].iloc[0] * FLAT_LIMIT
        over = points[points["tpot_ms"] > flat]
        return None if over.empty else int(over["batch"].iloc[0])


def batch_sweeps(records: list[RunRecord], keys: list[str]) -> list[BatchSweep]:
    """Group finished runs by everything but the batch (`keys`: one label per record, e.g. model,
    mode and implementation); groups with at least two batch sizes."""
    groups: dict[str, list[RunRecord]] = {}
    for key, record in zip(keys, records):
        if record.ok and record.headline is not None:
            groups.setdefault(key, []).append(record)
    sweeps = []
    for key, group in groups.items():
        rows = []
        for record in group:
            step, head = step_intensity(record), record.headline
            rows.append(
                {
                    "batch": record.batch_size,
                    "tpot_ms": head.tpot_ms,
                    "decode_tokens_per_s": head.decode_tokens_per_s,
                    "tokens_per_s": head.tokens_per_s,
                    "pages_per_s": head.pages_per_s,
                    "intensity": None if step is None else step.intensity,
                    "step": step,
                }
            )
        points = pd.DataFrame(rows).sort_values("batch").drop_duplicates("batch", keep="last")
        if len(points) < 2:
            continue
        largest = points["step"].iloc[-1]
        ridge = None if largest is None else largest.ridge
        sweeps.append(BatchSweep(key, points.drop(columns="step").reset_index(drop=True), largest, ridge))
    return sweeps


def sweep_lines(sweep: BatchSweep) -> list[str]:
    """Markdown for one batch sweep: its table, then the predicted and measured crossing."""
    p = sweep.points
    header = "| batch | TPOT ms | decode tok/s | tokens/s | pages/s | decode FLOP/B |"
    rows = [
        f"| {int(r.batch)} | {_num(r.tpot_ms, 1)} | {_num(r.decode_tokens_per_s)} | {_num(r.tokens_per_s)} | "
        f"{_num(r.pages_per_s, 3)} | {_num(r.intensity)} |"
        for r in p.itertuples()
    ]
    lines = [f"### {sweep.label}", "", header, "|---|---|---|---|---|---|", *rows, ""]
    if sweep.largest is not None:
        lines.append("- predicted: " + crossing_text(sweep.largest))
    knee = sweep.measured_knee
    smallest = int(p["batch"].iloc[0])
    lines.append(
        f"- measured: TPOT stays within {FLAT_LIMIT:g}x batch {smallest}'s up to batch {int(p['batch'].iloc[-1])}"
        if knee is None
        else f"- measured: TPOT stops being flat at batch {knee} (above {FLAT_LIMIT:g}x batch {smallest}'s "
        f"{p['tpot_ms'].iloc[0]:,.1f} ms)"
    )
    return lines + [""]


def _num(value: object, digits: int = 2) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:,.{digits}f}"


def throughput_plot(sweeps: list[BatchSweep], path: str | Path, *, title: str) -> Path:
    """Two panels, written atomically as PNG: decode tokens/s against TPOT (one labelled point per
    batch, a line per sweep), and the decode step's intensity against the batch beside the ridge
    and each sweep's predicted crossing."""
    fig = Figure(figsize=(12, 4.8), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for i, sweep in enumerate(sweeps):
        p = sweep.points.dropna(subset=["tpot_ms", "decode_tokens_per_s"])
        colour = f"C{i}"
        left.plot(p["tpot_ms"], p["decode_tokens_per_s"], "o-", color=colour, label=sweep.label)
        for row in p.itertuples():
            left.annotate(
                f"B={int(row.batch)}",
                (row.tpot_ms, row.decode_tokens_per_s),
                xytext=(5, -10),
                textcoords="offset points",
                fontsize=8,
                color=colour,
            )
        q = sweep.points.dropna(subset=["intensity"])
        if q.empty:
            continue
        right.plot(q["batch"], q["intensity"], "o", color=colour, label=f"{sweep.label} (analytic, per job)")
        if sweep.largest is not None:
            top = max(q["batch"].max(), sweep.predicted or 0) * 2
            grid = [2 ** (k / 4) for k in range(0, int(4 * math.log2(top)) + 1)]
            right.plot(
                grid,
                [sweep.largest.at(b) for b in grid],
                "--",
                color=colour,
                alpha=0.6,
                label=f"{sweep.label}: B·f / (W + B·a), W as read at batch {sweep.largest.batch}",
            )
            if sweep.predicted is not None:
                right.axvline(sweep.predicted, color=colour, linestyle=":", alpha=0.8)
                right.annotate(
                    f"B* ≈ {sweep.predicted:.1f}",
                    (sweep.predicted, sweep.ridge),
                    xytext=(4, 6),
                    textcoords="offset points",
                    fontsize=8,
                    color=colour,
                )
    ridges = {s.ridge for s in sweeps if s.ridge is not None}
    for ridge in ridges:
        right.axhline(ridge, color="black", linewidth=1, label=f"ridge {ridge:.2f} FLOP/B")
    left.set_xlabel("TPOT (ms per decode step of the batch, median)")
    left.set_ylabel("decode tokens/s (real tokens, all sequences)")
    left.set_title("throughput against latency, one point per batch")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xscale("log", base=2)
    right.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    right.set_ylim(bottom=0)
    right.set_xlabel("batch size")
    right.set_ylabel("decode step intensity (useful FLOP/B)")
    right.set_title("decode against the ridge")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        canvas.print_png(tmp)
    return Path(path)
