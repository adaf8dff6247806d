"""Cost of the stage ranges (NVTX + record_function) when no profiler is attached.

Two estimates:

1. End to end: N runs of the model on the sample page with ranges on, N with
   `ranges_enabled(False)`, interleaved A/B (the order flips every pair, so drift and
   thermal/load trends hit both sides equally). Prints the medians, the overhead in %
   from the medians and the median of the paired differences.
2. Per range: many empty `with stage_range("prefill"):` blocks, on minus off, in µs per
   range, times the number of ranges one run opens (counted from one profiled run).

The end-to-end figure is noisy when the range cost is far below the run-to-run spread;
the per-range estimate is the sharper one then. With `--granularity module` the forward
hooks themselves still run when ranges are off, so only the range cost is measured.

Then the same two estimates for the OS counters the timed runs record per stage
(`profiling.os_counters.OsCounters`, two getrusage calls per top-level range): runs with the
listener attached against runs without, and empty ranges with and without it; the per-range
cost is also given as a share of the TPOT (a decode step is one top-level range).

Usage:
    python3 benchmarks/range_overhead.py                      # tiny model, 20 pairs
    python3 benchmarks/range_overhead.py --granularity module
    python3 benchmarks/range_overhead.py --threads 1             # on a shared, busy machine
    python3 benchmarks/range_overhead.py --model full --runs 3 --max-new-tokens 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from hydra.utils import get_class
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.config import load
from llm_perf_opt.hardware.device import resolve_device
from llm_perf_opt.hardware.precision import choose_dtype
from llm_perf_opt.models.interface import ModelSession, SessionOptions
from llm_perf_opt.profiling.os_counters import OsCounters
from llm_perf_opt.profiling.timing import StageTimer
from llm_perf_opt.profiling.trackers import ModuleRanges
from llm_perf_opt.runners.ranges import SEPARATOR, is_range_name, listening, ranges_enabled, stage_range

MODELS = {"tiny": "deepseek_ocr_tiny", "full": "deepseek_ocr"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(session: ModelSession, prompt: str, max_new_tokens: int) -> float:
    device = session.options.device
    sync(device)
    t0 = time.perf_counter()
    session.generate(session.prepare(None, prompt), max_new_tokens)
    sync(device)
    return time.perf_counter() - t0


def ranges_per_run(session: ModelSession, prompt: str, max_new_tokens: int) -> int:
    """Stage (and stage/family) ranges one run opens, counted in a profiled run."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        session.generate(session.prepare(None, prompt), max_new_tokens)
    return sum(1 for e in prof.events() if is_range_name(e.name, session.stage_names()))


def _empty_ranges_us(n: int) -> float:
    """µs per empty `with stage_range("prefill"):` block, over ``n`` of them."""
    t0 = time.perf_counter()
    for _ in range(n):
        with stage_range("prefill"):
            pass
    return (time.perf_counter() - t0) / n * 1e6


def empty_range_us_with(n: int, make_listener, repeats: int = 5) -> tuple[float, float]:
    """µs per empty `with stage_range("prefill"):` block with a listener (a new one each repeat,
    from `make_listener`) attached and without (best of repeats)."""

    on, off = [], []
    for _ in range(repeats):
        with listening(make_listener()):
            on.append(_empty_ranges_us(n))
        off.append(_empty_ranges_us(n))
    return min(on), min(off)


def empty_range_us(n: int, repeats: int = 5) -> tuple[float, float]:
    """µs per empty `with stage_range("prefill"):` block with ranges on and off (best of repeats)."""

    on, off = [], []
    for _ in range(repeats):
        on.append(_empty_ranges_us(n))
        with ranges_enabled(False):
            off.append(_empty_ranges_us(n))
    return min(on), min(off)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--mode", default="base")
    parser.add_argument("--runs", type=int, default=None, help="A/B pairs (default 20 tiny, 3 full)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--granularity", choices=("stage", "module"), default="stage")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; 1 avoids stalls when other processes share the cores",
    )
    parser.add_argument(
        "--empty-ranges", type=int, default=200_000, help="iterations of the empty-range loop"
    )
    args = parser.parse_args()
    runs = args.runs or (20 if args.model == "tiny" else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    run = load([f"model={MODELS[args.model]}", f"mode={args.mode}"])
    device = resolve_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    t0 = time.perf_counter()
    session = get_class(type(run.model).session)(run.model, SessionOptions(device, dtype.dtype))
    session.load()
    session.fit_dummy_weights(session.prepare(None, run.prompt))
    print(
        f"model {run.model.name} (dummy weights), mode {args.mode}, {device}, {dtype.dtype}, "
        f"granularity {args.granularity}, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads; "
        f"built in {time.perf_counter() - t0:.1f} s"
    )
    modules = (
        ModuleRanges(session.module, session.module_families())
        if args.granularity == "module"
        else nullcontext()
    )
    with modules:
        for _ in range(args.warmup):
            timed_run(session, run.prompt, args.max_new_tokens)
        measure_overhead(session, run.prompt, args, runs)
        measure_os_counters(session, run.prompt, args, runs)


def measure_overhead(session: ModelSession, prompt: str, args, runs: int) -> None:
    on, off = [], []
    for i in range(runs):
        order = (True, False) if i % 2 == 0 else (False, True)
        for enabled in order:
            with ranges_enabled(enabled):
                (on if enabled else off).append(timed_run(session, prompt, args.max_new_tokens))
    med_on, med_off = statistics.median(on), statistics.median(off)
    paired = statistics.median(a - b for a, b in zip(on, off))
    spread = statistics.pstdev(off) / med_off * 100 if len(off) > 1 else float("nan")
    print(f"\nend to end, {runs} interleaved pairs:")
    print(f"  ranges on : median {med_on * 1e3:9.2f} ms (min {min(on) * 1e3:.2f})")
    print(
        f"  ranges off: median {med_off * 1e3:9.2f} ms (min {min(off) * 1e3:.2f}; run-to-run spread {spread:.1f}%)"
    )
    print(
        f"  overhead  : {(med_on - med_off) / med_off * 100:+.3f}% from the medians, "
        f"{paired / med_off * 100:+.3f}% from the median paired difference ({paired * 1e3:+.3f} ms)"
    )

    count = ranges_per_run(session, prompt, args.max_new_tokens)
    us_on, us_off = empty_range_us(args.empty_ranges)
    per_range = max(us_on - us_off, 0.0)
    estimate_ms = per_range * count / 1e3
    print(f"\nper range ({args.empty_ranges} empty ranges, best of 5):")
    print(
        f"  empty block: {us_on:.3f} µs with ranges, {us_off:.3f} µs without -> {per_range:.3f} µs per range"
    )
    print(
        f"  {count} ranges per run -> {estimate_ms:.3f} ms per run = {estimate_ms / (med_off * 1e3) * 100:.4f}% "
        "of the median run"
    )


def measure_os_counters(session: ModelSession, prompt: str, args, runs: int) -> None:
    """The OS counters' cost: end to end (A/B with and without the listener) and per range, against the TPOT."""
    on, off = [], []
    for i in range(runs):
        for attached in (True, False) if i % 2 == 0 else (False, True):
            with listening(OsCounters()) if attached else nullcontext():
                (on if attached else off).append(timed_run(session, prompt, args.max_new_tokens))
    med_on, med_off = statistics.median(on), statistics.median(off)
    paired = statistics.median(a - b for a, b in zip(on, off))
    print(f"\nOS counters, end to end, {runs} interleaved pairs:")
    print(f"  counters on : median {med_on * 1e3:9.2f} ms")
    print(f"  counters off: median {med_off * 1e3:9.2f} ms")
    print(
        f"  overhead    : {(med_on - med_off) / med_off * 100:+.3f}% from the medians, "
        f"{paired / med_off * 100:+.3f}% from the median paired difference ({paired * 1e3:+.3f} ms)"
    )

    timer = StageTimer(session.options.device)
    with listening(timer):
        timed_run(session, prompt, args.max_new_tokens)
    samples = timer.samples()
    tpot_ms = statistics.median(samples.get("decode", [float("nan")]))
    top_level = sum(len(calls) for name, calls in samples.items() if SEPARATOR not in name)
    us_on, us_off = empty_range_us_with(args.empty_ranges, OsCounters)
    per_range = max(us_on - us_off, 0.0)
    print(f"\nOS counters per range ({args.empty_ranges} empty ranges, best of 5):")
    print(
        f"  empty block: {us_on:.3f} µs with the counters, {us_off:.3f} µs without -> {per_range:.3f} µs per range"
    )
    print(
        f"  a decode step is one range: {per_range:.3f} µs of a {tpot_ms:.2f} ms TPOT = "
        f"{per_range / 1e3 / tpot_ms * 100:.4f}% (must be under 1%); {top_level} ranges per run -> "
        f"{per_range * top_level / 1e3:.3f} ms per run"
    )


if __name__ == "__main__":
    main()
