"""The measurement passes of one job: warm-up (+ routing), timing, trace.

One run = prepare the request (stage `preprocess`) + generate (every later stage). Tracing
and nested module ranges are kept out of the timed runs (both add per-op overhead), so each
pass is a separate set of runs of the same inputs.
"""

from __future__ import annotations

import math
import statistics
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from llm_perf_opt.models.interface import ModelSession, Request, Result, RoutingCounts, Stage
from llm_perf_opt.runners.ranges import listening

from .attribution import Attribution, attribute_trace
from .memory import CudaPeaks, MemoryFigures, RssSampler
from .os_counters import OsCounters
from .timing import StageTimer, summarize
from .trace import capture_range, load_trace, prepare_graph_tracing, record_trace
from .trackers import ModuleRanges, RoutingRecorder, StepCounter

E2E = "e2e"
#: Stages shorter than this share of the end-to-end time do not hold up `until_cv`.
SPREAD_STAGE_SHARE = 0.05


@dataclass(frozen=True)
class RunInputs:
    """What one run processes: the pages of its batch (None: the model's bundled page) with the
    user's prompt each, and how many tokens to generate."""

    images: tuple[Path | None, ...]
    prompt: str
    max_new_tokens: int


@dataclass
class RunSample:
    """One timed run: per-stage lists of per-call milliseconds, its end-to-end time, what it
    produced (a request of `pages` pages, `generated_tokens` real tokens over the batch), and
    per stage the OS counters of each call (`profiling.os_counters`: counter -> per-call values)."""

    stages: dict[str, list[float]]
    e2e_ms: float
    ttft_ms: float  # the once-per-request stages: everything up to the first generated token
    decode_steps: int  # calls of the per-step stages
    pages: int
    generated_tokens: int  # real tokens over the batch (a sequence stops counting at its EOS)
    decode_tokens: int  # real tokens the decode steps produced
    os: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def tpot_ms(self) -> float | None:
        """Time per decode step (a batch: per step of the whole batch): (E2E − TTFT) / steps."""
        return (self.e2e_ms - self.ttft_ms) / self.decode_steps if self.decode_steps else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Real tokens the decode steps produced per second of decode time (batch 1: 1000 / TPOT)."""
        if not self.decode_steps or self.e2e_ms <= self.ttft_ms:
            return None
        return 1e3 * self.decode_tokens / (self.e2e_ms - self.ttft_ms)

    @property
    def tokens_per_s(self) -> float:
        """Real generated tokens per second of the whole request."""
        return 1e3 * self.generated_tokens / self.e2e_ms

    @property
    def pages_per_s(self) -> float:
        return 1e3 * self.pages / self.e2e_ms

    def as_dict(self) -> dict:
        return {
            "stages": self.stages,
            "e2e_ms": self.e2e_ms,
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "pages": self.pages,
            "generated_tokens": self.generated_tokens,
            "decode_tokens": self.decode_tokens,
            "os": self.os,
        }


@dataclass
class Measurement:
    stages: tuple[Stage, ...]
    request: Request
    result: Result | None = None
    runs: list[RunSample] = field(default_factory=list)
    routing: RoutingCounts | None = None
    attribution: Attribution | None = None
    trace_path: Path | None = None
    memory: MemoryFigures | None = None
    #: With profiling.until_cv: the target, the runs taken, whether it was reached, the widest figure.
    until_cv: dict | None = None

    def summary(self) -> dict:
        """Medians and spreads of the headline figures over the timed runs."""
        figures = {
            "e2e_ms": [r.e2e_ms for r in self.runs],
            "ttft_ms": [r.ttft_ms for r in self.runs],
            "tpot_ms": [r.tpot_ms for r in self.runs if r.tpot_ms is not None],
            "decode_tokens_per_s": [r.decode_tokens_per_s for r in self.runs if r.decode_tokens_per_s],
            "tokens_per_s": [r.tokens_per_s for r in self.runs],
            "pages_per_s": [r.pages_per_s for r in self.runs],
        }
        return {name: summarize(values) if values else None for name, values in figures.items()}

    def spread(self) -> tuple[str, float]:
        """The most spread figure of the timed runs and its coefficient of variation (stdev /
        mean): the end-to-end time and every stage whose median is at least
        :data:`SPREAD_STAGE_SHARE` of it (shorter stages are noisy and hardly matter)."""
        e2e = [r.e2e_ms for r in self.runs]
        if len(e2e) < 2:
            return E2E, math.inf
        figures = {E2E: e2e}
        floor = SPREAD_STAGE_SHARE * statistics.median(e2e)
        for stage in self.stages:
            totals = self.stage_totals(stage.name)
            if statistics.median(totals) >= floor:
                figures[stage.name] = totals
        return max(
            ((name, summarize(values)["cv"]) for name, values in figures.items()), key=lambda item: item[1]
        )

    def stage_totals(self, stage: str) -> list[float]:
        """Per run, the total time of a stage (all its calls), in ms."""
        return [sum(r.stages.get(stage, [])) for r in self.runs]

    def os_runs(self) -> list[dict[str, dict[str, list[float]]]]:
        """Per timed run, its OS counters per stage and call (:attr:`RunSample.os`)."""
        return [r.os for r in self.runs]

    def median_stage_ms(self, stage: str) -> float | None:
        totals = self.stage_totals(stage)
        return statistics.median(totals) if totals else None

    @property
    def decode_steps(self) -> int:
        return self.result.steps if self.result is not None else 0


def measure(
    session: ModelSession,
    inputs: RunInputs,
    *,
    warmup: int,
    repeats: int,
    trace_path: Path | None,
    module_ranges: bool = False,
    profiler_options: dict[str, bool] | None = None,
    until_cv: float | None = None,
    max_repeats: int | None = None,
) -> Measurement:
    """Run the passes on these inputs and return every raw figure.

    `module_ranges` adds nested `stage/family` ranges to the trace pass only; `profiler_options`
    go to torch.profiler in that pass (see :func:`record_trace`). With `until_cv`, timed runs
    go on after `repeats`, one at a time, while :meth:`Measurement.spread` is above it, up to
    `max_repeats` runs in all.
    """
    device = session.options.device
    stages = session.stages
    first_token = {s.name for s in stages if not s.per_step}
    per_step = {s.name for s in stages if s.per_step}
    steps = inputs.max_new_tokens - 1
    passes = warmup + repeats + (trace_path is not None)

    # On a GPU, everything that asks for "the current device" means the model's.
    on_device = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    request = session.prepare_batch(inputs.images, inputs.prompt)
    with on_device:  # before anything is measured
        if trace_path is not None:
            prepare_graph_tracing(device)  # before any CUDA graph is captured
        session.fit_dummy_weights(request)
        session.setup(request, inputs.max_new_tokens)
    m = Measurement(stages, request)
    # The bar counts decode steps (a StepCounter ticks it), or whole runs when nothing is decoded.
    bar = tqdm(
        total=passes * steps if steps else passes,
        desc="warm-up",
        unit="tok" if steps else "run",
        file=sys.stderr,
        disable=None,
        leave=False,
    )

    def one_run() -> tuple[Request, Result]:
        request = session.prepare_batch(inputs.images, inputs.prompt)
        result = session.generate(request, inputs.max_new_tokens)
        if not steps:
            bar.update()
        return request, result

    with bar, listening(StepCounter(stages, bar.update)), on_device:
        for i in range(warmup):
            bar.set_description(f"warm-up {i + 1}/{warmup}")
            if i == 0:
                with RoutingRecorder(session.routed_layers()) as recorder:
                    one_run()
                m.routing = recorder.counts or None
            else:
                one_run()
        cuda_peaks = CudaPeaks(device) if device.type == "cuda" else nullcontext()
        limit = max(repeats, max_repeats or repeats) if until_cv is not None else repeats

        def more_runs() -> bool:
            if len(m.runs) < repeats:
                return True
            return until_cv is not None and len(m.runs) < limit and m.spread()[1] > until_cv

        if until_cv is not None:
            bar.total += (limit - repeats) * (steps or 1)  # an upper bound: the bar may end early
        with RssSampler() as rss, cuda_peaks, capture_range(device):
            while more_runs():
                i = len(m.runs)
                bar.set_description(f"repeat {i + 1}/{repeats if i < repeats else limit}")
                timer, counters = StageTimer(device), OsCounters()
                with listening(timer, counters), timer.time(E2E):
                    m.request, m.result = one_run()
                samples = timer.samples()
                e2e = samples.pop(E2E)[0]
                ttft = sum(sum(samples.get(s, [])) for s in first_token)
                n_steps = sum(len(samples.get(s, [])) for s in per_step)
                result = m.result  # its lengths are read on the host now, after the timed region
                m.runs.append(
                    RunSample(
                        samples,
                        e2e,
                        ttft,
                        n_steps,
                        result.batch_size,
                        result.generated_tokens,
                        result.decode_tokens,
                        counters.samples(),
                    )
                )
        if until_cv is not None:
            figure, cv = m.spread()
            m.until_cv = {
                "target": until_cv,
                "max_repeats": limit,
                "runs": len(m.runs),
                "reached": cv <= until_cv,
                "widest": figure,
                "cv": cv,
            }
        m.memory = MemoryFigures.collect(rss=rss, cuda=cuda_peaks if device.type == "cuda" else None)
        if trace_path is not None:
            bar.set_description("trace")
            ranges = (
                ModuleRanges(session.module, session.module_families()) if module_ranges else nullcontext()
            )
            with ranges:
                m.trace_path = record_trace(one_run, trace_path, device, **(profiler_options or {}))
            m.attribution = attribute_trace(load_trace(m.trace_path), session.stage_names())
    return m
