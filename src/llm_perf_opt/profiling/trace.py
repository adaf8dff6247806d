"""Record one call under torch.profiler as a Chrome trace, and read such traces back.

Tracing is its own pass: the profiler adds per-launch overhead, so traced runs are used for
attribution (:mod:`llm_perf_opt.profiling.attribution`), never for timing.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.atomic import atomic_path
from llm_perf_opt.errors import UserError

#: One past Kineto's highest level (VERBOSE 0, INFO 1, WARNING 2, STAGE 3, ERROR 4, USDT 5).
KINETO_SILENT = "6"


def record_trace(
    fn: Callable[[], Any], path: str | os.PathLike[str], device: torch.device, **options: bool
) -> Path:
    """Run ``fn()`` once under torch.profiler and write its Chrome trace to ``path`` atomically.

    CPU activity is always recorded (it holds the stage ranges and the kernel launches); CUDA
    activity is added on a CUDA device, whose work is waited for before the profiler stops.
    ``options`` go to torch.profiler.profile (record_shapes, profile_memory, with_stack).
    Returns ``path``; read it with :func:`load_trace`.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    quiet_kineto()
    with profile(activities=activities, **options) as prof:
        fn()
        if cuda:
            # Kernels still running when the profiler stops would be missing from the trace.
            torch.cuda.synchronize(device)
    with atomic_path(path) as tmp:
        prof.export_chrome_trace(str(tmp))
    return Path(path)


@contextmanager
def capture_range(device: torch.device) -> Iterator[None]:
    """On CUDA, the timed runs between cudaProfilerStart and cudaProfilerStop: a profiler told to
    record only that range (`nsys profile --capture-range=cudaProfilerApi`, as
    runners/nsys_profile.sh does) leaves out the warm-up runs, path tuning and calibration
    before them. With no such profiler attached both calls do nothing. Nothing off CUDA."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.profiler.start()
    try:
        yield
    finally:
        torch.cuda.profiler.stop()


def prepare_graph_tracing(device: torch.device) -> None:
    """On CUDA, before any CUDA graph is captured in a process that traces later: keep CUPTI
    set up between profiler sessions (TEARDOWN_CUPTI=0; tearing it down and setting it up again
    after a capture can crash, or lose the kernels of replays) and start it once now, so that
    graphs captured from here on are traced when replayed. Nothing off CUDA. A TEARDOWN_CUPTI
    the user set is kept."""
    if device.type != "cuda":
        return
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    quiet_kineto()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        pass


def quiet_kineto() -> None:
    """Keep Kineto (torch.profiler's backend) from printing `USDT: ... profiler_start/stop` on
    every trace. Those lines have Kineto's highest log level (USDT, above ERROR), so only a
    level past all of them silences them; Kineto reads it once, when it first starts in a
    process. A KINETO_LOG_LEVEL the user set is kept (KINETO_LOG_LEVEL=0 shows everything)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_SILENT)


def load_trace(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events of a Chrome trace file (``.json`` or gzipped ``.json.gz``).

    Raises :class:`UserError` when the file is missing or is not a Chrome trace.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"trace file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read trace {path}: {err}") from None
    return trace_events(data, source=str(path))


def trace_events(
    trace: dict[str, Any] | list[dict[str, Any]], *, source: str = "trace"
) -> list[dict[str, Any]]:
    """The event list of a parsed Chrome trace: a ``{"traceEvents": [...]}`` object or a bare list."""
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(events, list):
        raise UserError(f"{source} is not a Chrome trace (no traceEvents list)")
    return events
