"""The measurement passes of one job: warm-up (+ routing), timing, trace.

Tracing is kept out of the timed runs (the profiler adds per-op overhead), so each pass is a
separate set of runs of the same request.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, Request, Result

from .attribution import Attribution, attribute_trace
from .ranges import DECODE, STAGES
from .timing import StageTimer, summarize
from .trace import load_trace, record_trace

E2E = "e2e"
TTFT_STAGES = tuple(s for s in STAGES if s != DECODE)  # everything up to the first token


@dataclass
class RunSample:
    """One timed run: per-stage lists of per-call milliseconds, plus derived figures."""

    stages: dict[str, list[float]]
    e2e_ms: float
    decode_steps: int

    @property
    def ttft_ms(self) -> float:
        return sum(sum(self.stages.get(s, [])) for s in TTFT_STAGES)

    @property
    def decode_ms(self) -> float:
        return sum(self.stages.get(DECODE, []))

    @property
    def tpot_ms(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1), taken over the decode steps alone."""
        return self.decode_ms / self.decode_steps if self.decode_steps else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        return 1e3 * self.decode_steps / self.decode_ms if self.decode_steps and self.decode_ms else None


@dataclass
class Measurement:
    request: Request
    result: Result | None = None
    runs: list[RunSample] = field(default_factory=list)
    routing: RoutingRecord | None = None
    attribution: Attribution | None = None
    trace_path: Path | None = None
    peak_memory: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Medians and spreads of the headline figures over the timed runs."""
        figures = {
            "e2e_ms": [r.e2e_ms for r in self.runs],
            "ttft_ms": [r.ttft_ms for r in self.runs],
            "tpot_ms": [r.tpot_ms for r in self.runs if r.tpot_ms is not None],
            "decode_tokens_per_s": [r.decode_tokens_per_s for r in self.runs if r.decode_tokens_per_s],
        }
        return {name: summarize(values) if values else None for name, values in figures.items()}

    def stage_totals(self, stage: str) -> list[float]:
        """Per run, the total time of a stage (all its calls), in ms."""
        return [sum(r.stages.get(stage, [])) for r in self.runs]


def measure(
    session: DeepSeekOCRSession,
    request: Request,
    *,
    max_new_tokens: int,
    warmup: int,
    repeats: int,
    trace_path: Path | None,
) -> Measurement:
    """Run the passes on one prepared request and return every raw figure."""
    m = Measurement(request)
    session.balance_routing(request)  # dummy weights: fit the router before anything is measured
    steps = max_new_tokens - 1
    passes = warmup + repeats + (trace_path is not None)
    device = session.model.device
    with tqdm(total=passes * steps if steps else passes, desc="warm-up", unit="tok", file=sys.stderr,
              disable=None, leave=False) as bar:
        tick = bar.update if steps else (lambda: None)

        def one_run(timer: StageTimer | None = None) -> Result:
            result = session.run(request.image_path, request.mode, request.prompt, max_new_tokens, timer, tick)
            if not steps:
                bar.update(1)
            return result

        for i in range(warmup):
            bar.set_description(f"warm-up {i + 1}/{warmup}")
            if i == 0:
                with session.record_routing() as recorder:
                    one_run()
                m.routing = recorder.record
            else:
                one_run()
        _reset_peak_memory(device)
        for i in range(repeats):
            bar.set_description(f"repeat {i + 1}/{repeats}")
            timer = StageTimer(device)
            with timer.time(E2E):
                m.result = one_run(timer)
            samples = timer.samples()
            e2e = samples.pop(E2E)[0]
            m.runs.append(RunSample(samples, e2e, len(samples.get(DECODE, []))))
        m.peak_memory = _peak_memory(device)
        if trace_path is not None:
            bar.set_description("trace")
            m.trace_path = record_trace(one_run, trace_path, cuda=device.type == "cuda")
            m.attribution = attribute_trace(load_trace(m.trace_path))
    return m


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict:
    """Peak device memory over the timed runs (CUDA allocator), or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "source": "torch.cuda.max_memory_allocated"}
    # ru_maxrss is in KiB on Linux; it covers the whole process lifetime, weights included.
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "source": "process peak RSS"}

