"""The OS counters of each stage range: scripted readings give exact per-call changes, and the
real getrusage counts the pages a stage touches for the first time."""

from __future__ import annotations

import mmap
import resource
import time

import pytest

from llm_perf_opt.profiling.os_counters import COUNTERS, OsCounters, read_rusage
from llm_perf_opt.runners.ranges import listening, module_range, stage_range


class Readings:
    """Scripted getrusage readings, one per call."""

    def __init__(self, *readings):
        self._readings = iter(readings)

    def __call__(self):
        return next(self._readings)


def test_each_call_gets_the_change_between_its_entry_and_exit():
    counters = OsCounters(
        Readings(
            (10.0, 1.0, 100, 0, 5, 1),  # prefill enters
            (14.0, 3.0, 150, 1, 7, 1),  # prefill exits: +4 ms user, +2 ms sys, +50 faults, ...
            (20.0, 3.0, 150, 1, 7, 1),  # decode, twice
            (21.0, 3.5, 151, 1, 8, 3),
            (21.0, 3.5, 151, 1, 8, 3),
            (23.0, 3.5, 151, 1, 8, 4),
        )
    )
    with listening(counters):
        with stage_range("prefill"), module_range("prefill", "attn"):  # the nested range takes no reading
            pass
        for _ in range(2):
            with stage_range("decode"):
                pass
    samples = counters.samples()
    assert samples["prefill"] == {
        "user_ms": [4.0],
        "sys_ms": [2.0],
        "minor_faults": [50],
        "major_faults": [1],
        "voluntary_switches": [2],
        "involuntary_switches": [0],
    }
    assert samples["decode"]["user_ms"] == [1.0, 2.0]
    assert samples["decode"]["sys_ms"] == [0.5, 0.0]
    assert samples["decode"]["involuntary_switches"] == [2, 1]
    assert list(samples["decode"]) == list(COUNTERS)


def test_touching_fresh_pages_inside_a_stage_counts_one_minor_fault_per_page():
    # 16 MiB of fresh anonymous memory, 4 KiB pages (no transparent huge pages), one byte written
    # in each: the kernel maps and zeroes each page on its first touch, one minor fault apiece.
    page = resource.getpagesize()
    pages = (16 << 20) // page
    counters = OsCounters()
    with mmap.mmap(-1, pages * page) as memory:
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            memory.madvise(mmap.MADV_NOHUGEPAGE)
        with listening(counters), stage_range("sam"):
            for i in range(pages):
                memory[i * page] = 1
    (faults,) = counters.samples()["sam"]["minor_faults"]
    assert pages <= faults < pages + 200  # the interpreter's own few pages beside them


def test_cpu_time_of_a_stage_agrees_with_the_process_cpu_clock():
    # Busy until the process's CPU clock (clock_gettime, not getrusage) has advanced 100 ms, however
    # much of the wall time other processes take meanwhile.
    counters = OsCounters()
    with listening(counters), stage_range("prefill"):
        start = time.process_time()
        while time.process_time() - start < 0.1:
            pass
    sample = counters.samples()["prefill"]
    cpu = sample["user_ms"][0] + sample["sys_ms"][0]
    assert 100 - 5 <= cpu <= 100 + 20  # within a scheduler tick; the memory sampler's thread adds little


def test_a_reading_is_the_process_so_far():
    before = read_rusage()
    after = read_rusage()
    assert len(before) == len(COUNTERS)
    assert all(b >= a for a, b in zip(before, after))
    assert before[0] == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_utime * 1e3, abs=50)
