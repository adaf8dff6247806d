"""Measured memory, each figure named for what it covers.

- process peak RSS (`getrusage`): the whole process lifetime, model build included;
- resident-memory peak over a block (CPU): a background thread samples the current RSS;
- allocator peaks over a block (CUDA): `max_memory_allocated` / `max_memory_reserved` after a
  reset, always for an explicit device so that a run on cuda:1 does not read cuda:0.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STATM = Path("/proc/self/statm")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    ru_maxrss is in KiB on Linux and in bytes on macOS.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss_bytes(statm: Path = STATM) -> int:
    """Resident set size now: /proc/self/statm's second field (pages) times the page size.

    Where /proc is absent, the process peak so far, which can only overstate the current value.
    """
    try:
        resident_pages = int(statm.read_text().split()[1])
    except OSError:
        return peak_rss_bytes()
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def rss_source(interval_s: float, statm: Path = STATM) -> str:
    """What `RssSampler` reads here, for the record."""
    if statm.exists():
        return f"{statm} resident pages, sampled every {interval_s * 1e3:g} ms"
    return "ru_maxrss (no /proc here): process peak so far, sampled"


class RssSampler:
    """Peak resident memory over a `with` block, sampled by a daemon thread.

    Samples at entry, every `interval_s` while the block runs, and at exit, so that even a
    block shorter than the interval has a value. A peak that rises and falls between two samples
    is missed; that is the price of not instrumenting the allocator.
    """

    def __init__(self, interval_s: float = 0.01, read_rss: Callable[[], int] = current_rss_bytes) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._read = read_rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_bytes = 0
        self.peak_bytes = 0
        self.samples = 0

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._read())
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> RssSampler:
        if self._thread is not None:
            raise RuntimeError("an RssSampler measures one block; create a new one")
        self.start_bytes = self._read()
        self.peak_bytes = self.start_bytes
        self.samples = 1
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The thread is joined before the last sample, so only one thread updates the peak at a time.
        self._stop.set()
        self._thread.join()
        self._sample()


class CudaPeaks:
    """Allocator peaks of one CUDA device over a `with` block.

    Resets that device's peak statistics at entry and reads them at exit. No synchronisation is
    needed: the caching allocator counts on the host, when an allocation is requested, not when
    the kernels using it run. `cuda` is the torch.cuda namespace, a parameter for tests.
    """

    def __init__(self, device: torch.device, cuda: Any = torch.cuda) -> None:
        self.device = device
        self._cuda = cuda
        self.allocated_bytes: int | None = None
        self.reserved_bytes: int | None = None

    def __enter__(self) -> CudaPeaks:
        self._cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.allocated_bytes = self._cuda.max_memory_allocated(self.device)
        self.reserved_bytes = self._cuda.max_memory_reserved(self.device)


TIMED = "over the timed repeats"
PEAK_RSS_SOURCE = "getrusage ru_maxrss: process lifetime, model build and weight init included"


@dataclass(frozen=True)
class MemoryFigures:
    """The measured memory figures of a run, each with where it comes from.

    `timed_rss_peak_bytes`: resident peak over the timed repeats (CPU runs);
    `peak_allocated_bytes` / `peak_reserved_bytes`: CUDA allocator peaks over the timed repeats.
    """

    peak_rss_bytes: int
    timed_rss_peak_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unexplained = [name for name in self._figures() if name not in self.sources]
        if unexplained:
            raise ValueError(f"memory figures without a source: {', '.join(unexplained)}")

    def _figures(self) -> dict[str, int]:
        figures = {
            "peak_rss_bytes": self.peak_rss_bytes,
            "timed_rss_peak_bytes": self.timed_rss_peak_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
        }
        return {name: value for name, value in figures.items() if value is not None}

    @classmethod
    def collect(cls, *, rss: RssSampler | None = None, cuda: CudaPeaks | None = None) -> MemoryFigures:
        """The process peak now, plus the block peaks of whichever samplers ran."""
        sources = {"peak_rss_bytes": PEAK_RSS_SOURCE}
        timed_rss = None
        if rss is not None:
            timed_rss = rss.peak_bytes
            sources["timed_rss_peak_bytes"] = f"{rss_source(rss.interval_s)}, {TIMED}"
        allocated = reserved = None
        if cuda is not None:
            if cuda.allocated_bytes is None:
                raise ValueError("CudaPeaks read before its block ended")
            allocated, reserved = cuda.allocated_bytes, cuda.reserved_bytes
            sources["peak_allocated_bytes"] = f"torch.cuda.max_memory_allocated({cuda.device}) {TIMED}"
            sources["peak_reserved_bytes"] = f"torch.cuda.max_memory_reserved({cuda.device}) {TIMED}"
        return cls(peak_rss_bytes(), timed_rss, allocated, reserved, sources)

    def as_dict(self) -> dict[str, Any]:
        """For run.json: the figures present, in bytes, and a `sources` map naming each one's origin."""
        figures = self._figures()
        return {**figures, "sources": {name: self.sources[name] for name in figures}}
