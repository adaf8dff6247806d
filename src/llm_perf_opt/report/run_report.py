"""What one job writes: run.json, stages.csv, stages.json, kernels.csv, report.md, roofline.png
(trace.pt.trace.json comes from the trace pass). Every file is written atomically, run.json last."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llm_perf_opt.atomic import write_csv, write_json, write_text
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS, Attribution

from .markdown import report_markdown
from .record import RunRecord
from .roofline_plot import roofline_plot
from .run_record import Job, failure_record, run_record
from .stage_report import stage_table


def write_artifacts(out_dir: Path, job: Job) -> dict:
    """The artifacts of a finished job (see :func:`write_report_files`); its stage table and record."""
    m = job.measurement
    table = stage_table(
        m,
        job.stage_model,
        job.hardware.roofs,
        job.dtype_name,
        job.device.type,
        job.op_notes,
        threads=job.split_threads,
        allocator=job.allocator,
    )
    record = run_record(job, table)
    write_report_files(out_dir, record, table, m.attribution)
    return {"stages": table, "record": record}


def write_report_files(
    out_dir: Path, record: RunRecord, table: pd.DataFrame, attribution: Attribution | None
) -> None:
    """stages.csv, stages.json, kernels.csv, roofline.png and report.md first, run.json last: a
    run.json with status ok means every artifact is there."""
    kernels = attribution.kernels if attribution is not None else pd.DataFrame(columns=KERNEL_COLUMNS)
    roofs = record.hardware.roofs
    # The batch on every row: stage times are the whole batch's, and CSVs of several runs get concatenated.
    batch = record.batch_size
    write_csv(out_dir / "stages.csv", table.assign(batch_size=batch))
    write_json(
        out_dir / "stages.json",
        {
            "dtype": record.dtype,
            "batch_size": batch,
            "roofs": [roof.to_dict() for roof in roofs],
            "headline": record.headline.to_dict(),
            "stages": table.to_dict("records"),
        },
    )
    write_csv(out_dir / "kernels.csv", kernels[list(KERNEL_COLUMNS)])
    request = record.request.split(",")[0]
    roofline_plot(
        table,
        roofs,
        record.dtype,
        out_dir / "roofline.png",
        title=f"{record.model_name} · {request} · {record.device.name} · {record.dtype}",
    )
    write_text(out_dir / "report.md", report_markdown(record, table, attribution))
    write_json(out_dir / "run.json", record.to_dict())


def write_failure(out_dir: Path, config: dict, status: str, error: str) -> None:
    write_json(out_dir / "run.json", failure_record(config, status, error).to_dict())
