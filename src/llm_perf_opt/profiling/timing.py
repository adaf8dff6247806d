"""Timing primitives for the timing pass: per-stage wall-time samples and their summary.

On CUDA a region is timed with a pair of ``torch.cuda.Event(enable_timing=True)`` recorded
on the current stream. Elapsed times are read only in :meth:`StageTimer.samples`, after a
single ``torch.cuda.synchronize()``, so timing adds no host/device synchronisation between
stages. The measured time is stream time from the start event to the end event, which
includes idle gaps while the host is still launching work for that region.

On CPU a region is timed with ``time.perf_counter`` (the work is synchronous there).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from llm_perf_opt.errors import UserError


class StageTimer:
    """Collects raw timing samples, in milliseconds, per region name (one sample per call).

    ``clock`` is the host clock used on CPU, in seconds; tests replace it.
    """

    def __init__(self, device: str | torch.device, *, clock: Callable[[], float] = time.perf_counter):
        try:
            kind = torch.device(device).type
        except RuntimeError as err:
            raise UserError(f"invalid device {device!r}: {err}") from None
        if kind not in ("cpu", "cuda"):
            raise UserError(f"stage timing supports cpu and cuda devices, not {kind!r}")
        self._cuda = kind == "cuda"
        self._clock = clock
        self._samples: defaultdict[str, list[float]] = defaultdict(list)
        # CUDA event pairs not read yet, in recording order.
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the block as one sample of ``name``; regions may nest."""
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = self._clock()
            yield
            self._samples[name].append((self._clock() - t0) * 1e3)

    def samples(self) -> dict[str, list[float]]:
        """All samples so far: region name -> milliseconds per call, in call order.

        On CUDA this waits once for the device to finish the recorded work.
        """
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self._samples[name].append(start.elapsed_time(end))
            self._pending.clear()
        return {name: list(values) for name, values in self._samples.items()}


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Summary statistics of timing samples (milliseconds in, milliseconds out).

    Returns ``n``, ``median``, ``mean``, ``min``, ``max``, ``p90`` (linear interpolation
    between order statistics, as numpy's default percentile) and ``stdev`` (sample standard
    deviation; 0.0 for a single sample). Raises ``ValueError`` for no samples.
    """
    if not samples:
        raise ValueError("cannot summarize an empty list of samples")
    ordered = sorted(float(x) for x in samples)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p90": _percentile(ordered, 0.9),
        "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
    }


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, interpolating linearly between neighbours."""
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)
