"""OS counters in the stage table: medians and spread over the runs, the CPU split of a stage's
time, the verdict's words on page faults."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from llm_perf_opt.report.os_table import MIN_CPU_MS, cpu_split, fault_phrase, os_columns


def _call(user, sys, minor=0):
    return {
        "user_ms": [user],
        "sys_ms": [sys],
        "minor_faults": [minor],
        "major_faults": [0],
        "voluntary_switches": [1],
        "involuntary_switches": [0],
    }


def test_median_and_spread_over_the_runs_of_each_stages_total():
    runs = [
        {"sam": _call(80.0, 20.0, 1000), "decode": {**_call(1.0, 0.0), "user_ms": [1.0, 2.0]}},
        {"sam": _call(90.0, 10.0, 3000), "decode": {**_call(1.0, 0.0), "user_ms": [2.0, 2.0]}},
        {"sam": _call(70.0, 30.0, 2000), "decode": {**_call(1.0, 0.0), "user_ms": [3.0, 3.0]}},
    ]
    table = os_columns(["sam", "decode", "clip"], runs).set_index("stage")
    sam = table.loc["sam"]
    assert (sam["user_ms"], sam["user_ms_min"], sam["user_ms_max"]) == (80.0, 70.0, 90.0)
    assert (sam["minor_faults"], sam["minor_faults_min"], sam["minor_faults_max"]) == (2000, 1000, 3000)
    assert sam["sys_share_pct"] == pytest.approx(20.0)  # per run 20, 10, 30 % of 100 ms
    assert table.loc["decode", "user_ms"] == 4.0  # per run 3, 4, 6 ms over the two calls
    assert table.loc["clip"].isna().all()  # no counters for it


def test_the_cpu_split_adds_up_to_the_stage_time():
    table = pd.DataFrame(
        {
            "time_ms": [100.0, 100.0, 100.0, float("nan")],
            "user_ms": [120.0, 300.0, 0.0, 1.0],
            "sys_ms": [40.0, 100.0, 0.0, 1.0],
        }
    )
    split = cpu_split(table, threads=2)
    # 160 ms of CPU in 100 ms of 2 threads: 80 % busy, 3/4 of that in user mode.
    assert split.loc[0].tolist() == pytest.approx([60.0, 20.0, 20.0])
    # More CPU time than the threads hold (other threads of the process): capped at busy.
    assert split.loc[1].tolist() == pytest.approx([75.0, 25.0, 0.0])
    assert split.loc[2].tolist() == pytest.approx([0.0, 0.0, 100.0])
    assert split.loc[3].isna().all()
    with pytest.raises(ValueError):
        cpu_split(table, threads=0)


def test_page_faults_are_named_above_a_tenth_of_the_cpu_time_with_the_remedy():
    row = {"sys_share_pct": 31.0, "user_ms": 700.0, "sys_ms": 315.0, "minor_faults": 1.2e6, "major_faults": 0}
    text = fault_phrase(row, "system")
    assert text.startswith("page faults: system time is 31% of its CPU time (1,200,000 page faults)")
    assert "cpu.allocator=tuned" in text
    assert "try another" in fault_phrase(row, "tuned")
    assert fault_phrase({**row, "sys_share_pct": 10.0}, "system") is None  # not above 10 %
    short = {**row, "user_ms": MIN_CPU_MS * 0.5, "sys_ms": MIN_CPU_MS * 0.4}
    assert fault_phrase(short, "system") is None  # a few scheduler ticks: too coarse to judge
    assert fault_phrase({**row, "sys_share_pct": math.nan}, "system") is None
