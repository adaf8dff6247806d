"""`model.impl=fast` against `reference`, measured by the harness itself.

Runs the harness on `model.impl=reference` and `model.impl=fast`, interleaved (`--rounds N`
gives N reference/fast pairs in A/B order, so a load trend on a shared machine hits both),
then prints per stage the median time of each implementation over its jobs, its % of the
calibrated roof (`calibrated_pct_roof_wall` of stages.csv) and the speedup, the same for TTFT
and TPOT, and `python -m llm_perf_opt.compare` of the first pair.

By default each job is its own `python -m llm_perf_opt.run` process writing into the sweep
dir: in one in-process Hydra sweep a finished job's model is only freed by Python's cycle
collector, so the next job's memory check still sees it (two full fp32 models do not fit a
23 GB machine). `--one-sweep` runs `python -m llm_perf_opt.run -m model.impl=reference,fast,...`
instead, where memory allows.

Usage:
    python benchmarks/fast_vs_reference.py                      # full model, base mode, fp32, CPU
    python benchmarks/fast_vs_reference.py --rounds 2 -- max_new_tokens=8 profiling.repeats=2
    python benchmarks/fast_vs_reference.py --model deepseek_ocr_tiny --mode gundam --one-sweep
    python benchmarks/fast_vs_reference.py --report-only outputs/benchmarks/fast_vs_reference/<time>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from llm_perf_opt import compare

IMPLS = ("reference", "fast")
STAGES_CSV = "stages.csv"
RUN_JSON = "run.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deepseek_ocr")
    parser.add_argument("--mode", default="base")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=1, help="reference/fast pairs, interleaved")
    parser.add_argument("--sweep-dir", type=Path, help="default: outputs/benchmarks/fast_vs_reference/<time>")
    parser.add_argument("--one-sweep", action="store_true", help="one in-process Hydra sweep (-m) for all jobs")
    parser.add_argument("--report-only", type=Path, metavar="SWEEP_DIR", help="print the tables of an existing sweep")
    parser.add_argument("overrides", nargs="*", help="more run overrides (after --), e.g. max_new_tokens=8")
    return parser.parse_args(argv)


def run_jobs(args: argparse.Namespace, sweep_dir: Path) -> int:
    """The harness on every job, into `sweep_dir/<n>_<impl>/`; returns the worst exit status."""
    common = [f"model={args.model}", f"mode={args.mode}", f"dtype={args.dtype}", f"device={args.device}"]
    harness = [sys.executable, "-m", "llm_perf_opt.run"]
    impls = IMPLS * args.rounds
    if args.one_sweep:
        commands = [[*harness, "-m", *common, f"model.impl={','.join(impls)}", f"hydra.sweep.dir={sweep_dir}",
                     *args.overrides]]  # fmt: skip
    else:
        commands = [
            [*harness, *common, f"model.impl={impl}", f"hydra.run.dir={sweep_dir / f'{n}_{impl}'}", *args.overrides]
            for n, impl in enumerate(impls)
        ]
    status = 0
    for command in commands:
        print("$", " ".join(command), flush=True)
        status = max(status, subprocess.run(command, check=False).returncode)
    return status


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job dirs of the sweep that finished (status ok), in launch order."""
    jobs = []
    for run_json in sorted(sweep_dir.glob(f"*/{RUN_JSON}"), key=lambda p: int(p.parent.name.split("_")[0])):
        if json.loads(run_json.read_text()).get("status") == "ok":
            jobs.append(run_json.parent)
    return jobs


def job_table(job: Path) -> pd.DataFrame:
    """One job's rows: stage, time_ms, pct_roof, plus TTFT and TPOT (no roof), tagged with impl."""
    record = json.loads((job / RUN_JSON).read_text())
    stages = pd.read_csv(job / STAGES_CSV)[["stage", "time_ms", "calibrated_pct_roof_wall"]]
    stages = stages.rename(columns={"calibrated_pct_roof_wall": "pct_roof"})
    summary = record["timing"]["summary"]
    headline = pd.DataFrame(
        [{"stage": "TTFT", "time_ms": summary["ttft_ms"]["median"], "pct_roof": float("nan")}]
        + ([{"stage": "TPOT", "time_ms": summary["tpot_ms"]["median"], "pct_roof": float("nan")}]
           if summary.get("tpot_ms") else [])  # fmt: skip
    )
    table = pd.concat([stages, headline], ignore_index=True)
    table["impl"] = record["config"]["model"]["impl"]
    table["job"] = job.name
    return table


def speedup_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per stage: median time and % of roof of each implementation over its jobs, and
    speedup = reference time / fast time."""
    medians = jobs.groupby(["stage", "impl"], sort=False)[["time_ms", "pct_roof"]].median().unstack("impl")
    out = pd.DataFrame(index=jobs["stage"].drop_duplicates())
    for impl in IMPLS:
        out[f"{impl} ms"] = medians[("time_ms", impl)]
        out[f"{impl} % roof"] = medians[("pct_roof", impl)]
    out["speedup"] = out["reference ms"] / out["fast ms"]
    return out


def markdown(table: pd.DataFrame) -> str:
    """A pipe table; NaN as '-'."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if pd.isna(value) else f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    header = ["stage", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage, row in table.iterrows():
        lines.append("| " + " | ".join([str(stage), *(cell(v) for v in row)]) + " |")
    return "\n".join(lines)


def report(sweep_dir: Path) -> None:
    jobs = job_dirs(sweep_dir)
    tables = [job_table(job) for job in jobs]
    if not tables:
        print(f"no finished job in {sweep_dir}")
        return
    frame = pd.concat(tables, ignore_index=True)
    found = set(frame["impl"])
    print(f"\n{sweep_dir}: {len(jobs)} finished job(s): " + ", ".join(f"{j.name} ({t['impl'][0]})" for j, t in zip(jobs, tables)))
    if found != set(IMPLS):
        print(f"only {', '.join(sorted(found))} finished: nothing to compare")
        return
    print("\nMedians over the jobs of each implementation (each job: the median of its timed repeats)\n")
    print(markdown(speedup_table(frame)))
    first = {impl: next(j for j, t in zip(jobs, tables) if t["impl"][0] == impl) for impl in IMPLS}
    print(f"\n`python -m llm_perf_opt.compare {first['reference']} {first['fast']} --force`\n")
    compare.main([str(first["reference"]), str(first["fast"]), "--force"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only is not None:
        report(args.report_only)
        return 0
    sweep_dir = args.sweep_dir or Path("outputs/benchmarks/fast_vs_reference") / time.strftime("%Y-%m-%d_%H-%M-%S")
    status = run_jobs(args, sweep_dir)
    report(sweep_dir)
    return status


if __name__ == "__main__":
    sys.exit(main())
