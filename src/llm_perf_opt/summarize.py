"""python -m llm_perf_opt.summarize SWEEP_DIR

Rebuilds sweep_summary.md, sweep_summary.csv and sweep.png in a sweep dir (see
:mod:`llm_perf_opt.report.sweep_summary`), also for a sweep whose jobs were interrupted or
killed, and prints the Markdown. Exit status: 0 written, 2 the dir is no sweep dir (one line).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from llm_perf_opt.errors import OneLineParser, UserError
from llm_perf_opt.report.sweep_summary import write_summary


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m llm_perf_opt.summarize",
        description="Write the summary of a sweep (one row per job) into its sweep dir.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir whose subdirs are job dirs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = write_summary(args.sweep_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written["md"].read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
