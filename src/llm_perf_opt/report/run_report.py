"""What one job writes: run.json, stages.csv, stages.json, kernels.csv, report.md, roofline.png
(trace.json comes from the trace pass). Every file is written atomically, run.json last."""

from __future__ import annotations

import dataclasses
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers

import llm_perf_opt
from llm_perf_opt.atomic import write_csv, write_json, write_text
from llm_perf_opt.config import RunConfig
from llm_perf_opt.hardware.calibration import Calibration
from llm_perf_opt.hardware.ceilings import Roof, Selection
from llm_perf_opt.hardware.precision import DtypeChoice, header_text
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS
from llm_perf_opt.profiling.passes import Measurement

from .roofline import headline, roof_prefix
from .roofline_plot import roofline_plot
from .stage_report import stage_table, top_ops

TIME_BASES = (
    "`time_ms` is the median over the timed runs of the stage's measured time (wall clock on a CPU, "
    "CUDA-event stream time on a GPU); `busy_ms` is the op (CPU) or kernel (GPU) time the trace pass "
    "attributes to the stage. `achieved_*_busy` divide the analytic FLOPs and bytes by `busy_ms`, "
    "`achieved_*_wall` by `time_ms`: the gap between them is time the device sat idle inside the stage "
    "(Python, launches, synchronisation), large where a stage is host-bound."
)
SPLIT_NOTE = (
    "Each stage's time = the roofline minimum (its FLOPs and bytes at the {roof} ceilings) + op/kernel "
    "time above that minimum + host time with the device idle (time − busy)."
)


@dataclass(frozen=True)
class Hardware:
    """The ceilings a run is judged against and where they come from."""

    selection: Selection
    calibration: Calibration

    @property
    def roofs(self) -> list[Roof]:
        """The calibrated roof first (what verdicts use: reachable here), then the datasheet's."""
        datasheet = [] if self.selection.roof is None else [self.selection.roof]
        return [self.calibration.roof(), *datasheet]

    def record(self) -> dict:
        return {
            "datasheet": self.selection.key,
            "matched": self.selection.how,
            "device_name": self.selection.device_name,
            "calibration": dataclasses.asdict(self.calibration),
            "roofs": [dataclasses.asdict(r) for r in self.roofs],
        }


@dataclass(frozen=True)
class Job:
    """Everything one finished job reports."""

    run: RunConfig
    config: dict
    measurement: Measurement
    stage_model: Any  # the model's analytic StageModel: totals(), breakdown(), experts()
    footprint: Any  # the model's analytic memory Footprint
    device: torch.device
    dtype: DtypeChoice
    hardware: Hardware
    compute_groups: dict[str, tuple[str, ...]]
    bandwidth_groups: dict[str, tuple[str, ...]]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype.dtype).removeprefix("torch.")


def versions() -> dict:
    return {
        "llm_perf_opt": llm_perf_opt.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }


def describe_device(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "index": device.index,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_bytes": getattr(props, "L2_cache_size", None),
    }


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere platform's answer is the best there is
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def footprint_record(footprint) -> dict:
    return {
        "total_weight_bytes": footprint.total_weight_bytes,
        "kv_cache_bytes": footprint.kv_cache_bytes,
        "kv_bytes_per_token": footprint.kv_bytes_per_token,
        "logits_bytes": footprint.logits_bytes,
        "stages": footprint.table.to_dict("records"),
    }


def headline_figures(job: Job, table: pd.DataFrame) -> dict:
    """TTFT, TPOT, decode tokens/s (medians), and the utilisation of the model's stage groups."""
    summary = job.measurement.summary()
    figures = {key: None if summary[key] is None else summary[key]["median"]
               for key in ("ttft_ms", "tpot_ms", "decode_tokens_per_s", "e2e_ms")}  # fmt: skip
    utilisation = headline(
        table.rename(columns={"time_ms": "wall_ms"}), job.hardware.roofs, job.dtype_name,
        compute_stages=job.compute_groups, bandwidth_stages=job.bandwidth_groups,
    )  # fmt: skip
    return {**figures, **utilisation}


def run_record(job: Job, table: pd.DataFrame, status: str = "ok", error: str | None = None) -> dict:
    """Everything about the job in one JSON-able dict."""
    m = job.measurement
    analytic_totals = job.stage_model.totals()
    return {
        "status": status,
        "error": error,
        "config": job.config,
        "versions": versions(),
        "device": describe_device(job.device),
        "hardware": job.hardware.record(),
        "dtype": job.dtype_name,
        "dtype_reason": job.dtype.reason,
        "weights": job.run.model.weights,
        **m.request.describe(),
        "generated_tokens": len(m.result.tokens) if m.result else None,
        "headline": headline_figures(job, table),
        "timing": {
            "unit": "ms",
            "tpot": "(e2e - ttft) / decode steps; ttft = the once-per-request stages",
            "summary": m.summary(),
            "samples": [r.as_dict() for r in m.runs],
        },
        "memory": {
            "measured": None if m.memory is None else m.memory.as_dict(),
            "analytic": footprint_record(job.footprint),
        },
        "routing": None if m.routing is None else {
            stage: {"calls": len(calls), "tokens_per_expert": _sum_calls(calls)} for stage, calls in m.routing.items()
        },
        "analytic": {
            "note": analytic_totals.attrs.get("note"),
            "stages": analytic_totals.to_dict("records"),
            "families": job.stage_model.breakdown().to_dict("records"),
            "experts": job.stage_model.experts().to_dict("records"),
        },
        "trace": None if m.attribution is None else {
            "path": m.trace_path.name,
            "basis": m.attribution.basis,
            "coverage": m.attribution.coverage,
            "total_busy_ms": m.attribution.total_busy_ms,
            "unattributed_ms": m.attribution.unattributed_ms,
            "ranges": m.attribution.stages.to_dict("records"),
        },
    }


def _sum_calls(calls: list[list[list[int]]]) -> list[list[int]]:
    """Tokens per expert of each routed layer, summed over the calls."""
    return [[sum(counts) for counts in zip(*layer)] for layer in zip(*calls)]


# -- what people read -------------------------------------------------------------------------------
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


def _roof_lines(job: Job) -> list[str]:
    lines = []
    for roof in job.hardware.roofs:
        peak = roof.flop_s.get(job.dtype_name)
        flops = "-" if peak is None else f"{peak / 1e12:,.3g} TFLOP/s {job.dtype_name}"
        lines.append(f"- {roof.label} ceilings: {flops}, {roof.byte_s / 1e9:,.1f} GB/s ({roof.source})")
    emulated = [d for d, slow in job.hardware.calibration.emulated.items() if slow]
    if emulated:
        lines.append(f"- emulated here (calibrated matmul rate under a quarter of float32's): {', '.join(emulated)}")
    sel = job.hardware.selection
    lines.append(f"- datasheet: {sel.key or 'none'} ({sel.how})")
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


def report_markdown(job: Job, record: dict, table: pd.DataFrame) -> str:
    m, run = job.measurement, job.run
    roof = job.hardware.roofs[0].label
    p = roof_prefix(roof)
    measured = m.memory.as_dict() if m.memory is not None else {}
    fp = job.footprint
    largest = fp.table.sort_values("transient_bytes").iloc[-1]
    roof_view = pd.DataFrame({
        **_time_and_work(table),
        "FLOP/B": table["intensity"].map(lambda v: _num(v, 1)),
        "TFLOP/s (time / busy)": [f"{_num(a, 3)} / {_num(b, 3)}" for a, b in
                                  zip(table["achieved_tflop_s_wall"], table["achieved_tflop_s_busy"])],
        "GB/s (time / busy)": [f"{_num(a, 1)} / {_num(b, 1)}" for a, b in
                               zip(table["achieved_gbyte_s_wall"], table["achieved_gbyte_s_busy"])],
        **{f"% {r.label} roof": table[roof_prefix(r.label) + "pct_roof_wall"].map(lambda v: _num(v, 1))
           for r in job.hardware.roofs},
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
    work = "kernels" if job.device.type == "cuda" else "ops"
    for stage in table["stage"]:
        ops = top_ops(m.attribution, stage)
        if ops:
            listed = "; ".join(f"`{name[:60]}` {ms:.2f} ms ×{calls}" for name, ms, calls in ops)
            top_lines.append(f"- **{stage}**: {listed}")
    return "\n".join([
        f"# {run.model.name} · {record['device']['name']}",
        "",
        "## Run",
        "",
        f"- request: {m.request.summary()}; generated {record['generated_tokens']} tokens",
        f"- weights: {run.model.weights}; {header_text(job.dtype)}; torch {record['versions']['torch']}, "
        f"CUDA {record['versions']['cuda'] or 'none'}",
        f"- {run.profiling.warmup} warm-up, {run.profiling.repeats} timed runs, "
        f"{'one trace run' if m.attribution is not None else 'no trace run'}",
        *_roof_lines(job),
        "- memory, measured: " + ", ".join(
            f"{key.removesuffix('_bytes').replace('_', ' ')} {_gb(value)}"
            for key, value in measured.items() if key.endswith("_bytes") and value is not None
        ),
        f"- memory, analytic: weights {_gb(fp.total_weight_bytes)}, KV cache {_gb(fp.kv_cache_bytes)}, "
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
        f"## Top {work} per stage (trace pass)",
        "",
        *(top_lines or ["- no trace"]),
        "",
    ])


def write_artifacts(out_dir: Path, job: Job) -> dict:
    """Tables and pictures first, run.json last: a run.json with status ok means every artifact is there."""
    m = job.measurement
    table = stage_table(m, job.stage_model, job.hardware.roofs, job.dtype_name, job.device.type)
    kernels = m.attribution.kernels if m.attribution is not None else pd.DataFrame(columns=KERNEL_COLUMNS)
    record = run_record(job, table)
    write_csv(out_dir / "stages.csv", table)
    write_json(out_dir / "stages.json", {
        "dtype": job.dtype_name,
        "roofs": record["hardware"]["roofs"],
        "headline": record["headline"],
        "stages": table.to_dict("records"),
    })
    write_csv(out_dir / "kernels.csv", kernels[list(KERNEL_COLUMNS)])
    roofline_plot(
        table.rename(columns={"time_ms": "wall_ms"}), job.hardware.roofs, job.dtype_name, out_dir / "roofline.png",
        title=f"{job.run.model.name} · {m.request.summary().split(',')[0]} · {record['device']['name']} · {job.dtype_name}",
    )  # fmt: skip
    write_text(out_dir / "report.md", report_markdown(job, record, table))
    write_json(out_dir / "run.json", record)
    return {"stages": table, "record": record}


def write_failure(out_dir: Path, config: dict, status: str, error: str) -> None:
    write_json(out_dir / "run.json", {"status": status, "error": error, "config": config, "versions": versions()})
