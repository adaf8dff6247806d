"""python -m llm_perf_opt.compare BASELINE [BASELINE ...] CURRENT [--warn 5] [--fail 10] [--min-ms MS]
[--noise-floor FILE] [--noise-floor-out FILE] [--force] [--shared-only] [--markdown-out FILE] [--json-out FILE]
python -m llm_perf_opt.compare BASELINE [BASELINE ...] --current CURRENT [CURRENT ...] [...]

Compares a run (run dir or its run.json) or a sweep (dir of job dirs) against a baseline and
prints the comparison as Markdown (see :mod:`llm_perf_opt.report.compare` for the rules,
:mod:`llm_perf_opt.report.noise_floor` for the noise floor).
Several BASELINEs are runs of one code version, each its own process: their spread is the
noise floor a change must exceed; ``--noise-floor-out`` records that spread for later
comparisons (``--noise-floor``). Several CURRENTs (``--current``, every positional path is then
a baseline) are runs of the new code version, each its own process: the floor shrinks with
their number, since one process of a machine whose processes differ by s can never show a
change below about 2 s.

Exit status: 0 no regression, 1 a figure worse than the fail threshold or a baseline job
that failed or is missing in CURRENT, 2 the runs cannot be compared (printed as one line).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from llm_perf_opt.atomic import write_json, write_text
from llm_perf_opt.errors import OneLineParser, UserError
from llm_perf_opt.report.compare import Thresholds, compare
from llm_perf_opt.report.compare_output import to_dict, to_markdown
from llm_perf_opt.report.noise_floor import estimate_noise_floor, load_noise_floor, noise_floor_to_dict
from llm_perf_opt.report.run_dirs import load_run_set


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m llm_perf_opt.compare",
        description="Compare runs or sweeps against a baseline; exit 1 on a regression.",
    )
    parser.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="PATH",
        help="BASELINE [BASELINE ...] CURRENT: run dirs, sweep dirs or run.json files, the last one the "
        "current run (with --current, all are baselines); several baselines: runs of one code version, "
        "each its own process, whose spread is the noise floor",
    )
    parser.add_argument(
        "--current",
        type=Path,
        nargs="+",
        metavar="CURRENT",
        help="the current runs (several: runs of the new code version, each its own process); "
        "every positional path is then a baseline",
    )
    parser.add_argument(
        "--warn",
        type=float,
        default=5.0,
        metavar="PCT",
        help="warn when a figure is worse by more than PCT %% (default 5)",
    )
    parser.add_argument(
        "--fail",
        type=float,
        default=10.0,
        metavar="PCT",
        help="fail when a figure is worse by more than PCT %% (default 10)",
    )
    parser.add_argument(
        "--min-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="a change of a median by at most MS ms is noise (default 0: none)",
    )
    parser.add_argument(
        "--noise-floor",
        type=Path,
        metavar="FILE",
        help="noise-floor file recorded with --noise-floor-out on this machine",
    )
    parser.add_argument(
        "--noise-floor-out",
        type=Path,
        metavar="FILE",
        help="write the noise floor measured on the BASELINEs (2 or more) to FILE",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="compare even if device, model, mode, dtype, weights or batch size differ",
    )
    parser.add_argument(
        "--shared-only",
        action="store_true",
        help="compare only the jobs both sides have (a job missing from CURRENT does not fail)",
    )
    parser.add_argument("--markdown-out", type=Path, metavar="FILE", help="also write the Markdown to FILE")
    parser.add_argument(
        "--json-out", type=Path, metavar="FILE", help="also write the comparison as JSON to FILE"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.current is None and len(args.paths) < 2:
        parser.error("give a BASELINE and a CURRENT (or the CURRENTs with --current)")
    base_paths, cur_paths = (args.paths, args.current) if args.current else (args.paths[:-1], args.paths[-1:])
    try:
        _check_paths(base_paths, cur_paths)
        baselines = [load_run_set(path) for path in base_paths]
        floor_out = None
        if args.noise_floor_out is not None:
            if len(baselines) < 2:
                raise UserError("--noise-floor-out needs 2 or more BASELINEs (runs of one code version)")
            floor_out = estimate_noise_floor(baselines)
        comparison = compare(
            baselines,
            [load_run_set(path) for path in cur_paths],
            Thresholds(args.warn, args.fail, args.min_ms),
            force=args.force,
            shared_only=args.shared_only,
            noise_floor=None if args.noise_floor is None else load_noise_floor(args.noise_floor),
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
    if floor_out is not None:
        write_json(args.noise_floor_out, noise_floor_to_dict(floor_out))
    return 1 if comparison.failed else 0


def _check_paths(baselines: Sequence[Path], currents: Sequence[Path]) -> None:
    """A run given twice on a side, or on both sides where one has several runs, would
    understate the spread between runs."""
    seen: dict[Path, str] = {}
    for side, paths in (("BASELINE", baselines), ("CURRENT", currents)):
        for path in paths:
            resolved = path.resolve()
            if resolved in seen and (seen[resolved] == side or len(baselines) > 1 or len(currents) > 1):
                where = "given twice" if seen[resolved] == side else f"also one of the {seen[resolved]}s"
                raise UserError(f"{side} {path} is {where}")
            seen[resolved] = side


if __name__ == "__main__":
    sys.exit(main())
