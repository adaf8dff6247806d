"""Time DeepSeek-OCR's analytic stage model over every mode and tiling (target: under 1 s in total).

No model instance is built: the stage model works from shapes alone. Prints the median of
a few repeats. Usage: python3 benchmarks/analytic_speed.py [repeats]
"""

from __future__ import annotations

import statistics
import sys
import time

from llm_perf_opt.models.deepseek_ocr.analytic.checks import GUNDAM_GRIDS, builtin_modes
from llm_perf_opt.models.deepseek_ocr.analytic.costs import stage_costs
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig

TARGET_S = 1.0


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    cfg, modes = DeepSeekOCRConfig(), builtin_modes()
    cases = [(modes[name], None) for name in ("tiny", "small", "base", "large")]
    cases += [(modes["gundam"], grid) for grid in GUNDAM_GRIDS]

    def once() -> float:
        start = time.perf_counter()
        for mode, grid in cases:
            stage_costs(cfg, mode, grid=grid, text_tokens=12, decode_steps=1000).totals()
        return time.perf_counter() - start

    seconds = statistics.median(once() for _ in range(repeats))
    print(
        f"stage model with totals tables, {len(cases)} cases: median {seconds * 1e3:.1f} ms "
        f"over {repeats} repeats (target < {TARGET_S:.0f} s)"
    )


if __name__ == "__main__":
    main()
