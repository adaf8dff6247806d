"""How often `compare` calls identical code a regression, and whether it catches a real one.

Runs sweeps of the same code back to back, each its own `python -m llm_perf_opt.run -m`
process (default: the reduced model, mode tiny, 8 new tokens, 5 timed repeats, no trace), and
judges them as the nightly does (`runners/nightly.sh`: a baseline of several runs, each its own
process, against several current runs):

0. `--warmup-sweeps` (default 1) whose figures are not used: the first process after an install
   or a build runs cold (2.3x the others' end-to-end measured on the 2-core VM), a start-up
   effect rather than the spread between processes that the floor is about;
1. `--calibration` sweeps (default 10, as many as a CPU nightly baseline holds): the baseline. Their
   spread is also written to `<root>/noise_floor.json` as `compare --noise-floor-out` writes it
   (`--noise-floor FILE` adds a recorded one to it);
2. `--pairs` groups of `--runs` further sweeps (default 3 groups of 10, as many as the CPU
   nightly runs): each group is compared with the calibration sweeps (`compare CAL... --current GROUP...`),
   and, for contrast, so is the group's first sweep alone (`compare CAL... SWEEP`): one process
   cannot show a change below about twice the spread between processes.

It prints the verdict of each comparison and how many said nothing. Then it injects a slowdown
into a copy of the last group (every timed sample of each run.json multiplied by `1 +
--slowdown`: stages, TTFT, TPOT and end-to-end alike) and compares it with the calibration
sweeps, which must FAIL: the summary says CAUGHT or MISSED (and the single sweep's verdict).

Usage:
    python benchmarks/compare_noise.py                       # 10 calibration sweeps, 3 groups of 10, 20 % slowdown
    python benchmarks/compare_noise.py --calibration 5 --pairs 2 --runs 3
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
    parser.add_argument(
        "--calibration", type=int, default=10, help="baseline sweeps (their spread is the noise floor)"
    )
    parser.add_argument(
        "--noise-floor", type=Path, help="a recorded noise floor, pooled with the calibration sweeps' spread"
    )
    parser.add_argument(
        "--pairs", type=int, default=3, help="comparisons of identical code against the calibration"
    )
    parser.add_argument("--runs", type=int, default=10, help="current sweeps per comparison (the nightly's)")
    parser.add_argument("--slowdown", type=float, default=0.2, help="injected slowdown (0.2 = 20 %%)")
    parser.add_argument("--warn", type=float, default=5.0)
    parser.add_argument("--fail", type=float, default=10.0)
    parser.add_argument("--min-ms", type=float, default=0.0)
    parser.add_argument("--root", type=Path, help="default: outputs/benchmarks/compare_noise/<time>")
    parser.add_argument("overrides", nargs="*", help="run overrides after --, added to the defaults")
    args = parser.parse_args(argv)
    if args.calibration < 1 or args.runs < 1 or args.pairs < 1:
        parser.error("--calibration, --runs and --pairs need 1 or more")
    if args.noise_floor is None and args.calibration < 2 and args.runs < 2:
        parser.error("a floor needs 2 or more calibration sweeps or --runs (or give --noise-floor)")
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
    baselines: Sequence[Path], currents: Sequence[Path], thresholds: Thresholds, floor: NoiseFloor | None
) -> tuple[str, str]:
    """The comparison's verdict and its flagged rows, with the floor each had."""
    comparison: Comparison = compare(
        [load_run_set(b) for b in baselines],
        [load_run_set(c) for c in currents],
        thresholds,
        noise_floor=floor,
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
    comparisons: Sequence[tuple[str, Sequence[Path], Sequence[Path]]],
    thresholds: Thresholds,
    floor: NoiseFloor | None,
) -> int:
    print(f"\n{title}")
    clean = 0
    for name, baselines, currents in comparisons:
        outcome, flagged = judged(baselines, currents, thresholds, floor)
        clean += outcome == PASSED
        print(f"  {name}: {outcome}" + (f"  ({flagged})" if flagged else ""))
    print(f"  identical code: {clean} of {len(comparisons)} without a warning")
    return clean


def print_floor(floor: NoiseFloor, thresholds: Thresholds, slowdown: float, runs: tuple[int, int]) -> None:
    """Each figure's between-run spread and the floors it gives one current run and ``runs``
    (calibration, current) runs against the calibration, and whether the injected slowdown can
    exceed any of them."""
    baseline_runs, current_runs = runs
    for job in floor.jobs.values():
        print(f"noise floor of {job.label} ({job.runs} runs, {job.repeats} repeats each):")
        floors = {}
        for figure, spread in job.figures.items():
            alpha = row_alpha(figure, list(job.figures))
            single = floor_pct(spread, baseline_runs=baseline_runs, alpha=alpha)
            floors[figure] = floor_pct(
                spread, baseline_runs=baseline_runs, current_runs=current_runs, alpha=alpha
            )
            print(
                f"  {figure:18s} spread {spread.pct:6.1f} % (dof {spread.dof:4.1f})  floor: one run ±{single:6.1f} %, "
                f"{current_runs} runs ±{floors[figure]:6.1f} %"
            )
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
    warmups = [root / f"warmup_{i:02d}" for i in range(args.warmup_sweeps)]
    calibration = [root / f"cal_{i:02d}" for i in range(args.calibration)]
    groups = [[root / f"sweep_{g:02d}_{i:02d}" for i in range(args.runs)] for g in range(args.pairs)]
    for folder in [*warmups, *calibration, *(s for group in groups for s in group)]:
        run_sweep(folder, overrides)
    recorded = load_noise_floor(args.noise_floor) if args.noise_floor else None
    if len(calibration) >= 2:
        write_json(
            root / "noise_floor.json",
            noise_floor_to_dict(estimate_noise_floor([load_run_set(c) for c in calibration])),
        )
        shown = load_noise_floor(root / "noise_floor.json")
    else:
        shown = recorded
    print(
        f"{len(calibration)} calibration sweeps, then {args.pairs} groups of {args.runs} sweeps of identical "
        f"code, back to back: {' '.join(overrides)}"
    )
    print(
        f"thresholds: warn {args.warn:g} %, fail {args.fail:g} %, each only if significant and beyond the floor"
    )
    print_medians([*calibration, *(s for group in groups for s in group)])
    if shown is not None:
        print_floor(shown, thresholds, args.slowdown, (len(calibration), args.runs))

    single = [(f"sweep {g:2d}", calibration, group[:1]) for g, group in enumerate(groups)]
    count(
        f"one current sweep against the {len(calibration)} calibration sweeps", single, thresholds, recorded
    )
    grouped = [(f"group {g:2d}", calibration, group) for g, group in enumerate(groups)]
    clean = count(
        f"{args.runs} current sweeps against the {len(calibration)} calibration sweeps (the nightly)",
        grouped,
        thresholds,
        recorded,
    )

    slowed = [slowed_copy(s, root / f"slowed_{i:02d}", 1 + args.slowdown) for i, s in enumerate(groups[-1])]
    print(f"\ninjected {args.slowdown:.0%} slowdown into the last group")
    outcome, flagged = judged(calibration, slowed, thresholds, recorded)
    caught = outcome == FAILED
    print(
        f"  {args.runs} slowed sweeps against the calibration: {outcome} ({caught_word(caught)})  ({flagged})"
    )
    one, flagged_one = judged(calibration, slowed[:1], thresholds, recorded)
    print(
        f"  one slowed sweep against the calibration: {one} ({caught_word(one == FAILED)})  ({flagged_one})"
    )
    print(
        f"\nsummary: {clean} of {len(grouped)} comparisons of identical code without a warning "
        f"({args.runs} current against {len(calibration)} baseline sweeps); injected {args.slowdown:.0%} "
        f"slowdown: {caught_word(caught)} (one current sweep: {caught_word(one == FAILED)})"
    )
    return 0 if caught else 1


def caught_word(caught: bool) -> str:
    """A slowdown is caught only where the comparison FAILs (a warning lets the nightly pass)."""
    return "CAUGHT" if caught else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
