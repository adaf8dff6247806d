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
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS, Attribution
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
#: ``trace.basis`` of a run whose busy times were imported from Nsight Systems.
NSYS_BASIS = "device (nsys)"
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


def headline_figures(summary: dict, table: pd.DataFrame, record: dict) -> dict:
    """TTFT, TPOT, decode tokens/s (medians of the timing ``summary``), and the utilisation of the
    model's stage groups (``stage_layout`` of ``record``) against the record's roofs."""
    figures = {key: None if summary[key] is None else summary[key]["median"]
               for key in ("ttft_ms", "tpot_ms", "decode_tokens_per_s", "e2e_ms")}  # fmt: skip
    layout = record["stage_layout"]
    utilisation = headline(
        table.rename(columns={"time_ms": "wall_ms"}), record_roofs(record), record["dtype"],
        compute_stages=layout["compute_groups"], bandwidth_stages=layout["bandwidth_groups"],
    )  # fmt: skip
    return {**figures, **utilisation}


def record_roofs(record: dict) -> list[Roof]:
    """The roofs of a run record (``hardware.roofs``), the one used for verdicts first."""
    return [Roof(**roof) for roof in record["hardware"]["roofs"]]


def stage_layout(job: Job) -> dict:
    """The model's stages as run.json keeps them: run order, the per-step ones, the headline groups."""
    stages = job.measurement.stages
    return {
        "order": [s.name for s in stages],
        "per_step": [s.name for s in stages if s.per_step],
        "compute_groups": {group: list(names) for group, names in job.compute_groups.items()},
        "bandwidth_groups": {group: list(names) for group, names in job.bandwidth_groups.items()},
    }


def trace_record(attribution: Attribution, path: str, basis: str | None = None) -> dict:
    """The ``trace`` entry of run.json: where busy times come from and the per-range table."""
    return {
        "path": path,
        "basis": basis or attribution.basis,
        "coverage": attribution.coverage,
        "total_busy_ms": attribution.total_busy_ms,
        "unattributed_ms": attribution.unattributed_ms,
        "ranges": attribution.stages.to_dict("records"),
    }


def run_record(job: Job, table: pd.DataFrame, status: str = "ok", error: str | None = None) -> dict:
    """Everything about the job in one JSON-able dict."""
    m = job.measurement
    analytic_totals = job.stage_model.totals()
    record = {
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
        "request": m.request.summary(),
        "generated_tokens": len(m.result.tokens) if m.result else None,
        "headline": None,  # below: it needs the roofs and stage layout of this record
        "stage_layout": stage_layout(job),
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
            "ranges": job.stage_model.range_totals().to_dict("records"),
            "experts": job.stage_model.experts().to_dict("records"),
        },
        "trace": None if m.attribution is None else trace_record(m.attribution, m.trace_path.name),
    }
    record["headline"] = headline_figures(m.summary(), table, record)
    return record


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


def _calls(calls: float) -> str:
    """A call count; per-run averages of an Nsight capture (report.from_nsys) keep one decimal."""
    return str(int(calls)) if float(calls).is_integer() else f"{calls:.1f}"


def write_artifacts(out_dir: Path, job: Job) -> dict:
    """The artifacts of a finished job (see :func:`write_report_files`)."""
    m = job.measurement
    table = stage_table(m, job.stage_model, job.hardware.roofs, job.dtype_name, job.device.type)
    record = run_record(job, table)
    write_report_files(out_dir, record, table, m.attribution)
    return {"stages": table, "record": record}


def write_report_files(out_dir: Path, record: dict, table: pd.DataFrame, attribution: Attribution | None) -> None:
    """stages.csv, stages.json, kernels.csv, roofline.png and report.md first, run.json last: a
    run.json with status ok means every artifact is there."""
    kernels = attribution.kernels if attribution is not None else pd.DataFrame(columns=KERNEL_COLUMNS)
    roofs = record_roofs(record)
    write_csv(out_dir / "stages.csv", table)
    write_json(out_dir / "stages.json", {
        "dtype": record["dtype"],
        "roofs": record["hardware"]["roofs"],
        "headline": record["headline"],
        "stages": table.to_dict("records"),
    })
    write_csv(out_dir / "kernels.csv", kernels[list(KERNEL_COLUMNS)])
    request = record["request"].split(",")[0]
    roofline_plot(
        table.rename(columns={"time_ms": "wall_ms"}), roofs, record["dtype"], out_dir / "roofline.png",
        title=f"{record['config']['model']['name']} · {request} · {record['device']['name']} · {record['dtype']}",
    )  # fmt: skip
    write_text(out_dir / "report.md", report_markdown(record, table, attribution))
    write_json(out_dir / "run.json", record)


def write_failure(out_dir: Path, config: dict, status: str, error: str) -> None:
    write_json(out_dir / "run.json", {"status": status, "error": error, "config": config, "versions": versions()})
