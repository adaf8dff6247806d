"""The roofline join: measured stage times against analytic FLOPs and bytes and hardware ceilings.

Pure functions over DataFrames. :func:`roofline_table` adds the achieved rates and, per roof,
the ridge, attainable rate, roofline time, % of roof and bound; :func:`time_split` splits each
row's wall time into the roofline minimum, device time above it and host time; :func:`verdict`
turns one row into a plain-words line; :func:`headline` gives the FLOP and bandwidth
utilisation of groups of stages.

Units: times in ms, FLOPs with 2 per multiply-add, bytes in bytes, peaks in FLOP/s and
bandwidths in byte/s. Rates come out as TFLOP/s (1e12 FLOP/s) and GB/s (1e9 byte/s). A stage's
measured time is ``time_ms`` (as in stages.csv); figures over it end in ``_wall`` (or sit under
``wall``), those over the trace's op or kernel time ``busy_ms`` in ``_busy``.

Degenerate rows never raise and never give an infinity:

- zero or NaN time: every rate and % of roof over that time is NaN (nothing was measured, or
  the time is too short to divide by);
- zero bytes with FLOPs: intensity is NaN (it is unbounded), attainable is the peak and the
  roofline time is the compute time alone;
- zero FLOPs with bytes: intensity 0, attainable 0, roofline time is the memory time alone,
  bound ``memory``;
- zero FLOPs and zero bytes (no modelled work): intensity and attainable NaN, roofline time 0,
  bound ``none``;
- NaN FLOPs or bytes (no analytic cost for the row): everything derived from them is NaN and
  the bound is ``unknown``.

A row whose intensity lies within :data:`BALANCED_BAND` of the ridge is ``balanced``: both
roofs take about the same time there, and calling it compute- or memory-bound would turn a
rounding of the counts into a claim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("stage", "time_ms", "busy_ms", "flops", "bytes")
PER_ROOF_COLUMNS = ("ridge", "attainable_tflop_s", "roofline_ms", "pct_roof_wall", "pct_roof_busy", "bound")
SPLIT_COLUMNS = (
    "stage",
    "time_ms",
    "busy_ms",
    "roofline_ms",
    "above_roof_ms",
    "host_ms",
    "unsplit_ms",
    "overlap_ms",
)

# Above this % of a roof over wall time, timing noise cannot explain it: the roof is too low.
ABOVE_ROOF_PCT = 105.0
# An intensity within this fraction of the ridge (either side) is "balanced".
BALANCED_BAND = 0.15
# Ops named in a verdict: the longest ones, until they hold this share of the op time (at most _MAX_OPS).
OPS_SHARE = 0.5
_MAX_OPS = 3
# A stage is host-bound when the device is idle for more than this share of its wall time.
HOST_BOUND_SHARE = 0.5
# The time bases of the "wall" and "busy" figures: the measured stage time, the trace's op time.
_TIME_BASES = {"wall": "time_ms", "busy": "busy_ms"}
# Longer kernel names (templated CUDA kernels run to hundreds of characters) are cut in verdicts.
_MAX_OP_NAME = 60


class RoofLike(Protocol):
    """A set of hardware ceilings: the peak FLOP/s per dtype name and the memory bandwidth."""

    @property
    def label(self) -> str: ...

    @property
    def byte_s(self) -> float: ...

    def peak(self, dtype: str) -> float: ...


def roof_prefix(label: str) -> str:
    """Column prefix of a roof: its label lower-cased, runs of other characters as ``_``, plus ``_``.

    ``"datasheet"`` → ``"datasheet_"``, ``"Calibrated (H100)"`` → ``"calibrated_h100_"``.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
    if not slug:
        raise ValueError(f"roof label {label!r} has no letters or digits to name its columns")
    return slug + "_"


def roofline_table(work: pd.DataFrame, roofs: Sequence[RoofLike], dtype: str) -> pd.DataFrame:
    """``work`` with the achieved rates and, for each roof, its roofline columns added.

    With F = ``flops``, B = ``bytes``, t = ``time_ms`` or ``busy_ms``, P = ``roof.peak(dtype)``
    and W = ``roof.byte_s``:

    - ``intensity`` = F / B (FLOP/byte)
    - ``achieved_tflop_s_{wall,busy}`` = F / (t · 1e-3) / 1e12;
      ``achieved_gbyte_s_{wall,busy}`` = B / (t · 1e-3) / 1e9
    - per roof, prefixed by :func:`roof_prefix`: ``ridge`` = P / W (FLOP/byte);
      ``attainable_tflop_s`` = min(P, intensity · W) / 1e12;
      ``roofline_ms`` = max(F / P, B / W) · 1e3;
      ``pct_roof_{wall,busy}`` = roofline_ms / t · 100;
      ``bound`` = ``balanced`` if |F/B − P/W| <= :data:`BALANCED_BAND` · P/W, else
      ``compute`` if F / P >= B / W, else ``memory``

    The degenerate cases are listed in the module docstring. Other columns of ``work`` (bytes
    by category, launches, ...) are kept unchanged; the row order and index are kept.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in work.columns]
    if missing:
        raise ValueError(f"roofline_table: work lacks columns {missing}")
    prefixes = [roof_prefix(r.label) for r in roofs]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(
            f"roofline_table: roof labels {[r.label for r in roofs]} give the same column prefix twice"
        )

    flops = _column(work, "flops")
    nbytes = _column(work, "bytes")
    times = {basis: _column(work, column) for basis, column in _TIME_BASES.items()}

    out = work.copy()
    out["intensity"] = _ratio(flops, nbytes)
    for basis, ms in times.items():
        out[f"achieved_tflop_s_{basis}"] = _ratio(flops, ms) / 1e9
        out[f"achieved_gbyte_s_{basis}"] = _ratio(nbytes, ms) / 1e6
    for roof, prefix in zip(roofs, prefixes):
        peak, bandwidth = float(roof.peak(dtype)), float(roof.byte_s)
        if not (peak > 0 and bandwidth > 0 and math.isfinite(peak) and math.isfinite(bandwidth)):
            raise ValueError(
                f"roof {roof.label!r}: peak {peak} FLOP/s ({dtype}) and bandwidth {bandwidth} B/s must be positive"
            )
        ridge = peak / bandwidth
        compute_s = flops / peak
        memory_s = nbytes / bandwidth
        roofline_ms = np.maximum(compute_s, memory_s) * 1e3
        # min(P, I·W) is NaN wherever the intensity is; B = 0 with F > 0 is an unbounded intensity: the peak.
        attainable = np.minimum(peak, out["intensity"].to_numpy() * bandwidth)
        attainable = np.where((nbytes == 0) & (flops > 0), peak, attainable)
        out[prefix + "ridge"] = ridge
        out[prefix + "attainable_tflop_s"] = attainable / 1e12
        out[prefix + "roofline_ms"] = roofline_ms
        out[prefix + "pct_roof_wall"] = _ratio(roofline_ms, times["wall"]) * 100
        out[prefix + "pct_roof_busy"] = _ratio(roofline_ms, times["busy"]) * 100
        balanced = np.abs(out["intensity"].to_numpy() - ridge) <= BALANCED_BAND * ridge
        out[prefix + "bound"] = np.select(
            [
                np.isnan(flops) | np.isnan(nbytes),
                (flops == 0) & (nbytes == 0),
                balanced,
                compute_s >= memory_s,
            ],
            ["unknown", "none", "balanced", "compute"],
            "memory",
        )
    return out


def time_split(table: pd.DataFrame, roof_label: str) -> pd.DataFrame:
    """Split each row's wall time into parts that add up to ``time_ms``, against one roof.

    With wall w, busy b and the roof's roofline time r:

    - ``overlap_ms`` = max(b − w, 0), not a part: on a GPU a stage's kernels can still run after
      its host range closed, during the next stage's wall time. The split uses b' = min(b, w), so
      this stage's parts add up to w; the overlap is shown here, and the next stage's
      ``host_ms`` may include up to that much time in which the device was still busy.
    - ``roofline_ms`` = min(r, b'): the roofline minimum, capped at the device time so that the
      parts add up (r > b means the stage ran faster than the ceilings allow, which the table's
      ``pct_roof_busy`` > 100 shows).
    - ``above_roof_ms`` = b' − roofline_ms: device time spent above the roofline minimum.
    - ``host_ms`` = w − b': the device idle (Python, launches, synchronisations).
    - ``unsplit_ms``: time the data cannot split, 0 when b and r are known. Without a trace
      (b NaN) host and device time cannot be told apart: ``above_roof_ms`` and ``host_ms`` are
      NaN and ``unsplit_ms`` = w − min(r, w). Without an analytic cost (r NaN), ``roofline_ms``
      and ``above_roof_ms`` are NaN and ``unsplit_ms`` = b' (or w without a trace).

    The parts that are not NaN add up to ``time_ms`` exactly; all are NaN when ``time_ms`` is.
    The index of ``table`` is kept, so rows pair with the table's rows.
    """
    prefix = roof_prefix(roof_label)
    if prefix + "roofline_ms" not in table.columns:
        raise ValueError(f"time_split: no roof {roof_label!r} in the table (columns {prefix}*)")
    wall = _column(table, "time_ms")
    busy = _column(table, "busy_ms")
    roof = _column(table, prefix + "roofline_ms")

    traced = ~np.isnan(busy)
    costed = ~np.isnan(roof)
    device = np.where(traced, np.minimum(busy, wall), wall)
    roof_part = np.minimum(roof, device)
    above = np.where(traced & costed, device - roof_part, np.nan)
    host = np.where(traced, wall - device, np.nan)
    unsplit = np.select([~costed, ~traced], [device, device - roof_part], 0.0)
    unsplit = np.where(np.isnan(wall), np.nan, unsplit)
    return pd.DataFrame(
        {
            "stage": table["stage"].to_numpy(),
            "time_ms": wall,
            "busy_ms": busy,
            "roofline_ms": roof_part,
            "above_roof_ms": above,
            "host_ms": host,
            "unsplit_ms": unsplit,
            "overlap_ms": np.where(traced, np.maximum(busy - wall, 0.0), np.nan),
        },
        index=table.index,
        columns=list(SPLIT_COLUMNS),
    )


def verdict(
    row: Mapping[str, object],
    split_row: Mapping[str, object],
    roof_label: str,
    dtype: str,
    *,
    launches: int | None = None,
    steps: int | None = None,
    top_ops: Sequence[tuple[str, float]] | None = None,
    op_notes: Sequence[tuple[Sequence[str], str]] = (),
    device_kind: str = "cuda",
) -> str:
    """One plain-words line about one row of :func:`roofline_table` and its :func:`time_split` row.

    Rules, first match wins:

    1. no wall time: "not measured"; a zero wall time: "no measurable time";
    2. no modelled work (bound ``none``) or no analytic cost (``unknown``): the wall time and,
       with a trace, the device's busy share;
    3. host-bound when the device is idle for more than half the wall time
       (``host_ms`` > :data:`HOST_BOUND_SHARE` · ``time_ms``): the busy share, then the
       roofline time;
    4. otherwise compute-bound, memory-bound or balanced, by the roof's ``bound``, with the
       intensity beside the ridge and the % of the binding roof over the wall time (the dtype is
       named for the compute roof only; bandwidth does not depend on it), what it means when that
       is above :data:`ABOVE_ROOF_PCT`, and, without a trace, a note that host time is unknown.

    Then, when given: ``launches`` kernel launches (op calls on a CPU), the op time above the
    roof, and from ``top_ops`` (pairs of (name, ms), the stage's longest ops) the longest ones
    until they hold :data:`OPS_SHARE` of the busy time. ``op_notes`` are the model's words on
    some ops of this stage (pairs of (op names, what they are)): a note is quoted, with the
    share of the busy time its ops hold, when one of its ops is among those named. With
    ``steps`` (e.g. decode tokens), launches and the roofline time are also given per step.
    ``device_kind`` "cuda" speaks of the GPU and kernels, "cpu" of op time and ops.
    """
    if device_kind not in ("cuda", "cpu"):
        raise ValueError(f"verdict: device_kind must be 'cuda' or 'cpu', not {device_kind!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"verdict: steps must be at least 1, got {steps}")
    prefix = roof_prefix(roof_label)
    stage = row["stage"]
    wall, busy = _float(split_row["time_ms"]), _float(split_row["busy_ms"])
    host = _float(split_row["host_ms"])
    roofline_ms = _float(row[prefix + "roofline_ms"])
    roof_ms = roofline_ms / steps if steps else roofline_ms
    bound = row[prefix + "bound"]
    per_step = steps is not None and steps > 1
    unit = "step" if per_step else "stage"
    work = "kernel" if device_kind == "cuda" else "op"

    if math.isnan(wall):
        return f"{stage}: not measured"
    if wall == 0:
        return f"{stage}: no measurable time"
    parts: list[str] = []
    host_bound = not math.isnan(host) and host > HOST_BOUND_SHARE * wall
    if bound in ("none", "unknown"):
        what = "no modelled work" if bound == "none" else "no analytic cost"
        parts.append(f"{what}; {_ms(wall)} ms")
        if not math.isnan(busy):
            parts.append(_busy_phrase(busy, wall, device_kind, unit))
    elif host_bound:
        parts.append("host-bound: " + _busy_phrase(busy, wall, device_kind, unit))
    else:
        pct = _float(row[prefix + "pct_roof_wall"])
        each = " a step" if per_step else ""
        parts.append(
            f"{_bound_phrase(row, prefix, bound, roof_label, dtype)} ({_ms(roof_ms)} ms{each} at the roof)"
        )
        if pct > ABOVE_ROOF_PCT:
            parts.append(
                "above the roof: the ceiling is too low for this stage (a calibration on a busy machine: "
                "`python -m llm_perf_opt.calibrate --refresh` when idle) or it moves less than the "
                "analytic count (cache reuse)"
            )
        if math.isnan(busy):
            parts.append(f"no trace, so {'GPU' if device_kind == 'cuda' else 'host'} idle time unknown")

    if launches is not None:
        noun = "kernel launches" if device_kind == "cuda" else "op calls"
        count = f"{launches / steps:,.0f} {noun} per step" if per_step else f"{launches:,} {noun}"
        parts.append(count)
    if host_bound and bound in ("compute", "memory", "balanced"):
        roof_kind = {"compute": "compute roof", "memory": "bandwidth roof", "balanced": "roofs"}[bound]
        which = "a step" if per_step else "the stage"
        parts.append(f"at the {roof_label} {roof_kind} {which} would take {_ms(roof_ms)} ms")
    above = _float(split_row.get("above_roof_ms"))
    if not host_bound and above > 0 and not math.isnan(busy) and busy > 0:
        parts.append(f"{_pct(above / busy * 100)} of its {work} time is above the roof")
    if top_ops:
        parts += _ops_phrases(top_ops, op_notes, busy, work)
    return f"{stage}: " + "; ".join(parts)


def _bound_phrase(row: Mapping[str, object], prefix: str, bound: object, roof_label: str, dtype: str) -> str:
    """ "compute-bound (8.6 FLOP/B, ridge 4.2): 10% of the calibrated float32 compute roof" and the like."""
    intensity, ridge = _float(row.get("intensity")), _float(row[prefix + "ridge"])
    pct = _pct(_float(row[prefix + "pct_roof_wall"]))
    if bound == "balanced":
        return (
            f"balanced ({_intensity(intensity)} FLOP/B, within {BALANCED_BAND:.0%} of the ridge "
            f"{_intensity(ridge)}: compute and bandwidth bind alike): {pct} of the {roof_label} roofline"
        )
    roof_name = f"{roof_label} {dtype} compute" if bound == "compute" else f"{roof_label} bandwidth"
    return f"{bound}-bound ({_intensity(intensity)} FLOP/B, ridge {_intensity(ridge)}): {pct} of the {roof_name} roof"


def _ops_phrases(
    top_ops: Sequence[tuple[str, float]],
    op_notes: Sequence[tuple[Sequence[str], str]],
    busy: float,
    work: str,
) -> list[str]:
    """The longest ops with their share of the busy time, and the model's notes on them."""
    ranked = sorted(((name, float(ms)) for name, ms in top_ops), key=lambda pair: -pair[1])
    if math.isnan(busy) or busy <= 0:
        name, ms = ranked[0]
        return [f"top {work}: {_short(name)} ({_ms(ms)} ms)"]
    named, held = [], 0.0
    for name, ms in ranked[:_MAX_OPS]:
        named.append((name, ms))
        held += ms
        if held >= OPS_SHARE * busy:
            break
    listed = ", ".join(f"{_short(name)} {_pct(ms / busy * 100)}" for name, ms in named)
    phrases = [f"longest {work}s: {listed} of {_ms(busy)} ms {work} time"]
    times = dict(ranked)
    for ops, note in op_notes:
        if any(name in ops for name, _ in named):
            share = sum(times.get(op, 0.0) for op in ops) / busy * 100
            phrases.append(f"{' and '.join(_short(op) for op in ops)} ({_pct(share)}): {note}")
    return phrases


def headline(
    table: pd.DataFrame,
    roofs: Sequence[RoofLike],
    dtype: str,
    *,
    compute_stages: Mapping[str, Sequence[str]],
    bandwidth_stages: Mapping[str, Sequence[str]],
) -> dict[str, dict]:
    """Utilisation of stage groups, in %, per roof (keyed by its label) and time basis.

    A group's stages are summed (rows whose ``stage`` equals one of the names; module rows
    ``stage/family`` are not counted), with ΣF FLOPs, ΣB bytes and Σt the wall or busy time:

    - ``flop_utilisation_pct`` of the ``compute_stages`` groups = ΣF / (Σt · 1e-3) / P · 100;
    - ``bandwidth_utilisation_pct`` of the ``bandwidth_stages`` groups = ΣB / (Σt · 1e-3) / W · 100;
    - ``roof_utilisation_pct`` of every group of either: the roof that binds the group as a
      whole (``bound`` by ΣF/ΣB against the ridge P/W, ``balanced`` within
      :data:`BALANCED_BAND` of it) and the utilisation of that roof,
      max(ΣF / P, ΣB / W) / (Σt · 1e-3) · 100, which is the FLOP utilisation of a
      compute-bound group and the bandwidth utilisation of a memory-bound one.

    A group none of whose stages is in the table (e.g. vision in a text-only run), or with a
    zero or NaN summed time, gives NaN; a group only partly in the table is an error.

    ``{"flop_utilisation_pct": {"vision": {"datasheet": {"wall": 6.8, "busy": 7.5}}}, ...,
    "roof_utilisation_pct": {"prefill": {"datasheet": {"bound": "memory", "intensity": 120.0,
    "ridge": 295.0, "wall": 35.1, "busy": 40.2}}}}``
    """
    result: dict[str, dict] = {}
    for key, groups, metric in (
        ("flop_utilisation_pct", compute_stages, "flops"),
        ("bandwidth_utilisation_pct", bandwidth_stages, "bytes"),
    ):
        result[key] = {}
        for group, stages in groups.items():
            amount, times = _group_sum(table, group, stages, metric)
            result[key][group] = {
                roof.label: {
                    basis: _safe_div(amount, ms * 1e-3)
                    / (roof.peak(dtype) if metric == "flops" else roof.byte_s)
                    * 100
                    for basis, ms in times.items()
                }
                for roof in roofs
            }
    result["roof_utilisation_pct"] = {}
    for group, stages in {**compute_stages, **bandwidth_stages}.items():
        flops, times = _group_sum(table, group, stages, "flops")
        nbytes, _ = _group_sum(table, group, stages, "bytes")
        result["roof_utilisation_pct"][group] = {
            roof.label: _binding(flops, nbytes, times, roof.peak(dtype), roof.byte_s) for roof in roofs
        }
    return result


def _binding(flops: float, nbytes: float, times: Mapping[str, float], peak: float, byte_s: float) -> dict:
    """The roof that binds ΣF FLOPs and ΣB bytes, and its utilisation over each time basis."""
    ridge = peak / byte_s
    intensity = _safe_div(flops, nbytes)
    compute_s, memory_s = flops / peak, nbytes / byte_s
    roof_s = float("nan") if math.isnan(compute_s) or math.isnan(memory_s) else max(compute_s, memory_s)
    if math.isnan(roof_s) or roof_s == 0:
        bound = "unknown" if math.isnan(roof_s) else "none"
    elif abs(intensity - ridge) <= BALANCED_BAND * ridge:
        bound = "balanced"
    else:
        bound = "compute" if compute_s >= memory_s else "memory"
    return {
        "bound": bound,
        "intensity": intensity,
        "ridge": ridge,
        **{basis: _safe_div(roof_s, ms * 1e-3) * 100 for basis, ms in times.items()},
    }


def _group_sum(
    table: pd.DataFrame, group: str, stages: Sequence[str], metric: str
) -> tuple[float, dict[str, float]]:
    """ΣF or ΣB and the summed wall and busy times of the named stages (NaN if any is NaN)."""
    if isinstance(stages, str):
        raise TypeError(f"headline: group {group!r} must list stage names, not the string {stages!r}")
    rows = table[table["stage"].isin(list(stages))]
    present = set(rows["stage"])
    if not present:
        nan = float("nan")
        return nan, {"wall": nan, "busy": nan}
    absent = [s for s in stages if s not in present]
    if absent:
        raise ValueError(f"headline: group {group!r} has stages {sorted(present)} but not {absent}")
    return (
        float(rows[metric].sum(skipna=False)),
        {basis: float(rows[column].sum(skipna=False)) for basis, column in _TIME_BASES.items()},
    )


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    """The column as float64, NaN for missing values; negative values are a caller's bug."""
    values = pd.to_numeric(df[name], errors="raise").to_numpy(dtype=float, na_value=np.nan)
    if (values < 0).any():
        raise ValueError(f"column {name!r} has negative values: {values[values < 0].tolist()}")
    return values


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0 or NaN (never inf)."""
    safe = np.where(den > 0, den, np.nan)
    return num / safe


def _safe_div(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _float(value: object) -> float:
    return float("nan") if value is None or pd.isna(value) else float(value)


def _busy_phrase(busy: float, wall: float, device_kind: str, unit: str) -> str:
    share = _pct(_safe_div(min(busy, wall), wall) * 100)
    if device_kind == "cuda":
        return f"the GPU is busy {share} of the {unit}"
    return f"op time is {share} of the {unit}"


def _short(name: str) -> str:
    return name if len(name) <= _MAX_OP_NAME else name[: _MAX_OP_NAME - 1] + "…"


def _intensity(value: float) -> str:
    return "?" if math.isnan(value) else f"{value:.2g}" if value < 10 else f"{value:,.0f}"


def _ms(value: float) -> str:
    """3 significant digits without an exponent up to 1000 ms; whole ms with separators above."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _pct(value: float) -> str:
    if math.isnan(value):
        return "?%"
    return f"{value:.2g}%" if value < 10 else f"{value:.0f}%"
