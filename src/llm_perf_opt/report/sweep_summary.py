"""The summary of a sweep: one row per job, as ``sweep_summary.csv``, ``sweep_summary.md`` and
``sweep.png`` (stage time per job as stacked bars) in the sweep dir; for a sweep over the batch
size, also ``throughput.png`` and a section on throughput against latency (report.batch_scaling).

    write_summary(sweep_dir)        # reads the job dirs, writes the files

A row holds the job dir name, the overrides it was launched with (Hydra's own left out), model,
mode, batch size, image tokens, dtype, the medians of TTFT, TPOT, decode tokens/s, end-to-end
time, generated tokens/s and pages/s (run.json ``headline``, else ``timing.summary``), and per stage its median time per run
(``<stage>_ms``, the ``time_ms`` of stages.csv) and its % of each roof over that time
(``<stage>_pct_<roof>_roof``, stages.csv's ``<roof>_pct_roof_wall``), then status and the
one-line error of a failed, interrupted or missing job.

Stages and roofs come from the jobs' stages.csv, in row (and column) order; a stage that only
some jobs have is placed before the stage that follows it in those jobs. Nested ranges
(``stage/family`` rows) are left out: their time is already inside their stage's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from llm_perf_opt.atomic import atomic_path, write_csv, write_text
from llm_perf_opt.errors import UserError
from llm_perf_opt.runners.ranges import stage_of

from .batch_scaling import BatchSweep, batch_sweeps, sweep_lines, throughput_plot
from .record import FIGURE_LABELS
from .run_dirs import Job, load_run_set

SUMMARY_MD, SUMMARY_CSV, SUMMARY_PNG = "sweep_summary.md", "sweep_summary.csv", "sweep.png"
THROUGHPUT_PNG = "throughput.png"
STAGES_CSV = "stages.csv"
OK = "ok"

#: Headline figures: (column, named as the record's figure; Markdown header).
HEADLINE = tuple(FIGURE_LABELS.items())
_PCT_SUFFIX = "_pct_roof_wall"
# Plot geometry: inches per job bar, plus room for title, axis and legend.
_WIDTH_IN, _BAR_IN, _FRAME_IN, _MIN_HEIGHT_IN = 10.0, 0.45, 1.9, 3.2
_DPI = 110
_LABEL_CHARS = 40
# A failed job's note (status and error) fits in the plot's width.
_NOTE_CHARS = 90
_EMPTY_BAR = {"boxstyle": "square,pad=0.6", "fill": False, "edgecolor": "gray", "linestyle": "--"}


@dataclass(frozen=True)
class JobResult:
    """One job of a sweep: its run.json record (via :class:`Job`) and its stages.csv, if any."""

    job: Job
    stages: pd.DataFrame | None


@dataclass(frozen=True)
class Summary:
    """The summary table, the stages and roofs its per-stage columns cover (in order), and each
    job's overrides as a list (the table's ``overrides`` column joins them with spaces)."""

    table: pd.DataFrame
    stages: tuple[str, ...]
    roofs: tuple[str, ...]
    overrides: tuple[tuple[str, ...], ...]


def stage_column(stage: str) -> str:
    return f"{stage}_ms"


def roof_column(stage: str, roof: str) -> str:
    return f"{stage}_pct_{roof}_roof"


# -- reading ----------------------------------------------------------------------------------------
def load_sweep(sweep_dir: str | Path) -> list[JobResult]:
    """The jobs of a sweep dir, in job-number order, each finished one with its stages.csv.

    A job that did not finish keeps no stage times even where it left a stages.csv behind:
    run.json is written last, so a killed job may have tables whose run never completed.
    """
    run_set = load_run_set(sweep_dir, distinct=False)
    if not run_set.sweep:
        raise UserError(f"{sweep_dir}: a single run, not a sweep dir of job dirs")
    return [
        JobResult(job, read_stages(job.dir / STAGES_CSV) if job.status == OK else None)
        for job in run_set.jobs
    ]


def read_stages(path: Path) -> pd.DataFrame | None:
    """A job's stages.csv, or None where the job wrote none."""
    if not path.is_file():
        return None
    try:
        stages = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None
    missing = {"stage", "time_ms"} - set(stages.columns)
    if missing:
        raise UserError(f"{path}: no {', '.join(sorted(missing))} column")
    return stages


# -- the table --------------------------------------------------------------------------------------
def merge_order(sequences: Iterable[Sequence[str]]) -> list[str]:
    """The names of all sequences, each sequence's order kept where the sequences agree.

    A name not seen before goes right before the first known name that follows it in its own
    sequence, at the end where none does: ``[a, b, c]`` and ``[a, x, c]`` give ``[a, b, x, c]``.
    """
    order: list[str] = []
    for sequence in sequences:
        sequence = list(sequence)
        for i, name in enumerate(sequence):
            if name not in order:
                after = next((n for n in sequence[i + 1 :] if n in order), None)
                order.insert(len(order) if after is None else order.index(after), name)
    return order


def summarize(results: Sequence[JobResult]) -> Summary:
    """The summary table of ``results``: one row per job (see the module docstring)."""
    per_job = [_top_level(r.stages) for r in results]
    stages = tuple(merge_order(list(s["stage"]) for s in per_job if s is not None))
    roofs = tuple(
        merge_order(
            [c.removesuffix(_PCT_SUFFIX) for c in s.columns if c.endswith(_PCT_SUFFIX)]
            for s in per_job
            if s is not None
        )
    )
    rows = [_row(r.job, s, stages, roofs) for r, s in zip(results, per_job)]
    columns = [
        "job",
        "overrides",
        "model",
        "mode",
        "batch_size",
        "image_tokens",
        "dtype",
        *(c for c, _ in HEADLINE),
        *(stage_column(s) for s in stages),
        *(roof_column(s, r) for r in roofs for s in stages),
        "status",
        "error",
    ]
    table = pd.DataFrame(rows, columns=columns)
    text = ("job", "overrides", "model", "mode", "dtype", "status", "error")
    # Int64 keeps token counts whole next to the missing ones of failed jobs.
    types = {
        c: "Int64" if c in ("image_tokens", "batch_size") else "float64" for c in columns if c not in text
    }
    overrides = tuple(r.job.overrides for r in results)
    return Summary(table.astype(types), stages, roofs, overrides)


def _top_level(stages: pd.DataFrame | None) -> pd.DataFrame | None:
    if stages is None:
        return None
    names = stages["stage"].astype(str)
    return stages[names.map(stage_of) == names]


def _row(job: Job, stages: pd.DataFrame | None, names: Sequence[str], roofs: Sequence[str]) -> dict:
    record = job.record
    # The model's own request facts: DeepSeek-OCR's prompt token counts.
    tokens = record.request_facts.get("tokens") or {}
    row = {
        "job": job.dir.name,
        "overrides": " ".join(job.overrides),
        "model": record.model_name,
        "mode": record.mode_name,
        "batch_size": record.batch_size if job.status == OK else None,
        "image_tokens": tokens.get("image"),
        "dtype": record.dtype,
        **{figure: record.median(figure) for figure, _ in HEADLINE},
        "status": job.status,
        "error": _one_line(job.error),
    }
    by_stage = {} if stages is None else stages.set_index("stage").to_dict("index")
    for stage in names:
        values = by_stage.get(stage, {})
        row[stage_column(stage)] = values.get("time_ms")
        for roof in roofs:
            row[roof_column(stage, roof)] = values.get(roof + _PCT_SUFFIX)
    return row


def _one_line(text: str | None) -> str | None:
    return None if text is None else " ".join(str(text).split())


# -- labels -----------------------------------------------------------------------------------------
def varying_overrides(overrides: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """The overrides all jobs share, and per job the ones whose value differs between jobs."""
    per_job = [dict(_split(o) for o in job) for job in overrides]
    keys = merge_order(list(values) for values in per_job)
    varying = {k for k in keys if len({values.get(k) for values in per_job}) > 1}
    common = [f"{k}={per_job[0][k]}" for k in keys if k not in varying]
    return common, [[f"{k}={v}" for k, v in values.items() if k in varying] for values in per_job]


def job_labels(summary: Summary) -> list[str]:
    """Short labels for the plot: the job number and the values that differ between jobs ("0 tiny")."""
    _, varying = varying_overrides(summary.overrides)
    labels = []
    for name, mode, overrides in zip(summary.table["job"], summary.table["mode"], varying):
        prefix = name.partition("_")[0]
        number = prefix if prefix.isdigit() else name
        values = " · ".join(_split(o)[1] for o in overrides) or (mode if isinstance(mode, str) else "")
        label = f"{number} {values}".strip()
        labels.append(_shorten(label, _LABEL_CHARS))
    return labels


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


# -- Markdown ---------------------------------------------------------------------------------------
def summary_markdown(summary: Summary, title: str, batches: Sequence[BatchSweep] = ()) -> str:
    """The summary as Markdown: the jobs' headline table, then stage times and % of each roof,
    then each batch sweep's throughput against latency."""
    table = summary.table
    common, varying = varying_overrides(summary.overrides)
    jobs = pd.DataFrame(
        {
            "job": table["job"],
            "overrides": [" ".join(f"`{o}`" for o in v) or "-" for v in varying],
            "model": table["model"].map(_text),
            "mode": table["mode"].map(_text),
            "batch": table["batch_size"].map(lambda v: _num(v, 0)),
            "image tokens": table["image_tokens"].map(lambda v: _num(v, 0)),
            "dtype": table["dtype"].map(_text),
            **{header: table[column].map(_num) for column, header in HEADLINE},
            "status": table["status"],
        }
    )
    lines = [f"# Sweep summary: {title}", ""]
    lines.append(f"{len(table)} jobs; {_status_counts(table['status'])}.")
    if common:
        lines.append("Overrides of every job: " + " ".join(f"`{o}`" for o in common) + ".")
    lines += ["", _markdown_table(jobs), ""]
    problems = table[table["status"] != OK]
    if len(problems):
        lines += ["## Jobs that did not finish", ""]
        lines += [
            f"- **{job}** ({status}): {_text(error)}"
            for job, status, error in zip(problems["job"], problems["status"], problems["error"])
        ]
        lines.append("")
    if summary.stages:
        lines += [
            "## Stage time (ms, median per run over the timed repeats)",
            "",
            _markdown_table(_stage_view(table, summary.stages, stage_column, _num)),
            "",
        ]
        for roof in summary.roofs:
            lines += [
                f"## % of the {roof} roof (analytic work over the stage's time)",
                "",
                _markdown_table(
                    _stage_view(
                        table, summary.stages, lambda s, r=roof: roof_column(s, r), lambda v: _num(v, 1)
                    )
                ),
                "",
            ]
        lines += [f"![stage time per job]({SUMMARY_PNG})", ""]
    if batches:
        lines += [
            "## Batch: throughput against latency",
            "",
            "Per batch size: TPOT (per decode step of the whole batch), real tokens per second, and the "
            "analytic intensity of the decode step against the ridge of the run's first roof; the predicted "
            "batch where decode turns compute-bound comes from the largest batch's analytic step "
            "(report/batch_scaling.py gives the formula).",
            "",
        ]
        for sweep in batches:
            lines += sweep_lines(sweep)
        lines += [f"![throughput against latency]({THROUGHPUT_PNG})", ""]
    return "\n".join(lines)


def _stage_view(
    table: pd.DataFrame, stages: Sequence[str], column: Callable[[str], str], fmt: Callable[[object], str]
) -> pd.DataFrame:
    return pd.DataFrame({"job": table["job"], **{s: table[column(s)].map(fmt) for s in stages}})


def _status_counts(statuses: pd.Series) -> str:
    return ", ".join(f"{n} {status}" for status, n in statuses.value_counts(sort=False).items())


def _num(value: object, digits: int = 2) -> str:
    return "-" if pd.isna(value) else f"{value:,.{digits}f}"


def _text(value: object) -> str:
    return "-" if pd.isna(value) else str(value)


def _markdown_table(df: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        # A "|" inside a cell would end it; error messages may hold one.
        return re.sub(r"\s+", " ", str(value)).replace("|", "\\|")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


# -- the picture ------------------------------------------------------------------------------------
def sweep_plot(summary: Summary, path: str | Path, *, title: str) -> Path:
    """Stage time per job as stacked horizontal bars (first job on top), written atomically as PNG.

    One colour per stage in stage order; each bar is labelled with its total (the sum of its
    stage medians). A job without stage times (failed, interrupted, missing) gets an empty bar
    marked with its status.
    """
    table = summary.table
    labels = job_labels(summary)
    height = max(_MIN_HEIGHT_IN, _FRAME_IN + _BAR_IN * len(table))
    fig = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = range(len(table))
    colours = colormaps["tab10" if len(summary.stages) <= 10 else "tab20"]
    left = pd.Series(0.0, index=table.index)
    for i, stage in enumerate(summary.stages):
        times = table[stage_column(stage)].fillna(0.0)
        ax.barh(rows, times, left=left, height=0.6, color=colours(i), label=stage)
        left += times
    has_times = table[[stage_column(s) for s in summary.stages]].notna().any(axis=1)
    ax.set_xlim(0, (left.max() if left.max() > 0 else 1.0) * 1.14)
    for row, total, timed, status, error in zip(rows, left, has_times, table["status"], table["error"]):
        if timed:
            ax.annotate(
                f"{total:,.0f} ms",
                (total, row),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        else:
            # An empty, outlined box in place of the bar: a full-length bar would read as a long time.
            shown = status if status != OK else "no stage times"
            if isinstance(error, str):
                shown = f"{shown}: {error}"
            ax.annotate(
                _shorten(shown, _NOTE_CHARS),
                (0, row),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                fontsize=9,
                style="italic",
                color="dimgray",
                bbox=_EMPTY_BAR,
            )
    ax.set_yticks(list(rows), labels)
    ax.invert_yaxis()
    ax.set_ylabel("job (number, what differs)")
    ax.set_xlabel("stage time per run (ms, median over the timed repeats)")
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title)
    if summary.stages:
        fig.legend(loc="outside right upper", title="stage")
    with atomic_path(path) as tmp:
        canvas.print_png(tmp)
    return Path(path)


# -- all three files --------------------------------------------------------------------------------
def write_summary(sweep_dir: str | Path) -> dict[str, Path]:
    """Read the sweep dir's jobs and write sweep_summary.csv, sweep_summary.md and sweep.png into it."""
    sweep_dir = Path(sweep_dir)
    results = load_sweep(sweep_dir)
    summary = summarize(results)
    title = sweep_dir.resolve().name
    _, varying = varying_overrides([r.job.overrides for r in results])
    batches = batch_sweeps(
        [r.job.record for r in results], [_batch_group(r.job, v) for r, v in zip(results, varying)]
    )
    written = {
        "csv": write_csv(sweep_dir / SUMMARY_CSV, summary.table),
        "png": sweep_plot(summary, sweep_dir / SUMMARY_PNG, title=f"Stage time per job · {title}"),
    }
    if batches:
        written["throughput"] = throughput_plot(
            batches, sweep_dir / THROUGHPUT_PNG, title=f"Batch sweep · {title}"
        )
    written["md"] = write_text(sweep_dir / SUMMARY_MD, summary_markdown(summary, title, batches))
    return written


def _batch_group(job: Job, varying: Sequence[str]) -> str:
    """The group of a job in a batch sweep: the overrides that vary between the sweep's jobs but
    the batch size (jobs that differ only in it form one group), or its model and mode."""
    others = [o for o in varying if _split(o)[0] != "batch_size"]
    return " ".join(others) or f"{job.record.model_name} · {job.record.mode_name}"
