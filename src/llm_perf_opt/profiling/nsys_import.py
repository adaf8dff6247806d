"""Import Nsight Systems ``nsys stats`` CSV reports into the stage attribution tables.

Input: the files that ::

    nsys stats -f csv --force-export=true -o PREFIX \\
        -r nvtx_sum,cuda_gpu_kern_sum,nvtx_kern_sum[,nvtx_gpu_proj_sum] report.nsys-rep

writes as ``PREFIX_<report>.csv`` (column layouts as `nsys stats --help-reports` documents them; ``nvtx_sum`` may
be the older ``nvtx_pushpop_sum``). Output: the :class:`~llm_perf_opt.profiling.attribution.Attribution`
that the torch.profiler attribution produces, with basis ``"device"``, so an Nsight-measured
run gets the same stage and kernel tables.

Rules:

* Range names. nsys shows a range as ``name``, ``:name`` (push/pop range) or ``domain:name``.
  Everything before the last ``:`` must be empty or the NVTX domain (stage range names never
  contain ``:``); ranges of other domains and names that are not stage ranges
  (:func:`~llm_perf_opt.runners.ranges.is_range_name`) are ignored.
* Innermost crediting. ``nvtx_kern_sum`` lists each kernel under every range that encloses
  its launch, ancestors included. The ranges nested in stage ``s`` are its ``s/family``
  ranges, so for every kernel ``k``, in instances and in time::

      own(s, k)          = listed(s, k) − Σ_family listed(s/family, k)
      own(s/family, k)   = listed(s/family, k)

  A family range listing more instances of a kernel than its stage contradicts that layout
  and is refused.
* Per range: ``busy_ms = device_ms = Σ_k listed(r, k)`` (inclusive of nested ranges),
  ``self_busy_ms = Σ_k own(r, k)``; ``range_calls`` and ``range_ms`` (CPU-side duration) come
  from ``nvtx_sum``, so a range that launched no kernel still appears, with 0 busy time.
  ``cpu_self_ms`` is NaN: these reports hold no CPU-op times.
* Totals: ``total_busy_ms`` is the ``cuda_gpu_kern_sum`` total, ``unattributed_ms`` = total −
  Σ own time; per kernel, ``(unattributed)`` gets its total minus its own time in all ranges.
* Only kernels count: these reports leave out memcpy/memset, which the torch.profiler
  attribution includes.

Times without a unit in the header are nanoseconds (the nsys default).
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from llm_perf_opt.errors import UserError
from llm_perf_opt.runners.ranges import NVTX_DOMAIN, SEPARATOR, is_range_name, stage_of

from .attribution import KERNEL_COLUMNS, STAGE_COLUMNS, UNATTRIBUTED, Attribution, range_order

KERNEL_SUM, RANGE_SUM, RANGE_KERNEL_SUM, PROJECTION_SUM = (
    "cuda_gpu_kern_sum",
    "nvtx_sum",
    "nvtx_kern_sum",
    "nvtx_gpu_proj_sum",
)
REQUIRED_REPORTS = (KERNEL_SUM, RANGE_SUM, RANGE_KERNEL_SUM)
#: Columns of :func:`gpu_projection`.
PROJECTION_COLUMNS = ("stage", "range_calls", "projected_ms", "range_ms", "gpu_ops")

# Report names as nsys versions spell them in file names, newest first.
_FILE_NAMES = {RANGE_SUM: (RANGE_SUM, "nvtx_pushpop_sum")}
_UNIT_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
_UNIT = re.compile(r"^(?P<name>.*?)\s*\((?P<unit>[^()]*)\)$")
# Printed figures may be rounded (e.g. with a coarser time unit): allow that much when
# checking that a nested range has no more time than its enclosing one.
_RELATIVE_TOLERANCE = 1e-4
_ABSOLUTE_TOLERANCE_MS = 1e-6


@dataclass(frozen=True)
class _Layout:
    """Columns a report must have: text, integer counts, and times (converted to ms)."""

    text: tuple[str, ...]
    counts: tuple[str, ...]
    times: tuple[str, ...]

    @property
    def required(self) -> tuple[str, ...]:
        return self.text + self.counts + self.times


_LAYOUTS = {
    KERNEL_SUM: _Layout(("Name",), ("Instances",), ("Total Time",)),
    RANGE_SUM: _Layout(("Range",), ("Instances",), ("Total Time",)),
    RANGE_KERNEL_SUM: _Layout(("NVTX Range", "Kernel Name"), ("Kern Inst",), ("Total Time",)),
    PROJECTION_SUM: _Layout(
        ("Range",), ("Range Instances", "Total GPU Ops"), ("Total Proj Time", "Total Range Time")
    ),
}


def find_reports(path: str | Path) -> dict[str, Path]:
    """The ``PREFIX_<report>.csv`` files at ``path``: a prefix (``out/run`` for
    ``out/run_nvtx_sum.csv``) or a directory holding one set. The projection report is
    included when present; a missing required report is a :class:`UserError`."""
    path = Path(path)
    found: dict[str, Path] = {}
    for report in (*REQUIRED_REPORTS, PROJECTION_SUM):
        for name in _FILE_NAMES.get(report, (report,)):
            if path.is_dir():
                matches = sorted(path.glob(f"*_{name}.csv"))
                if len(matches) > 1:
                    example = path / matches[0].name.removesuffix(f"_{name}.csv")
                    raise UserError(
                        f"{path}: several {name} reports ({', '.join(m.name for m in matches)}); "
                        f"give the prefix, e.g. {example}"
                    )
            else:
                candidate = path.parent / f"{path.name}_{name}.csv"
                matches = [candidate] if candidate.is_file() else []
            if matches:
                found[report] = matches[0]
                break
    missing = [report for report in REQUIRED_REPORTS if report not in found]
    if missing:
        raise UserError(
            f"{path}: no {', '.join(f'*_{r}.csv' for r in missing)} (write them with "
            f"nsys stats -f csv --force-export=true -o PREFIX -r {','.join(REQUIRED_REPORTS)} REPORT.nsys-rep)"
        )
    return found


def read_report(path: str | Path, report: str) -> pd.DataFrame:
    """The required columns of one ``nsys stats`` CSV, named without their unit, times in ms.

    Lines before the header (notices that nsys prints when its output is redirected into
    the file) are skipped. Bad content is a one-line :class:`UserError` naming file and line.
    """
    path = Path(path)
    layout = _LAYOUTS[report]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    header_at, header = _find_header(lines, layout.required)
    if header_at is None:
        raise UserError(
            f"{path}: not an nsys stats {report} CSV (no header with columns {', '.join(layout.required)})"
        )
    names, units = zip(*(_split_unit(cell) for cell in header))
    index = {name: names.index(name) for name in layout.required}
    scale = {}
    for name in layout.times:
        unit = units[index[name]] or "ns"
        if unit not in _UNIT_MS:
            raise UserError(f"{path}: column {name!r} has unknown time unit {unit!r}")
        scale[name] = _UNIT_MS[unit]
    columns: dict[str, list] = {name: [] for name in layout.required}
    for number, row in enumerate(csv.reader(lines[header_at + 1 :]), start=header_at + 2):
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"{path}: line {number} has {len(row)} fields, the header {len(header)}")
        for name in layout.text:
            columns[name].append(row[index[name]].strip())
        for name in layout.counts:
            columns[name].append(_number(path, number, name, row[index[name]], int))
        for name in layout.times:
            columns[name].append(_number(path, number, name, row[index[name]], float) * scale[name])
    return pd.DataFrame(columns, columns=list(layout.required))


def range_name(raw: str, stages: Sequence[str], domain: str = NVTX_DOMAIN) -> str | None:
    """The stage range an nsys range name refers to (``"llm_perf_opt:prefill/attn"`` ->
    ``"prefill/attn"``), or ``None`` for another domain's or a non-stage range."""
    *prefixes, name = raw.strip().split(":")
    if any(prefix not in ("", domain) for prefix in prefixes):
        return None
    return name if is_range_name(name, stages) else None


def attribute_nsys(
    kernels: pd.DataFrame,
    ranges: pd.DataFrame,
    range_kernels: pd.DataFrame,
    stages: Sequence[str],
    domain: str = NVTX_DOMAIN,
) -> Attribution:
    """Attribution from the ``cuda_gpu_kern_sum``, ``nvtx_sum`` and ``nvtx_kern_sum`` tables
    (as :func:`read_report` returns them); rules in the module docstring."""
    known = tuple(stages)
    host = _per_range(ranges, "Range", known, domain).groupby("stage")[["Instances", "Total Time"]].sum()
    listed_table = (
        _per_range(range_kernels, "NVTX Range", known, domain)
        .groupby(["stage", "Kernel Name"])[["Kern Inst", "Total Time"]]
        .sum()
    )
    listed = _calls_and_ms(listed_table)
    unknown = sorted({rng for rng, _ in listed} - set(host.index))
    if unknown:
        raise UserError(
            f"{RANGE_KERNEL_SUM} has ranges that {RANGE_SUM} lacks ({', '.join(unknown)}): "
            "reports of different captures?"
        )

    own = _own_kernel_time(listed, list(host.index))
    kernel_totals = _calls_and_ms(kernels.groupby("Name")[["Instances", "Total Time"]].sum())
    per_name = {key: value for key, value in own.items() if value[0] > 0}
    for name, calls, ms in _unattributed(own, kernel_totals):
        per_name[(UNATTRIBUTED, name)] = (calls, ms)

    total_ms = sum(ms for _, ms in kernel_totals.values())
    attributed_ms = sum(ms for _, ms in own.values())
    stage_table = _stage_table(host, listed, own, total_ms, known)
    return Attribution(
        stages=stage_table,
        kernels=_kernel_table(per_name, known),
        basis="device",
        total_busy_ms=total_ms,
        unattributed_ms=max(total_ms - attributed_ms, 0.0),
        coverage=attributed_ms / total_ms if total_ms > 0 else 0.0,
    )


def gpu_projection(
    projection: pd.DataFrame, stages: Sequence[str], domain: str = NVTX_DOMAIN
) -> pd.DataFrame:
    """Per stage range of ``nvtx_gpu_proj_sum``: instances, projected GPU time (first GPU op
    start to last end, summed over instances: idle bubbles included, so projected − busy is
    the time the GPU waited inside the range), CPU-side range time and GPU op count."""
    known = tuple(stages)
    table = _per_range(projection, "Range", known, domain).groupby("stage").sum(numeric_only=True)
    records = [
        {
            "stage": name,
            "range_calls": int(row["Range Instances"]),
            "projected_ms": float(row["Total Proj Time"]),
            "range_ms": float(row["Total Range Time"]),
            "gpu_ops": int(row["Total GPU Ops"]),
        }
        for name, row in sorted(table.iterrows(), key=lambda item: range_order(item[0], known))
    ]
    return pd.DataFrame.from_records(records, columns=list(PROJECTION_COLUMNS))


def load_nsys_attribution(path: str | Path, stages: Sequence[str], domain: str = NVTX_DOMAIN) -> Attribution:
    """:func:`attribute_nsys` of the reports at ``path`` (see :func:`find_reports`)."""
    files = find_reports(path)
    return attribute_nsys(
        read_report(files[KERNEL_SUM], KERNEL_SUM),
        read_report(files[RANGE_SUM], RANGE_SUM),
        read_report(files[RANGE_KERNEL_SUM], RANGE_KERNEL_SUM),
        stages,
        domain,
    )


def load_gpu_projection(
    path: str | Path, stages: Sequence[str], domain: str = NVTX_DOMAIN
) -> pd.DataFrame | None:
    """:func:`gpu_projection` of the ``nvtx_gpu_proj_sum`` report at ``path``, or ``None`` without one."""
    files = find_reports(path)
    if PROJECTION_SUM not in files:
        return None
    return gpu_projection(read_report(files[PROJECTION_SUM], PROJECTION_SUM), stages, domain)


def _find_header(lines: list[str], required: tuple[str, ...]) -> tuple[int | None, list[str]]:
    for at, line in enumerate(lines):
        cells = next(csv.reader([line]), [])
        if set(required) <= {_split_unit(cell)[0] for cell in cells}:
            return at, cells
    return None, []


def _split_unit(cell: str) -> tuple[str, str]:
    """``"Total Time (ns)"`` -> ``("Total Time", "ns")``; ``"Instances"`` -> ``("Instances", "")``."""
    cell = cell.strip()
    match = _UNIT.match(cell)
    return (match["name"], match["unit"].strip()) if match else (cell, "")


def _number(path: Path, line: int, column: str, text: str, kind: type) -> float | int:
    try:
        value = kind(text.strip())
    except ValueError:
        raise UserError(f"{path}: line {line}, column {column!r}: not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{path}: line {line}, column {column!r}: not a non-negative number: {text!r}")
    return value


def _calls_and_ms(table: pd.DataFrame) -> dict:
    """``{index: (count, ms)}`` of a table with a count and a time column, in that order."""
    return {key: (int(calls), float(ms)) for key, (calls, ms) in zip(table.index, table.to_numpy())}


def _per_range(table: pd.DataFrame, column: str, known: tuple[str, ...], domain: str) -> pd.DataFrame:
    """Rows of stage ranges only, with their stage range name in column ``stage``."""
    names = table[column].map(lambda raw: range_name(raw, known, domain))
    return table.assign(stage=names)[names.notna()]


def _own_kernel_time(
    listed: dict[tuple[str, str], tuple[int, float]], range_names: list[str]
) -> dict[tuple[str, str], tuple[int, float]]:
    """Per (range, kernel), the instances and time whose innermost stage range it is."""
    ranges = set(range_names)
    nested: defaultdict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, []])
    for (rng, kernel), (calls, ms) in listed.items():
        stage = stage_of(rng)
        if SEPARATOR in rng and stage in ranges:
            entry = nested[(stage, kernel)]
            entry[0] += calls
            entry[1] += ms
            entry[2].append(rng)
    for (stage, kernel), (calls, ms, children) in nested.items():
        stage_calls, stage_ms = listed.get((stage, kernel), (0, 0.0))
        if calls > stage_calls or ms > stage_ms * (1 + _RELATIVE_TOLERANCE) + _ABSOLUTE_TOLERANCE_MS:
            raise UserError(
                f"{RANGE_KERNEL_SUM} lists kernel {kernel!r} {calls} times ({ms:.6g} ms) in {', '.join(children)} "
                f"but {stage_calls} times ({stage_ms:.6g} ms) in the enclosing {stage}; expected each kernel under "
                "every enclosing range"
            )
    own = {}
    for key, (calls, ms) in listed.items():
        nested_calls, nested_ms, _ = nested.get(key, (0, 0.0, ()))
        own[key] = (calls - nested_calls, max(ms - nested_ms, 0.0))
    return own


def _unattributed(
    own: dict[tuple[str, str], tuple[int, float]], totals: dict[str, tuple[int, float]]
) -> list[tuple[str, int, float]]:
    """Per kernel name: instances and time of ``cuda_gpu_kern_sum`` not credited to any range."""
    credited: defaultdict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for (_, kernel), (calls, ms) in own.items():
        credited[kernel][0] += calls
        credited[kernel][1] += ms
    rest = []
    for kernel in sorted(credited.keys() | totals.keys()):
        total_calls, total_ms = totals.get(kernel, (0, 0.0))
        calls, ms = credited[kernel]
        if calls > total_calls or ms > total_ms * (1 + _RELATIVE_TOLERANCE) + _ABSOLUTE_TOLERANCE_MS:
            raise UserError(
                f"{RANGE_KERNEL_SUM} credits kernel {kernel!r} with {calls} instances ({ms:.6g} ms) but "
                f"{KERNEL_SUM} has {total_calls} ({total_ms:.6g} ms): reports of different captures?"
            )
        if total_calls > calls:
            rest.append((kernel, total_calls - int(calls), max(total_ms - ms, 0.0)))
    return rest


def _stage_table(
    host: pd.DataFrame,
    listed: dict[tuple[str, str], tuple[int, float]],
    own: dict[tuple[str, str], tuple[int, float]],
    total_ms: float,
    known: tuple[str, ...],
) -> pd.DataFrame:
    busy: defaultdict[str, float] = defaultdict(float)
    self_busy: defaultdict[str, float] = defaultdict(float)
    for (rng, _), (_, ms) in listed.items():
        busy[rng] += ms
    for (rng, _), (_, ms) in own.items():
        self_busy[rng] += ms
    records = [
        {
            "stage": name,
            "range_calls": int(row["Instances"]),
            "range_ms": float(row["Total Time"]),
            "cpu_self_ms": math.nan,
            "device_ms": busy[name],
            "busy_ms": busy[name],
            "self_busy_ms": self_busy[name],
            "share": busy[name] / total_ms if total_ms > 0 else 0.0,
        }
        for name, row in sorted(host.iterrows(), key=lambda item: range_order(item[0], known))
    ]
    return pd.DataFrame.from_records(records, columns=list(STAGE_COLUMNS))


def _kernel_table(per_name: dict[tuple[str, str], tuple[int, float]], known: tuple[str, ...]) -> pd.DataFrame:
    """Instances and time per (innermost range, kernel), largest first within a range."""
    records = [
        {"stage": stage, "name": name, "calls": int(calls), "total_ms": ms}
        for (stage, name), (calls, ms) in sorted(
            per_name.items(), key=lambda item: (range_order(item[0][0], known), -item[1][1], item[0][1])
        )
    ]
    return pd.DataFrame.from_records(records, columns=list(KERNEL_COLUMNS))
