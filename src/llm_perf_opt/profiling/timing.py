"""Timing for the timing pass: per-stage wall-time samples and their summary.

:class:`StageTimer` listens to stage events (`llm_perf_opt.runners.ranges.listening`) and
times every top-level stage range; nested `stage/family` ranges are not timed.

On CUDA a region is timed with a pair of ``torch.cuda.Event(enable_timing=True)`` recorded on
the current stream *of the model's device*. Elapsed times are read only in
:meth:`StageTimer.samples`, after one ``torch.cuda.synchronize(device)``, so timing adds no
host/device synchronisation between stages. The measured time is stream time from the start
event to the end event, which includes idle gaps while the host is still launching work.

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

from llm_perf_opt.runners.ranges import SEPARATOR


class StageTimer:
    """Collects raw timing samples, in milliseconds, per region name (one sample per call).

    ``clock`` is the host clock used on CPU, in seconds; tests replace it. ``cuda`` is the
    ``torch.cuda`` module; tests replace it with a recording fake.
    """

    def __init__(
        self, device: torch.device, *, clock: Callable[[], float] = time.perf_counter, cuda=torch.cuda
    ):
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"stage timing supports cpu and cuda devices, not {device.type!r}")
        self._device = device
        self._cuda = cuda if device.type == "cuda" else None
        self._clock = clock
        self._samples: defaultdict[str, list[float]] = defaultdict(list)
        self._open: dict[str, list] = defaultdict(list)  # name -> stack of start marks
        # CUDA event pairs not read yet, in recording order.
        self._pending: list[tuple[str, object, object]] = []

    # -- stage events -----------------------------------------------------------------------------
    def stage_entered(self, name: str) -> None:
        if SEPARATOR not in name:
            self._open[name].append(self._mark())

    def stage_exited(self, name: str) -> None:
        if SEPARATOR not in name:
            self._close(name, self._open[name].pop())

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the block as one sample of ``name`` (e.g. a whole run)."""
        start = self._mark()
        yield
        self._close(name, start)

    def _mark(self):
        if self._cuda is None:
            return self._clock()
        event = self._cuda.Event(enable_timing=True)
        event.record(self._cuda.current_stream(self._device))
        return event

    def _close(self, name: str, start) -> None:
        if self._cuda is None:
            self._samples[name].append((self._clock() - start) * 1e3)
        else:
            self._pending.append((name, start, self._mark()))

    def samples(self) -> dict[str, list[float]]:
        """All samples so far: region name -> milliseconds per call, in call order.

        On CUDA this waits once for the model's device to finish the recorded work.
        """
        if self._pending:
            self._cuda.synchronize(self._device)
            for name, start, end in self._pending:
                self._samples[name].append(start.elapsed_time(end))
            self._pending.clear()
        return {name: list(values) for name, values in self._samples.items()}


#: A sample more than this many times the median of its figure is an outlier.
OUTLIER_FACTOR = 1.5
#: Fewer samples than this give no p90 (it would be the largest sample or an interpolation to it).
P90_MIN_SAMPLES = 10


def summarize(samples: Sequence[float]) -> dict[str, float | int | list[int] | None]:
    """Summary statistics of timing samples (milliseconds in, milliseconds out).

    Returns ``n``, ``median``, ``mean``, ``min``, ``max``, ``stdev`` (sample standard
    deviation; 0.0 for a single sample), ``cv`` (stdev / mean; 0.0 for a single sample),
    ``p90`` (linear interpolation between order statistics, as numpy's default percentile;
    None below :data:`P90_MIN_SAMPLES` samples) and ``outliers`` (the positions, in the order
    given, of the samples above :data:`OUTLIER_FACTOR` times the median). Raises
    ``ValueError`` for no samples.
    """
    if not samples:
        raise ValueError("cannot summarize an empty list of samples")
    values = [float(x) for x in samples]
    ordered = sorted(values)
    median = statistics.median(ordered)
    mean = statistics.fmean(ordered)
    stdev = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
    return {
        "n": len(ordered),
        "median": median,
        "mean": mean,
        "min": ordered[0],
        "max": ordered[-1],
        "stdev": stdev,
        "cv": stdev / mean if mean > 0 else 0.0,
        "p90": _percentile(ordered, 0.9) if len(ordered) >= P90_MIN_SAMPLES else None,
        "outliers": outliers(values),
    }


def outliers(samples: Sequence[float]) -> list[int]:
    """Positions of the samples above :data:`OUTLIER_FACTOR` times their median (a run slowed
    by something else on the machine, or a first run paying for a cold cache)."""
    if not samples:
        return []
    median = statistics.median(samples)
    return [i for i, x in enumerate(samples) if median > 0 and x > OUTLIER_FACTOR * median]


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, interpolating linearly between neighbours."""
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)
