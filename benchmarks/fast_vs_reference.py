"""`model.impl=fast` against `reference`, measured by the harness itself, per dtype.

For each dtype of `--dtypes` (default: `auto`, the one a plain run picks here, and float32),
runs the harness on `model.impl=reference` and `model.impl=fast`, interleaved (`--rounds N`
gives N reference/fast pairs in A/B order, so a load trend on a shared machine hits both),
then prints the CPU, the fast paths the fast jobs chose (and the times that chose them), and
per stage the median time of each implementation over all timed repeats of its jobs, the
reference's range [min, max], its % of the calibrated roof (`calibrated_pct_roof_wall` of
stages.csv), the speedup, and whether fast is slower beyond the spread: its median above the
reference's slowest repeat ("faster": below its fastest). The same for TTFT and TPOT, then `python -m llm_perf_opt.compare`
of the first pair.

By default each job is its own `python -m llm_perf_opt.run` process writing into the sweep
dir: in one in-process Hydra sweep a finished job's model is only freed by Python's cycle
collector, so the next job's memory check still sees it (two full fp32 models do not fit a
23 GB machine). `--one-sweep` runs `python -m llm_perf_opt.run -m model.impl=reference,fast,...`
instead, where memory allows.

Usage:
    python benchmarks/fast_vs_reference.py                      # full model, base mode, auto and fp32, CPU
    python benchmarks/fast_vs_reference.py --dtypes float32 --rounds 2 -- max_new_tokens=8
    python benchmarks/fast_vs_reference.py --model deepseek_ocr_tiny --mode gundam --one-sweep
    python benchmarks/fast_vs_reference.py --report-only outputs/benchmarks/fast_vs_reference/<time>
"""

from __future__ import annotations

import argparse
import json
import re
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
    parser.add_argument("--dtypes", nargs="+", default=["auto", "float32"], help="one comparison per dtype")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=1, help="reference/fast pairs, interleaved")
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        help="default: outputs/benchmarks/fast_vs_reference/<time>; one sub-directory per dtype",
    )
    parser.add_argument(
        "--one-sweep", action="store_true", help="one in-process Hydra sweep (-m) for all jobs"
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="SWEEP_DIR",
        help="print the tables of an existing sweep (one dtype's sub-directory)",
    )
    parser.add_argument("overrides", nargs="*", help="more run overrides (after --), e.g. max_new_tokens=8")
    return parser.parse_args(argv)


def cpu_line() -> str:
    """The CPU model and the flags that decide the fast paths' and the dtypes' speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", info, re.M) or [None, ""])[1].split())
    shown = [
        f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in flags
    ]
    return f"CPU: {model[1] if model else 'unknown'}; flags: {', '.join(shown) or 'none of note'}"


def run_jobs(args: argparse.Namespace, dtype: str, sweep_dir: Path) -> int:
    """The harness on every job, into `sweep_dir/<n>_<impl>/`; returns the worst exit status."""
    common = [f"model={args.model}", f"mode={args.mode}", f"dtype={dtype}", f"device={args.device}"]
    harness = [sys.executable, "-m", "llm_perf_opt.run"]
    impls = IMPLS * args.rounds
    if args.one_sweep:
        commands = [
            [
                *harness,
                "-m",
                *common,
                f"model.impl={','.join(impls)}",
                f"hydra.sweep.dir={sweep_dir}",
                *args.overrides,
            ]
        ]
    else:
        commands = [
            [
                *harness,
                *common,
                f"model.impl={impl}",
                f"hydra.run.dir={sweep_dir / f'{n}_{impl}'}",
                *args.overrides,
            ]
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
    """One job's rows, one per timed repeat: stage, time_ms (the stage's total in that run),
    pct_roof (the job's, from stages.csv), plus TTFT and TPOT (no roof), tagged with impl."""
    record = json.loads((job / RUN_JSON).read_text())
    roof = pd.read_csv(job / STAGES_CSV).set_index("stage")["calibrated_pct_roof_wall"]
    rows = []
    for sample in record["timing"]["samples"]:
        rows += [
            {"stage": stage, "time_ms": sum(calls), "pct_roof": roof.get(stage, float("nan"))}
            for stage, calls in sample["stages"].items()
        ]
        rows.append({"stage": "TTFT", "time_ms": sample["ttft_ms"], "pct_roof": float("nan")})
        if sample.get("tpot_ms") is not None:
            rows.append({"stage": "TPOT", "time_ms": sample["tpot_ms"], "pct_roof": float("nan")})
    table = pd.DataFrame(rows)
    table["impl"] = record["config"]["model"]["impl"]
    table["job"] = job.name
    return table


def speedup_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per stage: median time and % of roof of each implementation over all its repeats, the
    reference's [min, max], speedup = reference time / fast time, and the verdict: fast is
    "slower beyond spread" when its median is above the reference's slowest repeat, "faster"
    when below its fastest."""
    grouped = jobs.groupby(["stage", "impl"], sort=False)
    medians = grouped[["time_ms", "pct_roof"]].median().unstack("impl")
    spread = grouped["time_ms"].agg(["min", "max", "count"]).unstack("impl")
    out = pd.DataFrame(index=jobs["stage"].drop_duplicates())
    for impl in IMPLS:
        out[f"{impl} ms"] = medians[("time_ms", impl)]
        out[f"{impl} % roof"] = medians[("pct_roof", impl)]
    out["reference min-max"] = [
        f"{lo:,.4g}-{hi:,.4g}" for lo, hi in zip(spread[("min", "reference")], spread[("max", "reference")])
    ]
    out["n"] = spread[("count", "fast")].astype(int)
    out["speedup"] = out["reference ms"] / out["fast ms"]
    slower = out["fast ms"] > spread[("max", "reference")]
    faster = out["fast ms"] < spread[("min", "reference")]
    out["fast vs reference"] = [
        "SLOWER beyond spread" if s else "faster" if f else "within spread" for s, f in zip(slower, faster)
    ]
    return out


def chosen_paths(job: Path) -> list[str]:
    """The fast job's record of which paths ran and why."""
    execution = json.loads((job / RUN_JSON).read_text()).get("execution") or {}
    return [execution.get("summary", "")] + execution.get("notes", [])


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
    print(
        f"\n{sweep_dir}: {len(jobs)} finished job(s): "
        + ", ".join(f"{j.name} ({t['impl'][0]})" for j, t in zip(jobs, tables))
    )
    if found != set(IMPLS):
        print(f"only {', '.join(sorted(found))} finished: nothing to compare")
        return
    first = {impl: next(j for j, t in zip(jobs, tables) if t["impl"][0] == impl) for impl in IMPLS}
    dtype_line = json.loads((first["fast"] / RUN_JSON).read_text()).get("dtype", {})
    print(f"\ndtype: {dtype_line}\n")
    print("\n".join(f"    {line}" for line in chosen_paths(first["fast"])))
    slower = speedup_table(frame)
    print("\nMedians over all timed repeats of each implementation's jobs\n")
    print(markdown(slower))
    bad = slower.index[slower["fast vs reference"].str.startswith("SLOWER")].tolist()
    print(f"\nfast slower than reference beyond the spread in: {', '.join(bad) if bad else 'no stage'}")
    print(f"\n`python -m llm_perf_opt.compare {first['reference']} {first['fast']} --force`\n")
    compare.main([str(first["reference"]), str(first["fast"]), "--force"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(cpu_line())
    if args.report_only is not None:
        report(args.report_only)
        return 0
    root = args.sweep_dir or Path("outputs/benchmarks/fast_vs_reference") / time.strftime("%Y-%m-%d_%H-%M-%S")
    status = 0
    for dtype in args.dtypes:
        status = max(status, run_jobs(args, dtype, root / dtype))
    for dtype in args.dtypes:
        print(f"\n## dtype={dtype}")
        report(root / dtype)
    return status


if __name__ == "__main__":
    sys.exit(main())
