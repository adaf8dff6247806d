"""What dtype=auto picks on this machine, and why: the CPU, its bf16 capability, matmul rates.

Prints lscpu's model name, whether the CPU flags include avx512_bf16 / amx_bf16, torch's own
bf16 probe (the one oneDNN acts on), the auto choice, and a square matmul's rate in fp32 and
bf16 (2 FLOPs per multiply-add: 2 n^3 per product). Usage:

    python benchmarks/dtype_probe.py [--n 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time

import torch

from llm_perf_opt.hardware.precision import BF16_FLAGS, choose_dtype, cpu_flags_include, header_text


def lscpu_fields() -> dict[str, str]:
    if shutil.which("lscpu") is None:
        return {}
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    rows = (line.partition(":") for line in out.splitlines())
    return {key.strip(): value.strip() for key, _, value in rows}


def matmul_gflop_s(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best of `repeats` n x n @ n x n products after one warm-up: 2 n^3 FLOPs / seconds / 1e9."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    lscpu = lscpu_fields()
    print(f"model name: {lscpu.get('Model name', 'unknown')}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    found = sorted(BF16_FLAGS.intersection(lscpu.get("Flags", "").split()))
    print(f"bf16 flags (avx512_bf16, amx_bf16): {', '.join(found) or 'none'}")
    print(f"/proc/cpuinfo cross-check: {cpu_flags_include(BF16_FLAGS)}")
    print(f"torch.ops.mkldnn._is_mkldnn_bf16_supported(): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"auto choice: {header_text(choose_dtype('auto', cpu))}")
    rates = {dtype: matmul_gflop_s(args.n, dtype, args.repeats) for dtype in (torch.float32, torch.bfloat16)}
    for dtype, rate in rates.items():
        name = str(dtype).removeprefix("torch.")
        print(f"{args.n}^3 matmul {name:>8}: {rate:8.1f} GFLOP/s (best of {args.repeats})")
    print(f"bf16 / fp32: {rates[torch.bfloat16] / rates[torch.float32]:.3g}x")


if __name__ == "__main__":
    main()
