"""python -m llm_perf_opt.compare BASELINE CURRENT [--warn 5] [--fail 10] [--force] [--shared-only]
[--markdown-out FILE] [--json-out FILE]

Compares a run (run dir or its run.json) or a sweep (dir of job dirs) against a baseline and
prints the comparison as Markdown (see :mod:`llm_perf_opt.report.compare` for the rules).

Exit status: 0 no regression, 1 a figure worse than the fail threshold or a baseline job
that failed or is missing in CURRENT, 2 the runs cannot be compared (printed as one line).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from llm_perf_opt.errors import OneLineParser, UserError
from llm_perf_opt.atomic import write_json, write_text
from llm_perf_opt.report.compare import Thresholds, compare, to_dict, to_markdown
from llm_perf_opt.report.run_dirs import load_run_set


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m llm_perf_opt.compare",
        description="Compare runs or sweeps against a baseline; exit 1 on a regression.",
    )
    parser.add_argument("baseline", type=Path, help="baseline run dir, sweep dir or run.json")
    parser.add_argument("current", type=Path, help="current run dir, sweep dir or run.json")
    parser.add_argument("--warn", type=float, default=5.0, metavar="PCT",
                        help="warn when a figure is worse by more than PCT %% (default 5)")
    parser.add_argument("--fail", type=float, default=10.0, metavar="PCT",
                        help="fail when a figure is worse by more than PCT %% (default 10)")
    parser.add_argument("--force", action="store_true",
                        help="compare even if device, model, mode, dtype or weights differ")
    parser.add_argument("--shared-only", action="store_true",
                        help="compare only the jobs both sides have (a job missing from CURRENT does not fail)")
    parser.add_argument("--markdown-out", type=Path, metavar="FILE", help="also write the Markdown to FILE")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="also write the comparison as JSON to FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        comparison = compare(
            load_run_set(args.baseline),
            load_run_set(args.current),
            Thresholds(args.warn, args.fail),
            force=args.force,
            shared_only=args.shared_only,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown = to_markdown(comparison)
    print(markdown, end="")
    if args.markdown_out is not None:
        write_text(args.markdown_out, markdown)
    if args.json_out is not None:
        write_json(args.json_out, to_dict(comparison))
    return 1 if comparison.failed else 0


if __name__ == "__main__":
    sys.exit(main())
