"""What the operating system did during each stage range: the process's CPU time in user and
kernel mode, its page faults and its context switches.

:class:`OsCounters` listens to stage events (`llm_perf_opt.runners.ranges.listening`) and reads
``getrusage(RUSAGE_SELF)`` at the entry and the exit of every top-level stage range; a call's
counters are the change between the two. ``RUSAGE_SELF`` covers every thread of the process: the
intra-op (OpenMP) threads that do a CPU stage's work, and also the memory sampler's thread, which
wakes every 10 ms (a few voluntary switches per stage, a negligible CPU time).

On a CPU this is where a stage's time goes below the op: an allocator that maps and unmaps every
large tensor makes the kernel zero fresh pages on their first touch (minor faults, system time).
On a GPU the counters describe the host side of each stage (the launching thread and the
driver's), which is where host-bound prefill and decode spend their time.

Precision: Linux accounts the total CPU time to the nanosecond but splits it between user and
system time by sampling at the scheduler tick (4 ms at HZ=250), so the split of a stage shorter
than a few ticks is coarse. One reading costs one system call (about a microsecond; measured by
``benchmarks/range_overhead.py``).
"""

from __future__ import annotations

import resource
from collections import defaultdict
from collections.abc import Callable

from llm_perf_opt.runners.ranges import SEPARATOR

#: The counters of one stage call, in this order: CPU times in ms (summed over the threads), counts.
COUNTERS = (
    "user_ms",
    "sys_ms",
    "minor_faults",
    "major_faults",
    "voluntary_switches",
    "involuntary_switches",
)

Reading = tuple[float, float, int, int, int, int]


def read_rusage() -> Reading:
    """This process's counters so far, in :data:`COUNTERS` order."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime * 1e3, r.ru_stime * 1e3, r.ru_minflt, r.ru_majflt, r.ru_nvcsw, r.ru_nivcsw)


class OsCounters:
    """Per top-level stage range, the counters of each call (nested ``stage/family`` ranges are
    not counted). ``read`` gives the process's counters so far; tests replace it."""

    def __init__(self, read: Callable[[], Reading] = read_rusage):
        self._read = read
        self._open: defaultdict[str, list[Reading]] = defaultdict(list)  # name -> stack of entry readings
        self._calls: defaultdict[str, list[Reading]] = defaultdict(list)

    def stage_entered(self, name: str) -> None:
        if SEPARATOR not in name:
            self._open[name].append(self._read())

    def stage_exited(self, name: str) -> None:
        if SEPARATOR not in name:
            end, start = self._read(), self._open[name].pop()
            self._calls[name].append(tuple(b - a for a, b in zip(start, end)))

    def samples(self) -> dict[str, dict[str, list[float]]]:
        """Stage -> counter -> its value in each call, in call order."""
        return {
            stage: {counter: [call[i] for call in calls] for i, counter in enumerate(COUNTERS)}
            for stage, calls in self._calls.items()
        }
