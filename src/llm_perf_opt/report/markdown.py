"""report.md and the table printed at the end of a run: the run record and its stage table, for people."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from llm_perf_opt.hardware.precision import DtypeChoice, header_text
from llm_perf_opt.profiling.attribution import Attribution
from llm_perf_opt.profiling.passes import Measurement

from .roofline import roof_prefix
from .run_record import NSYS_BASIS, record_roofs
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
    "time above that minimum + host time with the device idle (time − busy)."
)


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _time_and_work(table: pd.DataFrame) -> dict[str, pd.Series]:
    """The columns every view of the stage table starts with, formatted."""
    return {
        "stage": table["stage"],
        "time ms": table["time_ms"].map(_num),
        "busy ms": table["busy_ms"].map(_num),
        "GFLOP": (table["flops"] / 1e9).map(_num),
        "GB": (table["bytes"] / 1e9).map(lambda v: _num(v, 3)),
    }


def compact_table(table: pd.DataFrame, m: Measurement, roof_label: str) -> str:
    """The table printed at the end of a run: time, busy time, work, rate and % of the first roof."""
    p = roof_prefix(roof_label)
    view = pd.DataFrame({
        **_time_and_work(table),
        "TFLOP/s": table["achieved_tflop_s_wall"].map(lambda v: _num(v, 3)),
        "GB/s": table["achieved_gbyte_s_wall"].map(_num),
        f"% {roof_label} roof": table[p + "pct_roof_wall"].map(lambda v: _num(v, 1)),
        "bound": table[p + "bound"].replace({"unknown": "-"}),
    })
    lines = [view.to_string(index=False)]
    s = m.summary()
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("decode_tokens_per_s", "decode tok/s"),
                       ("e2e_ms", "end-to-end ms")):
        if s.get(key):
            lines.append(f"{label:>14}: {s[key]['median']:.2f} (min {s[key]['min']:.2f}, n={s[key]['n']})")
    if m.attribution is not None:
        lines.append(f"{'coverage':>14}: {100 * m.attribution.coverage:.2f}% of {m.attribution.basis} time in stages")
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _markdown_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _roof_lines(record: dict) -> list[str]:
    dtype, hardware = record["dtype"], record["hardware"]
    lines = []
    for roof in record_roofs(record):
        peak = roof.flop_s.get(dtype)
        flops = "-" if peak is None else f"{peak / 1e12:,.3g} TFLOP/s {dtype}"
        lines.append(f"- {roof.label} ceilings: {flops}, {roof.byte_s / 1e9:,.1f} GB/s ({roof.source})")
    emulated = [d for d, slow in hardware["calibration"]["emulated"].items() if slow]
    if emulated:
        lines.append(f"- emulated here (calibrated matmul rate under a quarter of float32's): {', '.join(emulated)}")
    lines.append(f"- datasheet: {hardware['datasheet'] or 'none'} ({hardware['matched']})")
    return lines


def _headline_lines(headline_: dict) -> list[str]:
    lines = []
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        if headline_.get(key) is not None:
            lines.append(f"- {label}: {headline_[key]:.2f} ms")
    if headline_.get("decode_tokens_per_s") is not None:
        lines.append(f"- decode: {headline_['decode_tokens_per_s']:.1f} tokens/s")
    for kind, label in (("flop_utilisation_pct", "FLOP utilisation"), ("bandwidth_utilisation_pct", "bandwidth utilisation")):
        for group, per_roof in headline_.get(kind, {}).items():
            parts = [f"{roof} roof {_num(v['wall'], 1)}% (busy {_num(v['busy'], 1)}%)" for roof, v in per_roof.items()]
            lines.append(f"- {label} of {group}: " + "; ".join(parts))
    return lines


def _busy_source(record: dict) -> str:
    """Where the run's busy times come from, for the run summary."""
    trace = record["trace"]
    if trace is None:
        return "no trace run"
    if trace["basis"] == NSYS_BASIS:
        return f"busy times from Nsight Systems ({trace['path']})"
    return "one trace run"


def report_markdown(record: dict, table: pd.DataFrame, attribution: Attribution | None) -> str:
    """report.md from the run record, its stage table and the attribution behind its busy times."""
    config, trace = record["config"], record["trace"]
    roofs = record_roofs(record)
    roof = roofs[0].label
    p = roof_prefix(roof)
    measured = record["memory"]["measured"] or {}
    analytic_memory = record["memory"]["analytic"]
    largest = max(analytic_memory["stages"], key=lambda row: row["transient_bytes"])
    dtype = DtypeChoice(getattr(torch, record["dtype"]), record["dtype_reason"])
    nsys = trace is not None and trace["basis"] == NSYS_BASIS
    roof_view = pd.DataFrame({
        **_time_and_work(table),
        "FLOP/B": table["intensity"].map(lambda v: _num(v, 1)),
        "TFLOP/s (time / busy)": [f"{_num(a, 3)} / {_num(b, 3)}" for a, b in
                                  zip(table["achieved_tflop_s_wall"], table["achieved_tflop_s_busy"])],
        "GB/s (time / busy)": [f"{_num(a, 1)} / {_num(b, 1)}" for a, b in
                               zip(table["achieved_gbyte_s_wall"], table["achieved_gbyte_s_busy"])],
        **{f"% {r.label} roof": table[roof_prefix(r.label) + "pct_roof_wall"].map(lambda v: _num(v, 1))
           for r in roofs},
        "bound": table[p + "bound"].replace({"unknown": "-"}),
    })  # fmt: skip
    split_view = pd.DataFrame({
        "stage": table["stage"],
        "time ms": table["time_ms"].map(_num),
        "roofline ms": table["split_roofline_ms"].map(lambda v: _num(v, 3)),
        "above roof ms": table["above_roof_ms"].map(_num),
        "host ms": table["host_ms"].map(_num),
        "launches": table["launches"].map(lambda v: "-" if pd.isna(v) else f"{int(v):,}"),
    })
    top_lines = []
    work = "kernels" if record["device"]["type"] == "cuda" or nsys else "ops"
    for stage in table["stage"]:
        ops = top_ops(attribution, stage)
        if ops:
            listed = "; ".join(f"`{name[:60]}` {ms:.2f} ms ×{_calls(calls)}" for name, ms, calls in ops)
            top_lines.append(f"- **{stage}**: {listed}")
    return "\n".join([
        f"# {config['model']['name']} · {record['device']['name']}",
        "",
        "## Run",
        "",
        f"- request: {record['request']}; generated {record['generated_tokens']} tokens",
        *_execution_lines(record),
        f"- weights: {record['weights']}; {header_text(dtype)}; torch {record['versions']['torch']}, "
        f"CUDA {record['versions']['cuda'] or 'none'}",
        f"- {config['profiling']['warmup']} warm-up, {config['profiling']['repeats']} timed runs, "
        f"{_busy_source(record)}",
        *_roof_lines(record),
        "- memory, measured: " + ", ".join(
            f"{key.removesuffix('_bytes').replace('_', ' ')} {_gb(value)}"
            for key, value in measured.items() if key.endswith("_bytes") and value is not None
        ),
        f"- memory, analytic: weights {_gb(analytic_memory['total_weight_bytes'])}, "
        f"KV cache {_gb(analytic_memory['kv_cache_bytes'])}, "
        f"largest transient {_gb(largest['transient_bytes'])} ({largest['stage']}: {largest['transient']})",
        "",
        "## Headline",
        "",
        *_headline_lines(record["headline"]),
        "",
        "## Stages against the roofline",
        "",
        _markdown_table(roof_view),
        "",
        TIME_BASES + " " + (record["analytic"]["note"] or ""),
        *(["", NSYS_NOTE] if nsys else []),
        "",
        "![roofline](roofline.png)",
        "",
        "## Where each stage's time goes",
        "",
        SPLIT_NOTE.format(roof=roof),
        "",
        _markdown_table(split_view),
        "",
        "## Verdicts",
        "",
        *[f"- {v}" for v in table["verdict"]],
        "",
        f"## Top {work} per stage ({'Nsight Systems' if nsys else 'trace pass'})",
        "",
        *(top_lines or ["- no trace"]),
        "",
    ])


def _execution_lines(record: dict) -> list[str]:
    """How the model ran (a model with one way to run records none), and that the analytic
    bytes follow it."""
    execution = record.get("execution")
    if not execution:
        return []
    lines = [f"- implementation: {execution['summary']} (the analytic bytes are those of these paths)"]
    notes = execution.get("notes") or []
    return lines + ([f"- {notes[0]}:"] + [f"  - {note}" for note in notes[1:]] if notes else [])


def _calls(calls: float) -> str:
    """A call count; per-run averages of an Nsight capture (report.from_nsys) keep one decimal."""
    return str(int(calls)) if float(calls).is_integer() else f"{calls:.1f}"
