"""The per-stage roofline table: measured time joined with the analytic work of each stage,
against the hardware ceilings, with the split of each stage's time and a verdict in words.

    table = stage_table(measurement, costs, roofs, dtype, device_kind)   # costs: the model's StageCosts

or, from what run.json holds (the per-run samples, the analytic stage totals) and any
:class:`~llm_perf_opt.profiling.attribution.Attribution` (the trace pass's, or one imported
from Nsight Systems)::

    table = stage_table_from(measured_table(stages, runs, attribution), work_table(record.analytic),
                             attribution, roofs, dtype, device_kind, steps)   # record: a RunRecord

One row per stage (`Stage` order). Columns, in groups:

* measured: `calls` per run, `repeats` (timed runs), `time_ms` (median over the timed runs of
  the stage's total), its spread `time_ms_min/max/stdev`, `time_ms_cv_pct` (stdev / mean, %),
  `time_ms_p90` (10 runs or more) and `outlier_runs` (runs above 1.5x the median), `busy_ms`
  and `busy_share_pct` (op or kernel time of the trace pass, and its % of all of it),
  `launches` (kernels, or CPU ops, the trace attributes to the stage);
* OS counters (`report.os_table`): per counter `user_ms`, `sys_ms`, `minor_faults`,
  `major_faults`, `voluntary_switches`, `involuntary_switches` the median over the timed runs and
  `_min`/`_max`, and `sys_share_pct` (system time's share of the stage's CPU time);
* analytic: `flops` (useful FLOPs, 2 per multiply-add), `bytes` and its parts
  `weight_bytes`, `act_bytes`, `kv_bytes`;
* roofline (`report.roofline.roofline_table`): `intensity`, `achieved_*_{wall,busy}`, and
  per roof `<roof>_ridge/attainable_tflop_s/roofline_ms/pct_roof_wall/pct_roof_busy/bound`;
* split (against the first roof, `report.roofline.time_split`): `split_roofline_ms`,
  `above_roof_ms`, `host_ms` (adding up to `time_ms`; `unsplit_ms` holds what cannot be
  split, e.g. without a trace), `overlap_ms`; and the CPU's split of the same time
  (`report.os_table.cpu_split`): `split_user_ms + split_sys_ms + split_idle_ms` (= `time_ms`);
* `verdict`: one line in words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from llm_perf_opt.models.interface import OpNote, StageCosts
from llm_perf_opt.profiling.attribution import Attribution
from llm_perf_opt.profiling.passes import Measurement
from llm_perf_opt.profiling.timing import summarize
from llm_perf_opt.runners.ranges import stage_of

from .os_table import OsRuns, cpu_split, fault_phrase, os_columns
from .record import Analytic
from .roofline import RoofLike, roof_prefix, roofline_table, time_split, verdict

#: Ops or kernels listed per stage in report.md.
TOP_OPS = 5
#: Columns of :func:`measured_table`.
MEASURED_COLUMNS = (
    "stage",
    "calls",
    "repeats",
    "time_ms",
    "time_ms_min",
    "time_ms_max",
    "time_ms_stdev",
    "time_ms_cv_pct",
    "time_ms_p90",
    "outlier_runs",
    "busy_ms",
    "busy_share_pct",
    "launches",
)
#: Columns of whole counts (nullable: a range without runs or kernels has none).
COUNT_COLUMNS = ("calls", "repeats", "outlier_runs", "launches")


def measured_table(
    stages: Sequence[str],
    runs: Sequence[Mapping[str, Sequence[float]]],
    attribution: Attribution | None,
    os_runs: OsRuns = (),
) -> pd.DataFrame:
    """Per stage: calls per run, the median and spread (:func:`~llm_perf_opt.profiling.timing.summarize`)
    over the runs of its total time per run, the busy time, share and launches of
    ``attribution``, and the OS counters of ``os_runs`` (:func:`~.os_table.os_columns`; NaN
    without them and on nested ranges). ``runs`` holds one ``{stage: [ms per call]}`` per timed
    run (``RunSample.stages``, ``timing.samples[i].stages`` of run.json), ``os_runs`` the
    counters of the same runs (``RunSample.os``, ``timing.samples[i].os``)."""
    busy = {}
    if attribution is not None:
        busy = attribution.stages.set_index("stage")[["busy_ms", "share"]].to_dict("index")
    launches = stage_launches(attribution)
    # Nested `stage/family` ranges (module granularity) follow their stage; the trace is their
    # only measurement, so they have busy time but no measured time.
    families = {}
    if attribution is not None:
        for name in attribution.stages["stage"]:
            if name != stage_of(name):
                families.setdefault(stage_of(name), []).append(name)
    rows = []
    for stage in (row for top in stages for row in (top, *families.get(top, []))):
        spread = summarize([sum(run.get(stage, [])) for run in runs]) if stage in stages and runs else {}
        share = busy.get(stage, {}).get("share")
        rows.append(
            {
                "stage": stage,
                "calls": len(runs[0].get(stage, [])) if runs else 0,
                "repeats": spread.get("n"),
                "time_ms": spread.get("median"),
                "time_ms_min": spread.get("min"),
                "time_ms_max": spread.get("max"),
                "time_ms_stdev": spread.get("stdev"),
                "time_ms_cv_pct": None if not spread else spread["cv"] * 100,
                "time_ms_p90": spread.get("p90"),
                "outlier_runs": None if not spread else len(spread["outliers"]),
                "busy_ms": busy.get(stage, {}).get("busy_ms"),
                "busy_share_pct": None if share is None else share * 100,
                "launches": launches.get(stage),
            }
        )
    # Missing figures (no trace, no runs) are NaN (<NA> for counts), so every column stays numeric.
    numeric = [c for c in MEASURED_COLUMNS if c != "stage" and c not in COUNT_COLUMNS]
    table = pd.DataFrame(rows, columns=list(MEASURED_COLUMNS)).astype({c: "float64" for c in numeric})
    table = table.astype({c: "Int64" for c in COUNT_COLUMNS})
    return table.merge(os_columns(stages, os_runs), on="stage", how="left")


def steps_per_stage(per_step: Iterable[str], runs: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, int]:
    """Calls in the first run of each per-step stage (the decode steps), for per-step verdicts."""
    return {stage: len(runs[0].get(stage, [])) for stage in per_step} if runs else {}


def stage_launches(attribution: Attribution | None) -> dict[str, int]:
    """Kernels (or CPU ops on a CPU trace) per stage, nested `stage/family` ranges included, and
    per `stage/family` range (its own)."""
    if attribution is None:
        return {}
    kernels = attribution.kernels
    # Rounded, not truncated: imported calls can be per-run averages (see report.from_nsys).
    per_stage = kernels.groupby(kernels["stage"].map(stage_of))["calls"].sum()
    per_family = kernels[kernels["stage"] != kernels["stage"].map(stage_of)].groupby("stage")["calls"].sum()
    return pd.concat([per_stage, per_family]).round().astype(int).to_dict()


def work_table(analytic: Analytic) -> pd.DataFrame:
    """Per stage of a run record's analytic model, whole run (``analytic.stages``, scope "run"),
    then per nested ``stage/family`` range (``analytic.ranges``): useful FLOPs and bytes by category."""
    rows = [*analytic.stage_rows("run"), *analytic.ranges]
    return pd.DataFrame(
        {
            "stage": [r.stage for r in rows],
            "flops": [r.useful_flops for r in rows],
            "bytes": [r.bytes for r in rows],
            "weight_bytes": [r.weight_bytes for r in rows],
            "act_bytes": [r.act_read_bytes + r.act_write_bytes for r in rows],
            "kv_bytes": [r.kv_read_bytes + r.kv_write_bytes for r in rows],
        }
    )


def top_ops(
    attribution: Attribution | None, stage: str, n: int = TOP_OPS, exact: bool = False
) -> list[tuple[str, float, float]]:
    """The stage's n longest ops or kernels (nested ranges included; with ``exact``, the ops of
    this very range, e.g. a nested ``stage/family``): (name, total ms, calls). Calls are whole
    numbers except for per-run averages (report.from_nsys)."""
    if attribution is None:
        return []
    k = attribution.kernels
    ranges = k["stage"] if exact else k["stage"].map(stage_of)
    mine = k[ranges == stage].groupby("name")[["total_ms", "calls"]].sum()
    mine = mine.sort_values("total_ms", ascending=False).head(n)
    return [(name, float(row.total_ms), float(row.calls)) for name, row in mine.iterrows()]


def work_of(costs: StageCosts) -> pd.DataFrame:
    """:func:`work_table` of a live run's typed analytic costs: its stages, then its nested ranges."""
    rows = [*costs.stages.items(), *costs.ranges.items()]
    return pd.DataFrame(
        {
            "stage": [name for name, _ in rows],
            "flops": [w.useful_flops for _, w in rows],
            "bytes": [w.bytes for _, w in rows],
            "weight_bytes": [w.weight_bytes for _, w in rows],
            "act_bytes": [w.act_bytes for _, w in rows],
            "kv_bytes": [w.kv_bytes for _, w in rows],
        }
    )


def stage_table(
    m: Measurement,
    costs: StageCosts,
    roofs: Sequence[RoofLike],
    dtype: str,
    device_kind: str,
    op_notes: Sequence[OpNote] = (),
    *,
    threads: int = 1,
    allocator: str | None = None,
) -> pd.DataFrame:
    """The joined table of the module docstring for a live measurement (``threads`` and
    ``allocator``: see :func:`stage_table_from`)."""
    runs = [r.stages for r in m.runs]
    return stage_table_from(
        measured_table([s.name for s in m.stages], runs, m.attribution, m.os_runs()),
        work_of(costs),
        m.attribution,
        roofs,
        dtype,
        device_kind,
        steps_per_stage([s.name for s in m.stages if s.per_step], runs),
        op_notes,
        threads=threads,
        allocator=allocator,
    )


def stage_table_from(
    measured: pd.DataFrame,
    work: pd.DataFrame,
    attribution: Attribution | None,
    roofs: Sequence[RoofLike],
    dtype: str,
    device_kind: str,
    steps: Mapping[str, int],
    op_notes: Sequence[OpNote] = (),
    *,
    threads: int = 1,
    allocator: str | None = None,
) -> pd.DataFrame:
    """The joined table of :func:`measured_table` and :func:`work_table`; the split and verdicts
    use ``roofs[0]``, ``steps`` (:func:`steps_per_stage`) turns per-step stages' verdicts per
    step, and the verdicts quote the model's ``op_notes`` on the ops that hold a stage's time.
    The CPU split spreads each stage's CPU time over ``threads`` (:func:`~.os_table.cpu_split`),
    and a stage whose system time is large names its page faults with the remedy for the
    ``allocator`` in force (:func:`~.os_table.fault_phrase`).

    A nested ``stage/family`` range is measured by the trace pass only: its split and verdict
    are over its op (kernel) time, with no host part (the enclosing stage has it)."""
    joined = measured.merge(work, on="stage", how="left")
    table = roofline_table(joined, roofs, dtype)
    nested = table["stage"] != table["stage"].map(stage_of)
    # Over op time for nested ranges: their busy time stands for their time in the split and the verdict.
    basis = table.assign(time_ms=table["time_ms"].where(~nested, table["busy_ms"]))
    basis[roof_prefix(roofs[0].label) + "pct_roof_wall"] = table[
        roof_prefix(roofs[0].label) + "pct_roof_wall"
    ].where(~nested, table[roof_prefix(roofs[0].label) + "pct_roof_busy"])
    split = time_split(basis, roofs[0].label)
    split.loc[nested, "host_ms"] = float("nan")
    split.loc[nested, "overlap_ms"] = float("nan")
    table["verdict"] = [
        verdict(
            row,
            split.loc[i],
            roofs[0].label,
            dtype,
            launches=None if pd.isna(row["launches"]) else int(row["launches"]),
            steps=steps.get(row["stage"]) or None,
            top_ops=[
                (name, ms) for name, ms, _ in top_ops(attribution, row["stage"], TOP_OPS, exact=nested[i])
            ],
            op_notes=[(note.ops, note.note) for note in op_notes if note.stage == stage_of(row["stage"])],
            device_kind=device_kind,
        )
        + (" (over op time: a nested range is timed by the trace pass only)" if nested[i] else "")
        + ("" if (faults := fault_phrase(row, allocator)) is None else f"; {faults}")
        for i, row in basis.iterrows()
    ]
    parts = split[["roofline_ms", "above_roof_ms", "host_ms", "unsplit_ms", "overlap_ms"]].rename(
        columns={"roofline_ms": "split_roofline_ms"}
    )
    return pd.concat([table, parts, cpu_split(table, threads)], axis=1)
