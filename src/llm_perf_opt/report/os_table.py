"""The OS counters of each stage (`profiling.os_counters`) as stage-table columns, the split of a
stage's time into user, system and idle CPU time, and the verdict's words on page faults.

Columns per counter ``c`` of :data:`~llm_perf_opt.profiling.os_counters.COUNTERS`: ``c`` (the
median over the timed runs of the stage's total), ``c_min``, ``c_max``; and ``sys_share_pct``, the
median over the runs of the system time's share of the stage's CPU time, sys / (user + sys).

The split: a stage's time w holds w × threads of CPU capacity, spent in user mode, in the kernel,
or idle (waiting: for a barrier, the memory, the GPU). With u and s the CPU times,
b = min((u + s) / (w × threads), 1) the busy share of that capacity:

    split_user_ms = w · b · u / (u + s),   split_sys_ms = w · b · s / (u + s),   split_idle_ms = w · (1 − b)

which add up to w. CPU time above the capacity (other threads of the process) is capped, b = 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from llm_perf_opt.profiling.os_counters import COUNTERS
from llm_perf_opt.profiling.timing import summarize

#: A stage whose system time is more than this share of its CPU time has its page faults named.
SYS_SHARE = 0.10
#: Below this much CPU time a stage's user/system split is a few scheduler ticks: too coarse to judge.
MIN_CPU_MS = 50.0
#: Columns of :func:`os_columns`, after ``stage``.
OS_COLUMNS = (
    *(f"{c}{suffix}" for c in COUNTERS for suffix in ("", "_min", "_max")),
    "sys_share_pct",
)
#: Columns of :func:`cpu_split`.
SPLIT_COLUMNS = ("split_user_ms", "split_sys_ms", "split_idle_ms")

OsRuns = Sequence[Mapping[str, Mapping[str, Sequence[float]]]]


def os_columns(stages: Sequence[str], os_runs: OsRuns) -> pd.DataFrame:
    """Per stage, the counters' median and spread over the runs (``os_runs``: per timed run,
    stage -> counter -> per-call values, as `RunSample.os` and run.json's ``timing.samples[i].os``).
    A stage without counters (a run.json older than them) has NaN."""
    rows = []
    for stage in stages:
        row: dict[str, object] = {"stage": stage}
        calls = [run[stage] for run in os_runs if stage in run]
        for counter in COUNTERS:
            spread = summarize([sum(call[counter]) for call in calls]) if calls else {}
            row[counter], row[f"{counter}_min"], row[f"{counter}_max"] = (
                spread.get("median"),
                spread.get("min"),
                spread.get("max"),
            )
        shares = [
            sum(call["sys_ms"]) / cpu * 100
            for call in calls
            if (cpu := sum(call["user_ms"]) + sum(call["sys_ms"])) > 0
        ]
        row["sys_share_pct"] = statistics.median(shares) if shares else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["stage", *OS_COLUMNS]).astype({c: "float64" for c in OS_COLUMNS})


def cpu_split(table: pd.DataFrame, threads: int) -> pd.DataFrame:
    """The module docstring's split of each row's ``time_ms``, over ``threads`` threads (a CPU
    run's cpu.threads; 1 on a GPU, the thread that launches). NaN where a figure is missing."""
    if threads < 1:
        raise ValueError(f"cpu_split: threads must be at least 1, got {threads}")
    wall = table["time_ms"].to_numpy(dtype=float, na_value=np.nan)
    user = table["user_ms"].to_numpy(dtype=float, na_value=np.nan)
    sys = table["sys_ms"].to_numpy(dtype=float, na_value=np.nan)
    cpu = user + sys
    with np.errstate(invalid="ignore", divide="ignore"):
        busy = np.minimum(np.where(wall > 0, cpu / (wall * threads), np.nan), 1.0)
        user_share = np.where(cpu > 0, user / cpu, 0.0)
    return pd.DataFrame(
        {
            "split_user_ms": wall * busy * user_share,
            "split_sys_ms": wall * busy * (1 - user_share),
            "split_idle_ms": wall * (1 - busy),
        },
        index=table.index,
    )


def fault_phrase(row: Mapping[str, object], allocator: str | None) -> str | None:
    """The verdict's words when the kernel holds more than :data:`SYS_SHARE` of a stage's CPU
    time (and the stage has :data:`MIN_CPU_MS` of it to judge by), with the remedy for the
    ``allocator`` in force; None otherwise."""
    share, user, sys = (_float(row.get(k)) for k in ("sys_share_pct", "user_ms", "sys_ms"))
    if math.isnan(share) or share <= SYS_SHARE * 100 or user + sys < MIN_CPU_MS:
        return None
    faults = _float(row.get("minor_faults")) + _float(row.get("major_faults"))
    if allocator in (None, "system"):
        remedy = "remedy: cpu.allocator=tuned (large allocations kept in the heap)"
    else:
        remedy = (
            f"cpu.allocator={allocator} is in force already: try another of tuned, jemalloc, tcmalloc, "
            "or fewer large temporaries"
        )
    return (
        f"page faults: system time is {share:.0f}% of its CPU time ({faults:,.0f} page faults), "
        f"the kernel mapping and zeroing fresh pages for large allocations; {remedy}"
    )


def _float(value: object) -> float:
    return float("nan") if value is None or pd.isna(value) else float(value)
