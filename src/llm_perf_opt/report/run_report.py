"""What one job writes: run.json, stages.csv, kernels.csv, report.md (trace.json comes from the
trace pass). Built from a Measurement; every file is written atomically."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path

import pandas as pd
import torch
import transformers

import llm_perf_opt
from llm_perf_opt.analytic.deepseek_ocr import StageModel, stage_costs
from llm_perf_opt.config import Settings
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS
from llm_perf_opt.profiling.passes import Measurement
from llm_perf_opt.profiling.ranges import STAGES

from .artifacts import write_csv, write_json, write_text

STAGE_COLUMNS = [
    "stage", "calls", "time_ms", "time_ms_min", "time_ms_max", "busy_ms", "share",
    "gflop", "gbyte", "achieved_tflop_s", "achieved_gbyte_s",
]


def analytic_model(settings: Settings, m: Measurement) -> StageModel:
    """The analytic FLOPs and bytes of exactly this run (tiles, prompt, decode steps, observed routing)."""
    views = m.request.views
    steps = len(m.result.tokens) - 1 if m.result else 0
    routing = m.routing if m.routing is not None and len(m.routing.decode) == steps else None
    return stage_costs(
        settings.arch,
        settings.mode,
        grid=views.grid,
        text_tokens=m.request.prompt_tokens - views.image_tokens,
        decode_steps=steps,
        dtype=settings.dtype,
        routing=routing,
    )


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


def stages_table(m: Measurement, analytic: StageModel) -> pd.DataFrame:
    """One row per stage: calls per run, median/min/max over repeats of the stage's total time
    per run, the trace pass's busy time and share of all op/kernel time, and the analytic
    useful FLOPs and bytes with the throughput they imply over the busy time."""
    totals = analytic.totals()
    costs = totals[totals["scope"] == "run"].set_index("stage")[["useful_flops", "bytes"]].to_dict("index")
    busy = {}
    if m.attribution is not None:
        busy = m.attribution.stages.set_index("stage")[["busy_ms", "share"]].to_dict("index")
    rows = []
    for stage in STAGES:
        times = m.stage_totals(stage)
        calls = len(m.runs[0].stages.get(stage, [])) if m.runs else 0
        busy_ms = busy.get(stage, {}).get("busy_ms")
        cost = costs.get(stage)
        rows.append({
            "stage": stage,
            "calls": calls,
            "time_ms": statistics.median(times) if times else None,
            "time_ms_min": min(times) if times else None,
            "time_ms_max": max(times) if times else None,
            "busy_ms": busy_ms,
            "share": busy.get(stage, {}).get("share"),
            "gflop": cost["useful_flops"] / 1e9 if cost else None,
            "gbyte": cost["bytes"] / 1e9 if cost else None,
            "achieved_tflop_s": cost["useful_flops"] / busy_ms / 1e9 if cost and busy_ms else None,
            "achieved_gbyte_s": cost["bytes"] / busy_ms / 1e6 if cost and busy_ms else None,
        })
    return pd.DataFrame(rows, columns=STAGE_COLUMNS)


def run_record(
    settings: Settings, config: dict, m: Measurement | None, status: str, error: str | None,
    analytic: StageModel | None = None,
) -> dict:
    """Everything about the job in one JSON-able dict."""
    record = {
        "status": status,
        "error": error,
        "config": config,
        "versions": versions(),
        "device": describe_device(settings.device),
        "dtype": str(settings.dtype).removeprefix("torch."),
        "weights": "dummy" if settings.checkpoint is None else str(settings.checkpoint),
    }
    if m is None:
        return record
    views = m.request.views
    generated = len(m.result.tokens) if m.result else None
    record.update({
        "image": {"path": str(m.request.image_path), "size": list(views.source_size)},
        "mode": m.request.mode,
        "tiles": {"cols": views.grid[0], "rows": views.grid[1], "count": 0 if views.tiles is None else len(views.tiles)},
        "tokens": {"image": views.image_tokens, "prompt": m.request.prompt_tokens, "generated": generated},
        "timing": {
            "unit": "ms",
            "summary": m.summary(),
            "samples": [
                {"stages": r.stages, "e2e_ms": r.e2e_ms, "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms}
                for r in m.runs
            ],
        },
        "peak_memory": m.peak_memory,
        "routing": None if m.routing is None else {
            "prefill": m.routing.prefill,
            "decode_sum": _sum_steps(m.routing.decode),
            "decode_steps": len(m.routing.decode),
        },
        "analytic": None if analytic is None else _analytic_record(analytic),
        "trace": None if m.attribution is None else {
            "path": m.trace_path.name,
            "basis": m.attribution.basis,
            "coverage": m.attribution.coverage,
            "total_busy_ms": m.attribution.total_busy_ms,
            "unattributed_ms": m.attribution.unattributed_ms,
            "ranges": m.attribution.stages.to_dict("records"),
        },
    })
    return record


def _analytic_record(analytic: StageModel) -> dict:
    totals = analytic.totals()
    return {
        "note": totals.attrs.get("note"),
        "stages": totals.to_dict("records"),
        "experts": analytic.experts().to_dict("records"),
    }


def _sum_steps(steps: list[list[list[int]]]) -> list[list[int]]:
    if not steps:
        return []
    return [[sum(step[layer][e] for step in steps) for e in range(len(steps[0][layer]))] for layer in range(len(steps[0]))]


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


def report_markdown(settings: Settings, record: dict, stages: pd.DataFrame, m: Measurement) -> str:
    tokens = record["tokens"]
    return "\n".join([
        f"# {settings.model_name} · mode {settings.mode.name} · {record['device']['name']}",
        "",
        f"- weights: {record['weights']}, dtype {record['dtype']}, attention {settings.attn_impl}",
        f"- image {record['image']['size'][0]}×{record['image']['size'][1]}, tiles "
        f"{record['tiles']['cols']}×{record['tiles']['rows']}; tokens: image {tokens['image']}, "
        f"prompt {tokens['prompt']}, generated {tokens['generated']}",
        f"- {settings.warmup} warm-up, {settings.repeats} timed runs; times are medians over the timed runs, "
        "busy/share from the trace pass",
        "",
        "```",
        compact_table(stages, m),
        "```",
        "",
    ])


def write_artifacts(out_dir: Path, settings: Settings, config: dict, m: Measurement) -> dict:
    """Tables first, run.json last: a run.json with status ok means every artifact is there."""
    analytic = analytic_model(settings, m)
    stages = stages_table(m, analytic)
    kernels = m.attribution.kernels if m.attribution is not None else pd.DataFrame(columns=KERNEL_COLUMNS)
    record = run_record(settings, config, m, "ok", None, analytic)
    write_csv(out_dir / "stages.csv", stages)
    write_csv(out_dir / "kernels.csv", kernels[list(KERNEL_COLUMNS)])
    write_text(out_dir / "report.md", report_markdown(settings, record, stages, m))
    write_json(out_dir / "run.json", record)
    return {"stages": stages, "record": record}


def write_failure(out_dir: Path, settings: Settings | None, config: dict, status: str, error: str) -> None:
    record = {"status": status, "error": error, "config": config, "versions": versions()}
    if settings is not None:
        record = run_record(settings, config, None, status, error)
    write_json(out_dir / "run.json", record)

