"""Time the analytic stage model over every mode and tiling (target: under 1 s in total).

No model instance is built: the stage model works from shapes alone. Prints the median of
a few repeats. Usage: python3 benchmarks/analytic_speed.py [repeats]
"""

from __future__ import annotations

import statistics
import sys

from llm_perf_opt.analytic.validate import analytic_speed, cases
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig

TARGET_S = 1.0


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    cfg = DeepSeekOCRConfig()
    seconds = statistics.median(analytic_speed(cfg, text_tokens=12) for _ in range(repeats))
    print(f"stage model with totals tables, {len(cases())} cases: median {seconds * 1e3:.1f} ms "
          f"over {repeats} repeats (target < {TARGET_S:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
