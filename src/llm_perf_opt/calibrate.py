"""python -m llm_perf_opt.calibrate: measure this device's ceilings and show them beside the datasheet's.

    python -m llm_perf_opt.calibrate [--device cpu|cuda|cuda:N] [--refresh] [--cache-dir DIR] [--quick]

The figures are cached per device and software version (see `hardware.calibration`); a
second call reuses them unless ``--refresh``. ``--quick`` measures on small sizes (rough
figures, a second or so) and neither reads nor writes the cache.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch

from llm_perf_opt.errors import OneLineParser, UserError
from llm_perf_opt.hardware.calibration import Calibration, cache_path, cached_calibration, calibrate
from llm_perf_opt.hardware.ceilings import Roof, Selection, select
from llm_perf_opt.hardware.device import resolve_device


def parse_device(name: str) -> torch.device:
    """The --device argument as a device this machine has; UserError otherwise."""
    return resolve_device(name)


def comparison_table(calibration: Calibration, datasheet: Roof | None) -> pd.DataFrame:
    """One row per ceiling: calibrated figure and, where there is a datasheet, its figure and the ratio."""
    flop_unit, flop_name = (1e12, "TFLOP/s") if calibration.device_type == "cuda" else (1e9, "GFLOP/s")
    rows = []
    for dtype, rate in calibration.flop_s.items():
        n = calibration.matmul_sizes[dtype]
        note = f"{n}x{n}x{n} matmul"
        if calibration.emulated.get(dtype):
            note += ", emulated (< 1/4 of float32)"
        sheet = None if datasheet is None else datasheet.peak(dtype) / flop_unit
        rows.append((f"matmul {dtype}", flop_name, rate / flop_unit, sheet, note))
    sheet_bw = None if datasheet is None else datasheet.byte_s / 1e9
    copy_note = f"copy of {calibration.copy_bytes >> 20} MiB, read + write"
    rows.append(("memory bandwidth", "GB/s", calibration.byte_s / 1e9, sheet_bw, copy_note))
    if calibration.launch_overhead_s is not None:
        launch_us = calibration.launch_overhead_s * 1e6
        rows.append(("kernel launch", "us", launch_us, None, "per back-to-back tiny kernel"))
    table = pd.DataFrame(rows, columns=["ceiling", "unit", "calibrated", "datasheet", "note"])
    if datasheet is None:
        return table.drop(columns="datasheet")
    table.insert(4, "% of datasheet", 100 * table["calibrated"] / table["datasheet"])
    return table


def render(calibration: Calibration, selection: Selection, cache: str) -> str:
    """The CLI's printout: provenance lines and the comparison table."""
    if selection.roof is not None:
        sheet = f"{selection.key} ({selection.how})"
    elif selection.how == "cpu":
        sheet = "none (CPUs have no datasheet table: the calibrated figures are the ceilings)"
    else:
        sheet = "none"
    lines = [
        f"device:     {calibration.device_name} ({calibration.device_type})",
        f"datasheet:  {sheet}",
        f"key:        {calibration.key}",
        f"measured:   {calibration.measured_at}",
        f"cache:      {cache}",
    ]
    if selection.warning:
        lines.append(f"warning: {selection.warning}")
    table = comparison_table(calibration, selection.roof)
    lines += ["", table.to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.1f}")]
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m llm_perf_opt.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--refresh", action="store_true", help="measure again even if cached")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache folder (default: $LLM_PERF_OPT_CACHE, "
        "else $XDG_CACHE_HOME/llm_perf_opt, else ~/.cache/llm_perf_opt)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, rough figures, no cache")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        device = parse_device(args.device)
        selection = select("auto", device)
        if args.quick:
            calibration, cache = calibrate(device, quick=True), "not used (--quick)"
        else:
            calibration = cached_calibration(device, args.cache_dir, refresh=args.refresh)
            cache = str(cache_path(device, args.cache_dir))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(render(calibration, selection, cache))


if __name__ == "__main__":
    main()
