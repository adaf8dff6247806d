"""report.md and the table printed at the end of a run: the run record and its stage table, for people."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from llm_perf_opt.hardware.precision import DtypeChoice, header_text
from llm_perf_opt.profiling.attribution import Attribution
from llm_perf_opt.profiling.timing import OUTLIER_FACTOR

from .batch_scaling import crossing_text, step_intensity
from .record import FIGURE_LABELS, Headline, RunRecord, Stats, UntilCv
from .roofline import roof_prefix
from .run_record import NSYS_BASIS
from .stage_report import top_ops

TIME_BASES = (
    "`time_ms` is the median over the timed runs of the stage's measured time (wall clock on a CPU, "
    "CUDA-event stream time on a GPU); `busy_ms` is the op (CPU) or kernel (GPU) time the trace pass "
    "attributes to the stage. `achieved_*_busy` divide the analytic FLOPs and bytes by `busy_ms`, "
    "`achieved_*_wall` by `time_ms`: the gap between them is time the device sat idle inside the stage "
    "(Python, launches, synchronisation), large where a stage is host-bound."
)
NSYS_NOTE = (
    "Here `busy_ms` and the kernels come from Nsight Systems (`nsys stats` nvtx_kern_sum, each kernel "
    "credited to its innermost stage range): the capture spans every run of the job (warm-up included), "
    "so each stage's kernel time and calls are averaged per range instance and multiplied by the stage's "
    "calls per run. `time_ms` is still the timed runs' median, measured under Nsight Systems."
)
SPLIT_NOTE = (
    "Each stage's time = the roofline minimum (its FLOPs and bytes at the {roof} ceilings) + op/kernel "
    "time above that minimum + host time with the device idle (time − busy). The same time, as the "
    "CPU spent it = user + sys + idle: the stage's CPU time in user mode and in the kernel "
    "(getrusage), spread over {threads}, and the capacity left idle; `sys % of CPU` = sys / (user + sys)."
)
OS_NOTE = (
    "Per stage, the change in the process's getrusage counters between its range's entry and exit, "
    "summed over its calls: median [min, max] over the timed runs. CPU times are summed over every "
    "thread of the process; page faults are minor (a fresh page mapped and zeroed) and major (read "
    "from disk); switches are voluntary (a thread waited) and involuntary (preempted)."
)
#: (column, label, digits) of the OS counters' table.
OS_LABELS = (
    ("user_ms", "user CPU ms", 1),
    ("sys_ms", "sys CPU ms", 1),
    ("minor_faults", "minor faults", 0),
    ("major_faults", "major faults", 0),
    ("voluntary_switches", "voluntary switches", 0),
    ("involuntary_switches", "involuntary switches", 0),
)


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _sig(value: Any) -> str:
    """3 significant digits, with separators and no exponent (0.000412, 27.0, 3,128)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def _time_and_work(table: pd.DataFrame) -> dict[str, pd.Series]:
    """The columns every view of the stage table starts with, formatted."""
    return {
        "stage": table["stage"],
        "time ms": table["time_ms"].map(_num),
        "busy ms": table["busy_ms"].map(_num),
        "GFLOP": (table["flops"] / 1e9).map(_sig),
        "GB": (table["bytes"] / 1e9).map(_sig),
    }


def _pct_of_roof(table: pd.DataFrame, prefix: str) -> list[str]:
    """% of a roof over measured time; over busy time, marked, for nested ranges (no measured time)."""
    return [
        _num(wall, 1) if not pd.isna(wall) else "-" if pd.isna(busy) else f"{_num(busy, 1)} (busy)"
        for wall, busy in zip(table[prefix + "pct_roof_wall"], table[prefix + "pct_roof_busy"])
    ]


def _range(median: Any, low: Any, high: Any, digits: int) -> str:
    """ "median [min, max]" of a figure, "-" without it."""
    if pd.isna(median):
        return "-"
    return f"{_num(median, digits)} [{_num(low, digits)}, {_num(high, digits)}]"


def _spread(stats: Stats) -> str:
    """ "median [min, max], n=3" of a figure's summary."""
    return f"{stats.median:,.2f} [{stats.min:,.2f}, {stats.max:,.2f}], n={stats.n}"


def compact_table(table: pd.DataFrame, record: RunRecord) -> str:
    """The table printed at the end of a run: time, busy time, work, rate and % of the first roof."""
    roof_label = record.hardware.roofs[0].label
    p = roof_prefix(roof_label)
    view = pd.DataFrame(
        {
            **_time_and_work(table),
            "TFLOP/s": table["achieved_tflop_s_wall"].map(lambda v: _num(v, 3)),
            "GB/s": table["achieved_gbyte_s_wall"].map(_num),
            f"% {roof_label} roof": _pct_of_roof(table, p),
            "bound": table[p + "bound"].replace({"unknown": "-"}),
        }
    )
    lines = [view.to_string(index=False)]
    s = record.timing.summary
    lines.append(f"{'':>14}  median [min, max] over the timed runs")
    for key, label in FIGURE_LABELS.items():
        if s.get(key):
            lines.append(f"{label:>14}: {_spread(s[key])}")
    lines += [f"{'warning':>14}: {line}" for line in spread_warnings(table, s, record.timing.until_cv)]
    if record.trace is not None:
        lines.append(
            f"{'coverage':>14}: {100 * record.trace.coverage:.2f}% of {record.trace.basis} time in stages"
        )
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _markdown_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _roof_lines(record: RunRecord) -> list[str]:
    dtype, hardware = record.dtype, record.hardware
    lines = []
    for roof in hardware.roofs:
        peak = roof.flop_s.get(dtype)
        flops = "-" if peak is None else f"{peak / 1e12:,.3g} TFLOP/s {dtype}"
        lines.append(f"- {roof.label} ceilings: {flops}, {roof.byte_s / 1e9:,.1f} GB/s ({roof.source})")
    emulated = hardware.emulated
    if emulated:
        lines.append(
            f"- emulated here (calibrated matmul rate under a quarter of float32's): {', '.join(emulated)}"
        )
    lines.append(f"- datasheet: {hardware.datasheet or 'none'} ({hardware.matched})")
    return lines


def _batch_lines(record: RunRecord) -> list[str]:
    """What the batch means for the figures, and where the per-step stages turn compute-bound."""
    batch = record.batch_size
    lines = []
    if batch > 1:
        lines.append(
            f"- batch of {batch}: TTFT is the whole batch's first token, TPOT one decode step of all "
            f"{batch} sequences, tokens/s the real tokens of all of them"
        )
    step = step_intensity(record)
    per_step = record.stage_layout.per_step if record.stage_layout else ()
    if step is not None and per_step:
        lines.append(f"- {crossing_text(step, '/'.join(per_step))}")
    return lines


def _headline_lines(
    headline_: Headline, summary: Mapping[str, Stats | None], groups: Mapping[str, Sequence[str]]
) -> list[str]:
    lines = []
    for key, label, unit in (
        ("ttft_ms", "TTFT", "ms"),
        ("tpot_ms", "TPOT", "ms"),
        ("decode_tokens_per_s", "decode", "tokens/s"),
        ("tokens_per_s", "throughput, whole request", "generated tokens/s"),
        ("pages_per_s", "throughput, whole request", "pages/s"),
    ):
        if headline_.figure(key) is not None:
            spread = summary.get(key)
            detail = (
                ""
                if not spread or spread.n < 2
                else (
                    f" (median of {spread.n} runs; min {spread.min:,.2f}, max {spread.max:,.2f}, "
                    f"stdev {100 * spread.stdev / spread.mean:.1f}% of the mean)"
                )
            )
            lines.append(f"- {label}: {headline_.figure(key):,.2f} {unit}{detail}")
    for group, per_roof in (headline_.roof_utilisation_pct or {}).items():
        stages = groups.get(group, [])
        name = group if list(stages) == [group] else f"{group} ({', '.join(stages)})"
        lines.append(f"- {name}: " + "; ".join(_binding_text(roof, v) for roof, v in per_roof.items()))
    return lines


def _binding_text(roof: str, figures: dict) -> str:
    """ "memory-bound: 35.1% of the calibrated bandwidth roof (busy 40.2%)" for one group and roof."""
    bound = figures["bound"]
    busy = figures["busy"]
    utilisation = f"{_num(figures['wall'], 1)}%" + (
        "" if busy is None or math.isnan(busy) else f" (busy {_num(busy, 1)}%)"
    )
    if bound == "compute":
        return f"compute-bound: {utilisation} of the {roof} FLOP/s roof"
    if bound == "memory":
        return f"memory-bound: {utilisation} of the {roof} bandwidth roof"
    if bound == "balanced":
        return f"balanced (intensity within 15% of the ridge): {utilisation} of the {roof} roofline"
    return f"no analytic cost on the {roof} roof" if bound == "unknown" else f"no modelled work ({roof} roof)"


def spread_warnings(
    table: pd.DataFrame, summary: Mapping[str, Stats | None], until_cv: UntilCv | None
) -> list[str]:
    """One line per stage or headline figure with an outlier run, and one if profiling.until_cv
    ran out of repeats: the median stands, the spread says how far to trust it."""
    lines = []
    figures = [
        (row.stage, "ms", row.time_ms, row.time_ms_max, row.outlier_runs, row.repeats)
        for row in table.itertuples()
        if not pd.isna(row.outlier_runs) and row.outlier_runs > 0
    ]
    figures += [
        (label, "ms", s.median, s.max, len(s.outliers), s.n)
        for key, label in (("ttft_ms", "TTFT"), ("e2e_ms", "end-to-end"))
        if (s := summary.get(key)) and s.outliers
    ]
    for name, unit, median, worst, count, n in figures:
        lines.append(
            f"{name}: {count} of {n} timed runs above {OUTLIER_FACTOR:g}x the median (worst {worst:,.2f} {unit}, "
            f"median {median:,.2f} {unit}); trust the median less, or measure again on a quiet machine with "
            f"profiling.repeats=10 or profiling.until_cv=0.05"
        )
    if until_cv and not until_cv.reached:
        lines.append(
            f"profiling.until_cv={until_cv.target:g} not reached in {until_cv.runs} timed runs "
            f"(profiling.max_repeats): {until_cv.widest} still varies by {100 * until_cv.cv:.1f}% of its mean"
        )
    return lines


def _busy_source(record: RunRecord) -> str:
    """Where the run's busy times come from, for the run summary."""
    trace = record.trace
    if trace is None:
        return "no trace run"
    if trace.basis == NSYS_BASIS:
        return f"busy times from Nsight Systems ({trace.path})"
    return "one trace run"


def report_markdown(record: RunRecord, table: pd.DataFrame, attribution: Attribution | None) -> str:
    """report.md from the run record, its stage table and the attribution behind its busy times."""
    config, trace, timing = record.config, record.trace, record.timing
    roofs = record.hardware.roofs
    roof = roofs[0].label
    p = roof_prefix(roof)
    measured = record.memory.measured or {}
    analytic_memory = record.memory.analytic
    largest = analytic_memory.largest_transient
    dtype = DtypeChoice(getattr(torch, record.dtype), record.dtype_reason)
    nsys = trace is not None and trace.basis == NSYS_BASIS
    roof_view = pd.DataFrame(
        {
            **_time_and_work(table),
            "FLOP/B": table["intensity"].map(lambda v: _num(v, 1)),
            "TFLOP/s (time / busy)": [
                f"{_num(a, 3)} / {_num(b, 3)}"
                for a, b in zip(table["achieved_tflop_s_wall"], table["achieved_tflop_s_busy"])
            ],
            "GB/s (time / busy)": [
                f"{_num(a, 1)} / {_num(b, 1)}"
                for a, b in zip(table["achieved_gbyte_s_wall"], table["achieved_gbyte_s_busy"])
            ],
            **{f"% {r.label} roof": _pct_of_roof(table, roof_prefix(r.label)) for r in roofs},
            "bound": table[p + "bound"].replace({"unknown": "-"}),
        }
    )
    nested = table["time_ms"].isna() & table["busy_ms"].notna()
    split_view = pd.DataFrame(
        {
            "stage": table["stage"],
            "time ms": [
                f"{_num(b)} (busy)" if n else _num(t)
                for t, b, n in zip(table["time_ms"], table["busy_ms"], nested)
            ],
            "roofline ms": table["split_roofline_ms"].map(lambda v: _num(v, 3)),
            "above roof ms": table["above_roof_ms"].map(_num),
            "host ms": table["host_ms"].map(_num),
            "launches": table["launches"].map(lambda v: "-" if pd.isna(v) else f"{int(v):,}"),
            "user ms": table["split_user_ms"].map(_num),
            "sys ms": table["split_sys_ms"].map(_num),
            "idle ms": table["split_idle_ms"].map(_num),
            "sys % of CPU": table["sys_share_pct"].map(lambda v: _num(v, 1)),
        }
    )
    timed = table[table["time_ms"].notna()]
    spread_view = pd.DataFrame(
        {
            "stage": timed["stage"],
            "runs": timed["repeats"].map(lambda v: "-" if pd.isna(v) else str(v)),
            "median ms": timed["time_ms"].map(_num),
            "min ms": timed["time_ms_min"].map(_num),
            "max ms": timed["time_ms_max"].map(_num),
            "stdev % of mean": timed["time_ms_cv_pct"].map(lambda v: _num(v, 1)),
            "p90 ms": timed["time_ms_p90"].map(_num),
            f"runs > {OUTLIER_FACTOR:g}x median": timed["outlier_runs"].map(
                lambda v: "-" if pd.isna(v) else str(v)
            ),
        }
    )
    os_view = pd.DataFrame(
        {
            "stage": timed["stage"],
            **{
                label: [
                    _range(median, low, high, digits)
                    for median, low, high in zip(timed[c], timed[f"{c}_min"], timed[f"{c}_max"])
                ]
                for c, label, digits in OS_LABELS
            },
        }
    )
    warnings = spread_warnings(table, timing.summary, timing.until_cv)
    layout = record.stage_layout
    gpu = record.device.type == "cuda" or nsys
    top_lines = []
    work = "kernels" if gpu else "ops"
    for stage in table["stage"]:
        ops = top_ops(attribution, stage)
        if ops:
            listed = "; ".join(f"`{name[:60]}` {ms:.2f} ms ×{_calls(calls)}" for name, ms, calls in ops)
            top_lines.append(f"- **{stage}**: {listed}")
    return "\n".join(
        [
            f"# {record.model_name} · {record.device.name}",
            "",
            "## Run",
            "",
            f"- request: {record.request}; generated {record.generated_tokens} tokens",
            *_execution_lines(record),
            *_host_lines(record),
            f"- weights: {record.weights}; {header_text(dtype)}; torch {record.versions.torch}, "
            f"CUDA {record.versions.cuda or 'none'}",
            f"- {config['profiling']['warmup']} warm-up, {_timed_runs(record)}, {_busy_source(record)}",
            *_roof_lines(record),
            "- memory, measured: "
            + ", ".join(
                f"{key.removesuffix('_bytes').replace('_', ' ')} {_gb(value)}"
                for key, value in measured.items()
                if key.endswith("_bytes") and value is not None
            ),
            f"- memory, analytic: weights {_gb(analytic_memory.total_weight_bytes)}, "
            f"KV cache {_gb(analytic_memory.kv_cache_bytes)}, "
            f"largest transient {_gb(largest.transient_bytes)} ({largest.stage}: {largest.transient})",
            "",
            "## Headline",
            "",
            *_headline_lines(
                record.headline, timing.summary, {**layout.compute_groups, **layout.bandwidth_groups}
            ),
            *_batch_lines(record),
            *[f"- **spread warning**: {line}" for line in warnings],
            "",
            "## Stages against the roofline",
            "",
            _markdown_table(roof_view),
            "",
            TIME_BASES + " " + (record.analytic.note or ""),
            *(["", NSYS_NOTE] if nsys else []),
            "",
            "![roofline](roofline.png)",
            "",
            "## Where each stage's time goes",
            "",
            SPLIT_NOTE.format(roof=roof, threads=_threads_text(record)),
            "",
            _markdown_table(split_view),
            *_overlap_lines(table, gpu),
            "",
            "## What the OS did in each stage",
            "",
            OS_NOTE,
            "",
            _markdown_table(os_view),
            "",
            "## Timing spread",
            "",
            "Each stage's time per run over the timed runs (the tables above show the median). "
            "p90 needs 10 runs or more.",
            "",
            _markdown_table(spread_view),
            "",
            *([f"- {line}" for line in warnings] or ["- no run above 1.5x the median"]),
            "",
            "## Verdicts",
            "",
            *[f"- {v}" for v in table["verdict"]],
            "",
            f"## Top {work} per stage ({'Nsight Systems' if nsys else 'trace pass'})",
            "",
            *(top_lines or ["- no trace"]),
            "",
        ]
    )


def _threads_text(record: RunRecord) -> str:
    """Over how many threads the CPU split spreads a stage's CPU time."""
    if record.device.type == "cuda":
        return "the one host thread that launches (a GPU run)"
    threads = record.cpu.get("threads") or record.device.extra.get("threads")
    return f"{threads} threads" if threads else "the threads"


def _timed_runs(record: RunRecord) -> str:
    """ "3 timed runs", or how profiling.until_cv ended."""
    until_cv = record.timing.until_cv
    runs = len(record.samples)
    if not until_cv:
        return f"{runs} timed runs"
    outcome = "reached" if until_cv.reached else f"not reached by {until_cv.max_repeats}"
    return (
        f"{runs} timed runs (until every figure's stdev ≤ {100 * until_cv.target:g}% of its mean: {outcome})"
    )


def _overlap_lines(table: pd.DataFrame, gpu: bool) -> list[str]:
    """A line per stage whose busy time exceeds its measured time (host time shows 0 there)."""
    rows = table[table["overlap_ms"].fillna(0) > 0]
    why = (
        "its kernels ran on after its range closed (launches are asynchronous), so some of them overlap "
        "the next stage, whose host time may include them"
        if gpu
        else "the trace run, whose profiler adds time to every op, was slower than the timed runs"
    )
    return (
        [""]
        + [
            f"- {row.stage}: busy {_num(row.busy_ms)} ms is {_num(row.overlap_ms)} ms above its time "
            f"{_num(row.time_ms)} ms: {why}; its host time is shown as 0"
            for row in rows.itertuples()
        ]
        if len(rows)
        else []
    )


def _host_lines(record: RunRecord) -> list[str]:
    """The allocator in force and how, the threads and the cores (a record older than them has none)."""
    cpu = record.cpu
    if not cpu:
        return []
    asked = cpu["allocator"]
    allocator = (
        f"allocator {asked}"
        if asked == cpu["in_force"]
        else f"allocator {cpu['in_force']} in force ({asked} asked)"
    )
    env = cpu["environment"]
    settings = ", ".join(f"{key} {env.get(key) or 'unset'}" for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    return [
        f"- host: {allocator}, {cpu['applied']}; {cpu['threads']} intra-op threads ({cpu['threads_from']}), "
        f"CPUs {cpu['affinity']}; {settings}"
    ]


def _execution_lines(record: RunRecord) -> list[str]:
    """How the model ran (a model with one way to run records none), and that the analytic
    bytes follow it."""
    execution = record.execution
    if not execution:
        return []
    lines = [f"- implementation: {execution['summary']} (the analytic bytes are those of these paths)"]
    notes = execution.get("notes") or []
    return lines + ([f"- {notes[0]}:"] + [f"  - {note}" for note in notes[1:]] if notes else [])


def _calls(calls: float) -> str:
    """A call count; per-run averages of an Nsight capture (report.from_nsys) keep one decimal."""
    return str(int(calls)) if float(calls).is_integer() else f"{calls:.1f}"
