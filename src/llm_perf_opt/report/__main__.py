"""python -m llm_perf_opt.report --from-nsys RUN_DIR [--reports PATH]

Rebuilds a run dir's stages.csv, stages.json, kernels.csv, report.md, roofline.png and run.json
with the busy times and kernels of Nsight Systems ``nsys stats`` CSVs instead of the
torch.profiler trace (see :mod:`llm_perf_opt.report.from_nsys`). ``runners/nsys_profile.sh``
writes the CSVs as ``RUN_DIR/nsys_<report>.csv`` and calls this at its end.

Exit status: 0 rebuilt, 2 a problem the user can fix (printed as one line).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from llm_perf_opt.errors import OneLineParser, UserError

from .from_nsys import rebuild


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m llm_perf_opt.report",
        description="Rebuild a run's report with busy times and kernels from Nsight Systems.",
    )
    parser.add_argument(
        "--from-nsys",
        type=Path,
        required=True,
        metavar="RUN_DIR",
        help="run dir of a finished job (its run.json has status ok)",
    )
    parser.add_argument(
        "--reports",
        type=Path,
        metavar="PATH",
        help="nsys stats CSVs: a folder holding one set or a prefix (default: RUN_DIR)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        table = rebuild(args.from_nsys, args.reports)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    columns = ["stage", "calls", "time_ms", "busy_ms", "launches"]
    print(table[columns].to_string(index=False))
    print(f"rebuilt {args.from_nsys} from Nsight Systems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
