"""The measurement passes on a small fake model: which pass runs with what attached, the figures
each pass yields, and the device every CUDA call names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_perf_opt.models.interface import ModelSession, Result, SessionOptions, Stage
from llm_perf_opt.profiling import passes
from llm_perf_opt.profiling.passes import RunInputs, measure
from llm_perf_opt.runners.ranges import stage_range


class Request:
    prompt_tokens = 4

    def describe(self):
        return {}

    def summary(self):
        return "fake request"


class Router(nn.Module):
    """A routed layer: sends its one token to expert (call number mod 3)."""

    n_experts = 3

    def __init__(self):
        super().__init__()
        self.on_route = None
        self.calls = 0

    def forward(self, x):
        if self.on_route is not None:
            self.on_route(torch.tensor([[self.calls % 3]]))
        self.calls += 1
        return x


class FakeSession(ModelSession):
    """Stages `prep` (once) and `step` (per token); logs what was attached during each run."""

    stages = (Stage("prep"), Stage("step", per_step=True))

    def __init__(self):
        super().__init__(None, SessionOptions(torch.device("cpu"), torch.float32))
        self.net = nn.Sequential(nn.Linear(4, 4), Router())
        self.runs: list[dict] = []

    def prepare(self, image, prompt):
        with stage_range("prep"):
            return Request()

    def check(self, request, max_new_tokens):
        pass

    def load(self):
        pass

    def generate(self, request, max_new_tokens):
        hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in self.net.modules())
        self.runs.append(
            {
                "hooks": hooks,
                "routed": self.net[1].on_route is not None,
                "profiling": torch.autograd.profiler._is_profiler_enabled,
            }
        )
        x = torch.ones(1, 4)
        for _ in range(max_new_tokens - 1):
            with stage_range("step"):
                x = self.net(x)
        return Result(torch.zeros(max_new_tokens, dtype=torch.long))

    @property
    def module(self):
        return self.net

    def module_families(self):
        return {"0": "linear"}

    def routed_layers(self):
        return [self.net[1]]


def test_each_pass_runs_with_only_what_it_needs(tmp_path):
    session = FakeSession()
    measure(
        session,
        RunInputs((None,), "p", 4),
        warmup=2,
        repeats=3,
        trace_path=tmp_path / "trace.json",
        module_ranges=True,
    )
    assert [r["routed"] for r in session.runs] == [True, False, False, False, False, False]
    # Module hooks only in the trace run (the last one): the timed runs carry stage ranges only.
    assert [r["hooks"] > 0 for r in session.runs] == [False] * 5 + [True]
    assert [r["profiling"] for r in session.runs] == [False] * 5 + [True]
    assert session.net[0]._forward_pre_hooks == {} and session.net[1].on_route is None


def test_the_figures_of_the_passes(tmp_path):
    session = FakeSession()
    m = measure(
        session,
        RunInputs((None,), "p", 4),
        warmup=1,
        repeats=2,
        trace_path=tmp_path / "trace.json",
        module_ranges=True,
    )
    assert len(m.runs) == 2 and m.decode_steps == 3
    for run in m.runs:
        assert set(run.stages) == {"prep", "step"} and len(run.stages["step"]) == 3
        assert run.ttft_ms == sum(run.stages["prep"])
        assert run.e2e_ms >= run.ttft_ms + sum(run.stages["step"]) * 0.999
    # The first warm-up routed 1 prefill-free run of 3 steps: experts 0, 1, 2 in turn.
    assert m.routing == {"step": [[[1, 0, 0]], [[0, 1, 0]], [[0, 0, 1]]]}
    ranges = set(m.attribution.stages["stage"])
    assert ranges == {"prep", "step", "step/linear"}
    assert m.memory.peak_rss_bytes > 0 and m.memory.timed_rss_peak_bytes > 0


class CudaCalls:
    """Stands in for torch.cuda and logs the device each call names."""

    def __init__(self):
        self.log = []

    def device(self, device):
        calls = self

        class Scope:
            def __enter__(self):
                calls.log.append(("device", device))

            def __exit__(self, *exc):
                return None

        return Scope()

    def Event(self, enable_timing):  # noqa: N802 - mirrors torch.cuda.Event
        class Event:
            def record(event, stream):
                self.log.append(("record", stream))

            def elapsed_time(event, end):
                return 1.0

        return Event()

    def current_stream(self, device):
        return f"stream of {device}"

    def synchronize(self, device=None):
        self.log.append(("synchronize", device))

    def reset_peak_memory_stats(self, device=None):
        self.log.append(("reset_peak_memory_stats", device))

    def max_memory_allocated(self, device=None):
        self.log.append(("max_memory_allocated", device))
        return 1

    def max_memory_reserved(self, device=None):
        self.log.append(("max_memory_reserved", device))
        return 2


def test_a_cuda_session_on_the_second_gpu_is_measured_there(monkeypatch):
    fake = CudaCalls()
    for name in (
        "device",
        "Event",
        "current_stream",
        "synchronize",
        "reset_peak_memory_stats",
        "max_memory_allocated",
        "max_memory_reserved",
    ):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    session = FakeSession()
    gpu = torch.device("cuda", 1)
    monkeypatch.setattr(session, "options", SessionOptions(gpu, torch.float32))
    # The timed runs, and only they, lie in the range an external profiler records
    # (nsys --capture-range=cudaProfilerApi): started after the warm-up run, stopped after the last.
    profiler = []
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: profiler.append(("start", len(session.runs))))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: profiler.append(("stop", len(session.runs))))
    m = measure(session, RunInputs((None,), "p", 3), warmup=1, repeats=2, trace_path=None)
    assert profiler == [("start", 1), ("stop", 3)]
    named = {device for _, device in fake.log}
    assert named == {gpu, "stream of cuda:1"}
    assert ("device", gpu) in fake.log and ("synchronize", gpu) in fake.log
    assert ("synchronize", None) not in fake.log
    assert m.memory.peak_allocated_bytes == 1 and m.memory.peak_reserved_bytes == 2
    assert m.runs[0].stages == {"prep": [1.0], "step": [1.0, 1.0]}
    assert passes.E2E not in m.runs[0].stages


#: The real timer, before a test replaces it with one on a scripted clock.
RealStageTimer = passes.StageTimer


class ScriptedClock:
    """A host clock that moves only when the scripted session says a step took so long."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedSession(FakeSession):
    """Each run's steps take together the next of `run_seconds` on the scripted clock (warm-up included)."""

    def __init__(self, clock, run_seconds):
        super().__init__()
        self.clock, self.run_seconds = clock, iter(run_seconds)

    def generate(self, request, max_new_tokens):
        seconds = next(self.run_seconds)
        for _ in range(max_new_tokens - 1):
            with stage_range("step"):
                self.clock.now += seconds / (max_new_tokens - 1)
        return Result(torch.zeros(max_new_tokens, dtype=torch.long))


def _scripted(monkeypatch, run_seconds):
    clock = ScriptedClock()
    monkeypatch.setattr(passes, "StageTimer", lambda device: RealStageTimer(device, clock=clock))
    return ScriptedSession(clock, run_seconds)


def test_until_cv_times_more_runs_until_the_spread_is_small(monkeypatch):
    # Warm-up 1 s, then runs of 1.0, 1.4, 1.0 s (sample stdev 0.231 of mean 1.133: 20.4 %), then
    # 1.0 s each. Each added run narrows the spread: 15 runs 10.06 %, 16 runs 9.76 % <= 10 %.
    session = _scripted(monkeypatch, [1.0, 1.0, 1.4] + [1.0] * 30)
    m = measure(
        session,
        RunInputs((None,), "p", 3),
        warmup=1,
        repeats=3,
        trace_path=None,
        until_cv=0.1,
        max_repeats=20,
    )
    assert len(m.runs) == 16
    assert m.until_cv["reached"] is True and m.until_cv["runs"] == 16
    assert m.until_cv["cv"] == pytest.approx(0.0975610, abs=1e-6)


def test_until_cv_stops_at_max_repeats(monkeypatch):
    # 1, 2, 1, 2, 1, 2 s: stdev 0.548 of mean 1.5 (36.5 %), far from 5 %, so it stops at 6 runs.
    session = _scripted(monkeypatch, [1.0] + [1.0, 2.0] * 20)
    m = measure(
        session,
        RunInputs((None,), "p", 3),
        warmup=1,
        repeats=3,
        trace_path=None,
        until_cv=0.05,
        max_repeats=6,
    )
    assert len(m.runs) == 6
    assert m.until_cv["reached"] is False and m.until_cv["max_repeats"] == 6
    assert m.until_cv["cv"] == pytest.approx(0.365148, abs=1e-6)


def test_without_until_cv_exactly_the_repeats_run(monkeypatch):
    session = _scripted(monkeypatch, [1.0] + [1.0, 2.0] * 20)
    m = measure(session, RunInputs((None,), "p", 3), warmup=1, repeats=3, trace_path=None)
    assert len(m.runs) == 3 and m.until_cv is None
