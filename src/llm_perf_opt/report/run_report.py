"""What one job writes: run.json, stages.csv, kernels.csv, report.md (trace.json comes from the
trace pass). Built from a Measurement and the model's analytic stage model; every file is
written atomically, run.json last."""

from __future__ import annotations

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
from llm_perf_opt.hardware.precision import DtypeChoice, header_text
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS
from llm_perf_opt.profiling.passes import Measurement

STAGE_COLUMNS = [
    "stage", "calls", "time_ms", "time_ms_min", "time_ms_max", "busy_ms", "share", "gflop", "gbyte",
    "achieved_tflop_s_busy", "achieved_gbyte_s_busy", "achieved_tflop_s_wall", "achieved_gbyte_s_wall",
]
TIME_BASES = (
    "`time_ms` is the median over the timed runs of the stage's measured time (wall clock on a CPU, "
    "CUDA-event stream time on a GPU); `busy_ms` is the op (CPU) or kernel (GPU) time the trace pass "
    "attributes to the stage. `achieved_*_busy` divide the analytic FLOPs and bytes by `busy_ms`, "
    "`achieved_*_wall` by `time_ms`: the gap between them is time the device sat idle inside the stage "
    "(Python, launches, synchronisation), large where a stage is host-bound."
)


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


def stages_table(m: Measurement, stage_model) -> pd.DataFrame:
    """One row per stage: calls per run, median/min/max over repeats of the stage's total time
    per run, the trace pass's busy time and share of all op/kernel time, and the analytic
    useful FLOPs and bytes with the rates they imply over busy time and over measured time."""
    totals = stage_model.totals()
    costs = totals[totals["scope"] == "run"].set_index("stage")[["useful_flops", "bytes"]].to_dict("index")
    busy = {}
    if m.attribution is not None:
        busy = m.attribution.stages.set_index("stage")[["busy_ms", "share"]].to_dict("index")
    rows = []
    for stage in (s.name for s in m.stages):
        times = m.stage_totals(stage)
        time_ms = m.median_stage_ms(stage)
        busy_ms = busy.get(stage, {}).get("busy_ms")
        cost = costs.get(stage)
        rows.append({
            "stage": stage,
            "calls": len(m.runs[0].stages.get(stage, [])) if m.runs else 0,
            "time_ms": time_ms,
            "time_ms_min": min(times) if times else None,
            "time_ms_max": max(times) if times else None,
            "busy_ms": busy_ms,
            "share": busy.get(stage, {}).get("share"),
            "gflop": cost["useful_flops"] / 1e9 if cost else None,
            "gbyte": cost["bytes"] / 1e9 if cost else None,
            "achieved_tflop_s_busy": _rate(cost, "useful_flops", busy_ms, 1e9),
            "achieved_gbyte_s_busy": _rate(cost, "bytes", busy_ms, 1e6),
            "achieved_tflop_s_wall": _rate(cost, "useful_flops", time_ms, 1e9),
            "achieved_gbyte_s_wall": _rate(cost, "bytes", time_ms, 1e6),
        })
    return pd.DataFrame(rows, columns=STAGE_COLUMNS)


def _rate(cost: dict | None, key: str, ms: float | None, per_ms_unit: float) -> float | None:
    """cost[key] per millisecond, in units of per_ms_unit (1e9 per ms = TFLOP/s, 1e6 per ms = GB/s)."""
    return cost[key] / ms / per_ms_unit if cost and ms else None


def footprint_record(footprint) -> dict:
    return {
        "total_weight_bytes": footprint.total_weight_bytes,
        "kv_cache_bytes": footprint.kv_cache_bytes,
        "kv_bytes_per_token": footprint.kv_bytes_per_token,
        "logits_bytes": footprint.logits_bytes,
        "stages": footprint.table.to_dict("records"),
    }


def run_record(job: Job, status: str = "ok", error: str | None = None) -> dict:
    """Everything about the job in one JSON-able dict."""
    m = job.measurement
    analytic_totals = job.stage_model.totals()
    return {
        "status": status,
        "error": error,
        "config": job.config,
        "versions": versions(),
        "device": describe_device(job.device),
        "dtype": str(job.dtype.dtype).removeprefix("torch."),
        "dtype_reason": job.dtype.reason,
        "weights": job.run.model.weights,
        **m.request.describe(),
        "generated_tokens": len(m.result.tokens) if m.result else None,
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


def compact_table(stages: pd.DataFrame, m: Measurement) -> str:
    s = m.summary()
    view = stages.assign(share=stages["share"].map(lambda v: None if pd.isna(v) else f"{100 * v:.1f}%"))
    lines = [view.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")]
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("decode_tokens_per_s", "decode tok/s"),
                       ("e2e_ms", "end-to-end ms")):
        if s.get(key):
            lines.append(f"{label:>14}: {s[key]['median']:.2f} (min {s[key]['min']:.2f}, n={s[key]['n']})")
    if m.attribution is not None:
        lines.append(f"{'coverage':>14}: {100 * m.attribution.coverage:.2f}% of {m.attribution.basis} time in stages")
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report_markdown(job: Job, record: dict, stages: pd.DataFrame) -> str:
    m, run = job.measurement, job.run
    measured = m.memory.as_dict() if m.memory is not None else {}
    fp = job.footprint
    largest = fp.table.sort_values("transient_bytes").iloc[-1]
    memory_lines = [
        f"- memory, measured: " + ", ".join(
            f"{key.removesuffix('_bytes').replace('_', ' ')} {_gb(value)}"
            for key, value in measured.items() if key.endswith("_bytes") and value is not None
        ),
        f"- memory, analytic: weights {_gb(fp.total_weight_bytes)}, KV cache {_gb(fp.kv_cache_bytes)}, "
        f"largest transient {_gb(largest['transient_bytes'])} ({largest['stage']}: {largest['transient']})",
    ]
    return "\n".join([
        f"# {run.model.name} · {record['device']['name']}",
        "",
        f"- request: {m.request.summary()}; generated {record['generated_tokens']} tokens",
        f"- weights: {run.model.weights}; {header_text(job.dtype)}; torch {record['versions']['torch']}",
        f"- {run.profiling.warmup} warm-up, {run.profiling.repeats} timed runs, "
        f"{'a trace run' if m.attribution is not None else 'no trace run'}",
        *memory_lines,
        "",
        "```",
        compact_table(stages, m),
        "```",
        "",
        TIME_BASES,
        "",
    ])


def write_artifacts(out_dir: Path, job: Job) -> dict:
    """Tables first, run.json last: a run.json with status ok means every artifact is there."""
    m = job.measurement
    stages = stages_table(m, job.stage_model)
    kernels = m.attribution.kernels if m.attribution is not None else pd.DataFrame(columns=KERNEL_COLUMNS)
    record = run_record(job)
    write_csv(out_dir / "stages.csv", stages)
    write_csv(out_dir / "kernels.csv", kernels[list(KERNEL_COLUMNS)])
    write_text(out_dir / "report.md", report_markdown(job, record, stages))
    write_json(out_dir / "run.json", record)
    return {"stages": stages, "record": record}


def write_failure(out_dir: Path, config: dict, status: str, error: str) -> None:
    write_json(out_dir / "run.json", {"status": status, "error": error, "config": config, "versions": versions()})
