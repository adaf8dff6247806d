"""Wall time of the README's main job, `python -m llm_perf_opt.run mode=base`, with the machine it ran on.

Target (issue "right on every machine"): <= 180 s on a 2-core CPU without native bf16, where
dtype=auto picks float32. Prints the CPU model and the flags that decide bf16, the dtype line
the run chose, its wall time and peak RSS, and the per-stage times of run.json.

    python benchmarks/base_run.py                    # dtype=auto
    python benchmarks/base_run.py dtype=float32      # any extra overrides are passed on
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", info, re.M) or [None, ""])[1].split())
    has = [f for f in BF16_FLAGS if f in flags] or ["none"]
    top = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "older"
    return f"CPU: {model[1] if model else 'unknown'}; widest vector ISA {top}; bf16 flags: {', '.join(has)}"


def main() -> None:
    overrides = sys.argv[1:]
    print(cpu_line())
    cmd = [sys.executable, "-m", "llm_perf_opt.run", "mode=base", *overrides]
    print("$ python", " ".join(cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        sys.exit(proc.returncode)
    # The job prints "[<model>] <run dir>" when it is done; its artifacts stay there.
    out = Path(re.search(r"^\[\S+\] (\S.*)$", proc.stdout, re.M)[1])
    record = json.loads((out / "run.json").read_text())
    header = [line for line in proc.stderr.splitlines() if "dtype" in line]
    print(f"run dir: {out}")
    print(header[0] if header else "(no dtype line)")
    print(
        f"wall {wall:.1f} s (target <= 180 s on a CPU without native bf16); "
        f"peak RSS {record['memory']['measured']['peak_rss_bytes'] / 1e9:.1f} GB"
    )
    summary = record["timing"]["summary"]
    print(
        f"TTFT {summary['ttft_ms']['median'] / 1e3:.2f} s, TPOT {summary['tpot_ms']['median']:.0f} ms, "
        f"{record['generated_tokens']} tokens, {record['config']['profiling']['repeats']} timed runs"
    )
    stages = {}
    for sample in record["timing"]["samples"]:
        for stage, calls in sample["stages"].items():
            stages.setdefault(stage, []).append(sum(calls))
    print(
        "stage medians: " + ", ".join(f"{s} {sorted(v)[len(v) // 2] / 1e3:.2f} s" for s, v in stages.items())
    )


if __name__ == "__main__":
    main()
