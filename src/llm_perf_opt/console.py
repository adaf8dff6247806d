"""llm-perf-opt COMMAND [ARGS]: one installed command for every tool (pyproject.toml's console script).

`llm-perf-opt run mode=base` is `python -m llm_perf_opt.run mode=base`, and so on: each command
calls the same main() with the same arguments. The tools are imported only when chosen, so
`llm-perf-opt --help` and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llm_perf_opt import allocator
from llm_perf_opt.errors import OneLineParser

#: command -> (module whose main() runs it, what it does)
COMMANDS = {
    "run": (
        "llm_perf_opt.run",
        "profile the model stage by stage and write the run's report (Hydra overrides)",
    ),
    "calibrate": ("llm_perf_opt.calibrate", "measure this device's matmul FLOP/s and copy GB/s, cached"),
    "tree": ("llm_perf_opt.tree", "print the model's stage-tagged module tree, write module_tree.json"),
    "compare": ("llm_perf_opt.compare", "compare runs or sweeps against a baseline; exit 1 on a regression"),
    "summarize": ("llm_perf_opt.summarize", "rebuild a sweep's sweep_summary.md/.csv and sweep.png"),
    "report": ("llm_perf_opt.report.__main__", "rebuild a run's report from Nsight Systems stats CSVs"),
    "validate": (
        "llm_perf_opt.analytic.validate",
        "check the analytic FLOPs (or bytes) against a count on the meta model",
    ),
}


def build_parser() -> OneLineParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    parser = OneLineParser(
        prog="llm-perf-opt",
        usage="%(prog)s [-h] COMMAND [ARGS ...]",
        description=f"Per-stage profiling and roofline analysis of DeepSeek-OCR.\n\ncommands:\n{listing}",
        epilog="`llm-perf-opt COMMAND --help` tells a command's own options; each command is also "
        "`python -m llm_perf_opt.<module>`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the command list's lines
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands above")
    return parser


def main() -> None:
    argv = sys.argv[1:]
    parser = build_parser()
    if not argv:
        parser.print_help()
        sys.exit(2)
    # Only the first word is ours: everything after it, --help included, is the command's.
    command = parser.parse_args(argv[:1]).command
    if command == "run":  # before torch loads, as `python -m llm_perf_opt.run` does
        allocator.start_or_exit(argv[1:], argv)
    try:
        tool = importlib.import_module(COMMANDS[command][0])  # seconds: torch loads
    except KeyboardInterrupt:
        print("interrupted by the user while starting", file=sys.stderr)
        sys.exit(130)
    sys.argv = [f"{parser.prog} {command}", *argv[1:]]
    sys.exit(tool.main())
