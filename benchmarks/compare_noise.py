"""How often `compare` calls identical code a regression, and whether it catches a real one.

Runs `--pairs + 1` sweeps of the same code back to back (each its own `python -m
llm_perf_opt.run -m` process; default: the reduced model, mode tiny, 8 new tokens, 5 timed
repeats, no trace), compares each sweep with the one before it, and prints the verdict of each
pair and how many said WARN or FAIL. Then it injects a slowdown into a copy of the last sweep
(every timed sample of its run.json multiplied by `1 + --slowdown`: stages, TTFT, TPOT and
end-to-end alike) and compares the last sweep with it, which must FAIL.

Usage:
    python benchmarks/compare_noise.py                       # 10 pairs, 20 % injected slowdown
    python benchmarks/compare_noise.py --pairs 3 -- profiling.repeats=3
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

from llm_perf_opt.report.compare import FAILED, Thresholds, compare
from llm_perf_opt.report.run_dirs import load_run_set

DEFAULT_OVERRIDES = ("model=deepseek_ocr_tiny", "mode=tiny", "max_new_tokens=8", "profiling.repeats=5",
                     "profiling.trace=false", "device=cpu")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10, help="back-to-back pairs of identical sweeps")
    parser.add_argument("--slowdown", type=float, default=0.2, help="injected slowdown (0.2 = 20 %%)")
    parser.add_argument("--warn", type=float, default=5.0)
    parser.add_argument("--fail", type=float, default=10.0)
    parser.add_argument("--root", type=Path, help="default: outputs/benchmarks/compare_noise/<time>")
    parser.add_argument("overrides", nargs="*", help="run overrides after --, added to the defaults")
    return parser.parse_args(argv)


def run_sweep(folder: Path, overrides: Sequence[str]) -> None:
    command = [sys.executable, "-m", "llm_perf_opt.run", "-m", *overrides, f"hydra.sweep.dir={folder}"]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    failed = [p.parent.name for p in folder.glob("*/run.json") if json.loads(p.read_text())["status"] != "ok"]
    if done.returncode != 0 or failed:
        sys.exit(f"error: sweep {folder} failed ({', '.join(failed) or 'no job'}):\n{done.stderr}")


def slowed_copy(sweep: Path, target: Path, factor: float) -> Path:
    """A copy of the sweep whose every timed sample takes `factor` times as long."""
    shutil.copytree(sweep, target)
    for record_path in target.glob("*/run.json"):
        record = json.loads(record_path.read_text())
        for sample in record["timing"]["samples"]:
            sample["stages"] = {stage: [ms * factor for ms in calls] for stage, calls in sample["stages"].items()}
            for key in ("e2e_ms", "ttft_ms", "tpot_ms"):
                if sample.get(key) is not None:
                    sample[key] *= factor
        record_path.write_text(json.dumps(record))
    return target


def verdict(baseline: Path, current: Path, thresholds: Thresholds) -> tuple[str, list[str]]:
    comparison = compare(load_run_set(baseline), load_run_set(current), thresholds)
    flagged = [f"{row.figure} {row.delta_pct:+.1f}% ({row.verdict})" for job in comparison.jobs for row in job.rows
               if row.verdict in ("warn", "fail")]  # fmt: skip
    return comparison.verdict, flagged


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root or Path("outputs/benchmarks/compare_noise") / time.strftime("%Y-%m-%d_%H-%M-%S")
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    thresholds = Thresholds(args.warn, args.fail)
    sweeps = []
    for i in range(args.pairs + 1):
        start = time.perf_counter()
        sweeps.append(root / f"sweep_{i:02d}")
        run_sweep(sweeps[-1], overrides)
        print(f"sweep {i}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"{len(sweeps)} sweeps of identical code, back to back: {' '.join(overrides)}")
    print(f"thresholds: warn {args.warn:g} %, fail {args.fail:g} %, each only if significant")
    flagged_pairs = 0
    for i in range(1, len(sweeps)):
        outcome, flagged = verdict(sweeps[i - 1], sweeps[i], thresholds)
        flagged_pairs += outcome != "PASS"
        print(f"pair {i:2d}: {outcome}" + (f"  ({'; '.join(flagged)})" if flagged else ""))
    print(f"identical code: {args.pairs - flagged_pairs} of {args.pairs} pairs without a warning")
    slowed = slowed_copy(sweeps[-1], root / "slowed", 1 + args.slowdown)
    outcome, flagged = verdict(sweeps[-1], slowed, thresholds)
    print(f"injected {args.slowdown:.0%} slowdown: {outcome}  ({'; '.join(flagged)})")
    return 0 if outcome == FAILED else 1


if __name__ == "__main__":
    sys.exit(main())
