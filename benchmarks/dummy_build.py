"""Time the dummy-weight build of the full-size model (issue target: <= 15 s on a 2-core CPU).

python benchmarks/dummy_build.py [--device cpu|cuda] [--repeats 1]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.weights import dummy_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for i in range(args.repeats):
        t0 = time.perf_counter()
        model = dummy_model(DeepSeekOCRConfig(), args.device, torch.bfloat16)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        print(f"build {i + 1}: {seconds:.2f} s for {params:,} parameters in bf16 on {args.device}")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
