"""The main job under each host allocator available here, each in its own process.

For each of `cpu.allocator=tuned|system|jemalloc|tcmalloc` whose library is installed (tuned
and system always are), runs `python -m llm_perf_opt.run mode=base profiling.trace=false
cpu.allocator=<a>` plus the overrides after `--`, one process per allocator (the allocator is
set when a process starts), in the order given (`--rounds N` repeats the whole order N times,
reversed every other round, so a load trend on a shared machine hits each allocator alike).
Then prints, per allocator, the whole command's wall time, its user and system CPU time, its
minor page faults and peak RSS (the child's own rusage from wait4: the whole process, model
build included), and per stage the median time, the system share of the stage's CPU time and
its minor page faults (stages.csv of the run).

Usage:
    python benchmarks/allocator.py                                # full model, base mode, every allocator here
    python benchmarks/allocator.py --allocators tuned system -- model=deepseek_ocr_tiny max_new_tokens=8
    python benchmarks/allocator.py --rounds 2 -- profiling.repeats=2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from llm_perf_opt import allocator
from llm_perf_opt.errors import UserError

BASE = ("mode=base", "profiling.trace=false")


def available(environ=os.environ) -> list[str]:
    """The allocators this machine can run: tuned and system, and each library that is installed."""
    found = ["tuned", "system"]
    for name in allocator.LIBRARIES:
        try:
            allocator.library(name, environ)
        except UserError:
            continue
        found.append(name)
    return found


def run_one(name: str, overrides: Sequence[str], out: Path) -> dict:
    """One job in its own process: wall time and the child's rusage, and its stage table."""
    command = [sys.executable, "-m", "llm_perf_opt.run", *BASE, f"cpu.allocator={name}", *overrides]
    command.append(f"hydra.run.dir={out}")
    env = {k: v for k, v in os.environ.items() if k != allocator.MARKER}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"cpu.allocator={name} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {
        "allocator": name,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "minor_faults": usage.ru_minflt,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # KiB on Linux
        "stages": pd.read_csv(out / "stages.csv").set_index("stage"),
    }


def report(results: list[dict]) -> str:
    """The figures as markdown: one column per allocator (medians over its rounds)."""
    names = list(dict.fromkeys(r["allocator"] for r in results))
    by = {n: [r for r in results if r["allocator"] == n] for n in names}

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in by[name])

    def stage(name: str, row: str, column: str) -> float:
        return statistics.median(float(r["stages"].loc[row, column]) for r in by[name])

    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in by[names[0]][0]["stages"].index:
        lines.append(f"| {row} ms | " + " | ".join(f"{stage(n, row, 'time_ms'):,.0f}" for n in names) + " |")
    for row in by[names[0]][0]["stages"].index:
        cells = [
            f"{stage(n, row, 'sys_share_pct'):.0f} % · {stage(n, row, 'minor_faults') / 1e3:,.1f} k"
            for n in names
        ]
        lines.append(f"| {row}: sys share · minor faults | " + " | ".join(cells) + " |")
    lines += [
        "| wall of the whole command | " + " | ".join(f"{median(n, 'wall_s'):.1f} s" for n in names) + " |",
        "| sys CPU of user + sys | "
        + " | ".join(
            f"{median(n, 'sys_s'):.1f} s of {median(n, 'user_s') + median(n, 'sys_s'):.1f} s" for n in names
        )
        + " |",
        "| minor page faults | "
        + " | ".join(f"{median(n, 'minor_faults') / 1e6:.2f} M" for n in names)
        + " |",
        "| peak RSS | " + " | ".join(f"{median(n, 'peak_rss_gb'):.2f} GB" for n in names) + " |",
    ]
    rounds = len(by[names[0]])
    return "\n".join(lines) + f"\n\n(medians of {rounds} round{'s' * (rounds > 1)} per allocator)"


def cpu_text() -> str:
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(wanted) or 'none of avx2/avx512'}"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocators", nargs="+", default=None, help="default: every one available here")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/benchmarks/allocator/<time>")
    args = parser.parse_args(ours)
    names = args.allocators or available()
    out = args.out or Path("outputs/benchmarks/allocator") / time.strftime("%Y-%m-%d_%H-%M-%S")
    print(f"{cpu_text()}; load {os.getloadavg()[0]:.2f}; overrides: {' '.join([*BASE, *overrides])}")
    results = []
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            result = run_one(name, overrides, out / f"{round_}_{name}")
            print(f"  round {round_ + 1} {name}: {result['wall_s']:.1f} s", flush=True)
            results.append(result)
    print(f"load {os.getloadavg()[0]:.2f} at the end\n")
    print(report(results))


if __name__ == "__main__":
    main()
