"""How often `compare` calls identical code a regression, and whether it catches a real one.

Runs sweeps of the same code back to back, each its own `python -m llm_perf_opt.run -m`
process (default: the reduced model, mode tiny, 8 new tokens, 5 timed repeats, no trace):

0. `--warmup-sweeps` (default 1) whose figures are not used: the first process after an install
   or a build runs cold (2.3x the others' end-to-end measured on the 2-core VM), a start-up
   effect rather than the spread between processes that the floor is about;
1. `--calibration` sweeps (default 10) whose spread is the noise floor, written to
   `<root>/noise_floor.json` as `compare --noise-floor-out` writes it (`--noise-floor FILE`
   reuses a recorded one instead and runs no calibration sweeps);
2. `--pairs + 1` further sweeps; each is compared with the one before it, with that floor
   (`compare PREV NEXT --noise-floor FILE`), and, for contrast, without it (the rank test alone),
   and also against all calibration sweeps as baselines (`compare CAL... NEXT`). These sweeps
   are not among those that measured the floor they are judged with.

It prints the verdict of each comparison and how many said nothing. Then it injects a slowdown
into a copy of the last sweep (every timed sample of its run.json multiplied by `1 +
--slowdown`: stages, TTFT, TPOT and end-to-end alike) and compares the last sweep (and the
calibration sweeps) with it, which must FAIL: the summary says CAUGHT (every such comparison
failed) or MISSED.

Usage:
    python benchmarks/compare_noise.py                       # 10 calibration sweeps, 10 pairs, 20 % slowdown
    python benchmarks/compare_noise.py --noise-floor outputs/.../noise_floor.json --pairs 3
    python benchmarks/compare_noise.py --root DIR            # sweeps already in DIR are reused
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llm_perf_opt.atomic import write_json
from llm_perf_opt.report.compare import FAIL, FAILED, PASSED, WARN, Comparison, Thresholds, compare
from llm_perf_opt.report.noise_floor import (
    NoiseFloor,
    estimate_noise_floor,
    floor_pct,
    load_noise_floor,
    noise_floor_to_dict,
    row_alpha,
)
from llm_perf_opt.report.run_dirs import load_run_set

DEFAULT_OVERRIDES = (
    "model=deepseek_ocr_tiny",
    "mode=tiny",
    "max_new_tokens=8",
    "profiling.repeats=5",
    "profiling.trace=false",
    "device=cpu",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--warmup-sweeps", type=int, default=1, help="sweeps run first and not used (cold start)"
    )
    parser.add_argument("--calibration", type=int, default=10, help="sweeps that measure the noise floor")
    parser.add_argument(
        "--noise-floor", type=Path, help="a recorded noise floor instead of calibration sweeps"
    )
    parser.add_argument("--pairs", type=int, default=10, help="back-to-back pairs of identical sweeps")
    parser.add_argument("--slowdown", type=float, default=0.2, help="injected slowdown (0.2 = 20 %%)")
    parser.add_argument("--warn", type=float, default=5.0)
    parser.add_argument("--fail", type=float, default=10.0)
    parser.add_argument("--min-ms", type=float, default=0.0)
    parser.add_argument("--root", type=Path, help="default: outputs/benchmarks/compare_noise/<time>")
    parser.add_argument("overrides", nargs="*", help="run overrides after --, added to the defaults")
    args = parser.parse_args(argv)
    if args.noise_floor is None and args.calibration < 2:
        parser.error("--calibration needs 2 or more sweeps (or give --noise-floor)")
    return args


def run_sweep(folder: Path, overrides: Sequence[str]) -> None:
    """One sweep in its own process; a folder that already holds a finished sweep is kept."""
    if any(folder.glob("*/run.json")):
        return
    command = [sys.executable, "-m", "llm_perf_opt.run", "-m", *overrides, f"hydra.sweep.dir={folder}"]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    failed = [p.parent.name for p in folder.glob("*/run.json") if json.loads(p.read_text())["status"] != "ok"]
    if done.returncode != 0 or failed:
        sys.exit(f"error: sweep {folder} failed ({', '.join(failed) or 'no job'}):\n{done.stderr}")
    print(f"{folder.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def slowed_copy(sweep: Path, target: Path, factor: float) -> Path:
    """A copy of the sweep whose every timed sample takes `factor` times as long."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(sweep, target)
    for record_path in target.glob("*/run.json"):
        record = json.loads(record_path.read_text())
        for sample in record["timing"]["samples"]:
            sample["stages"] = {
                stage: [ms * factor for ms in calls] for stage, calls in sample["stages"].items()
            }
            for key in ("e2e_ms", "ttft_ms", "tpot_ms"):
                if sample.get(key) is not None:
                    sample[key] *= factor
        record_path.write_text(json.dumps(record))
    return target


def judged(
    baselines: Sequence[Path], current: Path, thresholds: Thresholds, floor: NoiseFloor | None
) -> tuple[str, str]:
    """The comparison's verdict and its flagged rows, with the floor each had."""
    comparison: Comparison = compare(
        [load_run_set(b) for b in baselines], load_run_set(current), thresholds, noise_floor=floor
    )
    flagged = [
        f"{row.figure} {row.delta_pct:+.1f}% ({row.verdict}"
        + (f", floor ±{row.floor_pct:.1f}%" if row.floor_pct is not None else "")
        + ")"
        for job in comparison.jobs
        for row in job.rows
        if row.verdict in (WARN, FAIL)
    ]
    return comparison.verdict, "; ".join(flagged)


def count(
    title: str,
    comparisons: Sequence[tuple[str, Sequence[Path], Path]],
    thresholds: Thresholds,
    floor: NoiseFloor | None,
) -> int:
    print(f"\n{title}")
    clean = 0
    for name, baselines, current in comparisons:
        outcome, flagged = judged(baselines, current, thresholds, floor)
        clean += outcome == PASSED
        print(f"  {name}: {outcome}" + (f"  ({flagged})" if flagged else ""))
    print(f"  identical code: {clean} of {len(comparisons)} without a warning")
    return clean


def print_floor(floor: NoiseFloor, thresholds: Thresholds, slowdown: float) -> None:
    """Each figure's between-run spread and the floor it gives one run against another, and
    whether the injected slowdown can exceed any of them."""
    for job in floor.jobs.values():
        print(f"noise floor of {job.label} ({job.runs} runs, {job.repeats} repeats each):")
        floors = {}
        for figure, spread in job.figures.items():
            floors[figure] = floor_pct(spread, baseline_runs=1, alpha=row_alpha(figure, list(job.figures)))
            print(f"  {figure:18s} spread {spread.pct:7.1f} %  floor run vs run ±{floors[figure]:.1f} %")
        narrowest = min(floors, key=floors.__getitem__)
        if floors[narrowest] >= 100 * slowdown:
            print(
                f"  every floor is above the injected {slowdown:.0%} (narrowest: {narrowest} "
                f"±{floors[narrowest]:.1f} %): this machine's spread between runs hides such a slowdown"
            )
    if thresholds.min_ms > 0:
        print(f"  and at least {thresholds.min_ms:g} ms")


def print_medians(folders: Sequence[Path]) -> None:
    """End-to-end median and [min, max] of each sweep's job, the load the machine was under."""
    print("end-to-end per sweep, median [min, max] ms:")
    for folder in folders:
        for job in load_run_set(folder).jobs:
            values = [s.e2e_ms for s in job.record.samples]
            print(
                f"  {folder.name}: {sorted(values)[len(values) // 2]:.0f} [{min(values):.0f}, {max(values):.0f}]"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root or Path("outputs/benchmarks/compare_noise") / time.strftime("%Y-%m-%d_%H-%M-%S")
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    thresholds = Thresholds(args.warn, args.fail, args.min_ms)
    calibration = [] if args.noise_floor else [root / f"cal_{i:02d}" for i in range(args.calibration)]
    sweeps = [root / f"sweep_{i:02d}" for i in range(args.pairs + 1)]
    warmups = [root / f"warmup_{i:02d}" for i in range(args.warmup_sweeps)]
    for folder in [*warmups, *calibration, *sweeps]:
        run_sweep(folder, overrides)
    if args.noise_floor:
        floor = load_noise_floor(args.noise_floor)
    else:
        floor = estimate_noise_floor([load_run_set(c) for c in calibration])
        write_json(root / "noise_floor.json", noise_floor_to_dict(floor))
        floor = load_noise_floor(root / "noise_floor.json")
    print(
        f"{len(calibration)} calibration sweeps, then {len(sweeps)} sweeps of identical code, back to back: "
        f"{' '.join(overrides)}"
    )
    print(
        f"thresholds: warn {args.warn:g} %, fail {args.fail:g} %, each only if significant and beyond the floor"
    )
    print_medians([*calibration, *sweeps])
    print_floor(floor, thresholds, args.slowdown)

    pairs = [(f"pair {i:2d}", [sweeps[i - 1]], sweeps[i]) for i in range(1, len(sweeps))]
    count(
        "rank test alone (no floor): each sweep against the one before",
        pairs,
        Thresholds(args.warn, args.fail),
        None,
    )
    clean = count(
        f"with the noise floor {floor.path}: each sweep against the one before", pairs, thresholds, floor
    )
    if calibration:
        against_all = [(f"sweep {i:2d}", calibration, sweeps[i]) for i in range(1, len(sweeps))]
        count(
            f"against the {len(calibration)} calibration sweeps as baselines", against_all, thresholds, None
        )

    slowed = slowed_copy(sweeps[-1], root / "slowed", 1 + args.slowdown)
    print(f"\ninjected {args.slowdown:.0%} slowdown")
    caught = []
    for name, baselines in (("last sweep + noise floor", [sweeps[-1]]), ("calibration sweeps", calibration)):
        if baselines:
            outcome, flagged = judged(baselines, slowed, thresholds, floor if len(baselines) == 1 else None)
            caught.append(outcome == FAILED)
            print(f"  against the {name}: {outcome} ({caught_word(outcome == FAILED)})  ({flagged})")
    print(
        f"\nsummary: {clean} of {len(pairs)} identical pairs without a warning (with the floor); injected "
        f"{args.slowdown:.0%} slowdown: {caught_word(all(caught))}"
        + ("" if all(caught) else f" ({caught.count(False)} of {len(caught)} comparisons passed it)")
    )
    return 0 if all(caught) else 1


def caught_word(caught: bool) -> str:
    """A slowdown is caught only where the comparison FAILs (a warning lets the nightly pass)."""
    return "CAUGHT" if caught else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
