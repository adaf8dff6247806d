"""A run's report rebuilt with busy times and kernels from Nsight Systems instead of the trace pass.

Input: a run dir whose run.json has status ok (normally written by ``runners/nsys_profile.sh``,
which runs the job under ``nsys profile`` with the torch.profiler pass off) and the ``nsys stats``
CSVs of that capture (:func:`~llm_perf_opt.profiling.nsys_import.find_reports`: the run dir
itself, or another prefix or folder). Output: stages.csv, stages.json, kernels.csv, roofline.png,
report.md and run.json rewritten from run.json's timing samples and analytic totals joined with
the imported :class:`~llm_perf_opt.profiling.attribution.Attribution`; run.json's ``trace.basis``
becomes :data:`~llm_perf_opt.report.run_record.NSYS_BASIS`.

Per run. The capture spans several runs of the job (runners/nsys_profile.sh's: the timed runs,
its capture range; one without a capture range: the warm-up runs and request preparations too),
while a trace pass covers exactly one. With ``c(s)`` the calls of
stage ``s`` per timed run and ``n(s)`` its range instances in the capture, every figure of ``s``
and of its nested ``s/family`` ranges is scaled to one run::

    f(s) = c(s) / n(s)
    busy, self busy, device and host time, range instances of a range r:  × f(stage of r)
    calls and total time of a kernel row credited to r:                  × f(stage of r)

so calls become per-run averages (whole numbers when every run launched the same kernels).
Kernel rows outside every stage range, ``share``, ``total_busy_ms``, ``unattributed_ms`` and
``coverage`` stay figures of the whole capture (shares of it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.attribution import UNATTRIBUTED, Attribution
from llm_perf_opt.profiling.nsys_import import (
    RANGE_KERNEL_SUM,
    find_reports,
    load_nsys_attribution,
)
from llm_perf_opt.runners.ranges import stage_of

from .record import RunRecord, Trace, read_record
from .run_record import NSYS_BASIS, headline_figures, record_op_notes, trace_record
from .run_report import write_report_files
from .stage_report import measured_table, stage_table_from, steps_per_stage, work_table

RUN_JSON = "run.json"
#: Range columns of :attr:`Attribution.stages` that are sums over the capture.
_SCALED_RANGE_COLUMNS = ("range_calls", "range_ms", "cpu_self_ms", "device_ms", "busy_ms", "self_busy_ms")
#: Fields of run.json the rebuild reads (older run.json files lack ``stage_layout`` and ``request``).
_NEEDED = (
    "config",
    "device",
    "hardware",
    "dtype",
    "dtype_reason",
    "request",
    "stage_layout",
    "timing",
    "analytic",
    "memory",
    "versions",
)


def calls_per_run(runs: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, int]:
    """Calls of each stage in the first timed run, as the ``calls`` column of the stage table counts them."""
    return {stage: len(calls) for stage, calls in runs[0].items()} if runs else {}


def per_run(attribution: Attribution, calls: Mapping[str, int]) -> Attribution:
    """``attribution`` of a capture of several runs scaled to one run (module docstring).

    A stage range missing from ``calls`` did not run in the timed runs: its factor is 0."""
    stages = attribution.stages
    instances = dict(zip(stages["stage"], stages["range_calls"]))
    factor = {
        name: calls.get(name, 0) / count
        for name, count in instances.items()
        if stage_of(name) == name and count > 0
    }

    def scale(names: pd.Series) -> pd.Series:
        return names.map(lambda name: 1.0 if name == UNATTRIBUTED else factor.get(stage_of(name), 0.0))

    scaled_stages = stages.astype({"range_calls": "float64"})
    range_factor = scale(stages["stage"])
    for column in _SCALED_RANGE_COLUMNS:
        scaled_stages[column] = stages[column] * range_factor
    kernels = attribution.kernels.astype({"calls": "float64"})
    kernel_factor = scale(kernels["stage"])
    kernels["calls"] = kernels["calls"] * kernel_factor
    kernels["total_ms"] = kernels["total_ms"] * kernel_factor
    return replace(attribution, stages=scaled_stages, kernels=kernels)


def read_run(run_dir: Path) -> RunRecord:
    """run.json of a finished run, with the fields the rebuild needs; :class:`UserError` otherwise."""
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RUN_JSON} (give the run dir of the profiled job)")
    record = read_record(path)
    if not record.ok:
        raise UserError(f"{path}: the run did not finish (status {record.status!r}); nothing to rebuild")
    missing = [name for name in _NEEDED if getattr(record, name) is None]
    if missing:
        raise UserError(
            f"{path}: lacks {', '.join(missing)} (written by an older llm_perf_opt?); rerun the job"
        )
    return record


def rebuild(run_dir: str | Path, reports: str | Path | None = None) -> pd.DataFrame:
    """Rewrite the run dir's report files from its run.json and the Nsight CSVs at ``reports``
    (default: the run dir); returns the new stage table."""
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    source = Path(reports) if reports is not None else run_dir
    layout = record.stage_layout
    runs = [sample.stages for sample in record.samples]
    os_runs = [sample.os for sample in record.samples]
    attribution = per_run(load_nsys_attribution(source, layout.order), calls_per_run(runs))
    table = stage_table_from(
        measured_table(layout.order, runs, attribution, os_runs),
        work_table(record.analytic),
        attribution,
        record.hardware.roofs,
        record.dtype,
        "cuda",  # Nsight Systems' busy time is GPU kernel time, whatever the record says
        steps_per_stage(layout.per_step, runs),
        record_op_notes(record),
        allocator=record.cpu.get("in_force"),
    )
    label = _reports_label(find_reports(source)[RANGE_KERNEL_SUM], run_dir)
    record = replace(record, trace=Trace.from_dict(trace_record(attribution, label, NSYS_BASIS)))
    write_report_files(run_dir, replace(record, headline=headline_figures(record, table)), table, attribution)
    return table


def _reports_label(kernel_sum: Path, run_dir: Path) -> str:
    """``nsys_*.csv`` for reports in the run dir, else the full prefix pattern."""
    pattern = kernel_sum.with_name(kernel_sum.name.removesuffix(f"_{RANGE_KERNEL_SUM}.csv") + "_*.csv")
    return pattern.name if pattern.parent.resolve() == run_dir.resolve() else str(pattern)
