"""run.json's writer: everything about one finished job as a :class:`~.record.RunRecord` (the
typed record every reader gets back), built from the live measurement, costs and ceilings."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformers

import llm_perf_opt
from llm_perf_opt.config import RunConfig
from llm_perf_opt.hardware.calibration import Calibration
from llm_perf_opt.hardware.ceilings import Roof, Selection
from llm_perf_opt.hardware.host import HostSetup
from llm_perf_opt.hardware.precision import DtypeChoice
from llm_perf_opt.models.interface import Footprint, OpNote, StageCosts
from llm_perf_opt.profiling.attribution import Attribution
from llm_perf_opt.profiling.os_counters import COUNTERS
from llm_perf_opt.profiling.passes import Measurement
from llm_perf_opt.profiling.timing import OUTLIER_FACTOR, summarize

from .record import FIGURES, SCHEMA_VERSION, Headline, RunRecord, Versions
from .roofline import headline

#: ``trace.basis`` of a run whose busy times were imported from Nsight Systems.
NSYS_BASIS = "device (nsys)"


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
    stage_model: StageCosts  # the analytic FLOPs and bytes of the run
    footprint: Footprint  # the analytic memory of the run
    device: torch.device
    dtype: DtypeChoice
    hardware: Hardware
    compute_groups: dict[str, tuple[str, ...]]
    bandwidth_groups: dict[str, tuple[str, ...]]
    execution: Any = None  # the session's Execution (as_dict(), summary()), or None
    op_notes: tuple[OpNote, ...] = ()  # the session's words on ops, quoted by the verdicts
    host: HostSetup | None = None  # allocator and threads (None: a job built without them, in tests)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype.dtype).removeprefix("torch.")

    @property
    def split_threads(self) -> int:
        """The threads a stage's CPU time is spread over in the CPU split: the intra-op threads on
        a CPU, the one launching thread on a GPU."""
        if self.device.type != "cpu":
            return 1
        return self.host.threads if self.host is not None else torch.get_num_threads()

    @property
    def allocator(self) -> str | None:
        """The host allocator in force, which the verdicts' remedy for page faults depends on."""
        return self.host.in_force if self.host is not None else None


def versions() -> dict:
    return {
        "llm_perf_opt": llm_perf_opt.__version__,
        **code_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }


def code_commit() -> dict:
    """The git commit of the llm_perf_opt source that ran, and whether the checkout had changes
    to tracked files; "unknown" (and None) where it is no git checkout (an installed wheel).
    The package's own files must be tracked: a virtual environment inside some other
    repository would otherwise report that repository's commit."""
    package = Path(llm_perf_opt.__file__).parent
    unknown = {"git_commit": "unknown", "git_dirty": None}
    try:
        tracked = _git(package, "ls-files", "--error-unmatch", "--", Path(llm_perf_opt.__file__).name)
        commit = _git(package, "rev-parse", "HEAD")
        changes = _git(package, "status", "--porcelain", "--untracked-files=no")
    except FileNotFoundError:  # no git on this machine
        return unknown
    if tracked is None or commit is None or changes is None:
        return unknown
    return {"git_commit": commit.strip(), "git_dirty": bool(changes.strip())}


def _git(folder: Path, *args: str) -> str | None:
    """git's output in folder, or None when git refuses (not a checkout, an untracked file)."""
    proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else None


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


def footprint_record(footprint: Footprint) -> dict:
    return {
        "total_weight_bytes": footprint.total_weight_bytes,
        "kv_cache_bytes": footprint.kv_cache_bytes,
        "kv_bytes_per_token": footprint.kv_bytes_per_token,
        "logits_bytes": footprint.logits_bytes,
        "stages": [dataclasses.asdict(stage) for stage in footprint.stages],
    }


def analytic_record(costs: StageCosts) -> dict:
    """The ``analytic`` entry of run.json: per stage over the run (scope "run") and the first
    step of each per-step stage ("step"), the families, the nested ranges, the experts."""
    stages = [{"stage": stage, "scope": "run", **work.as_dict()} for stage, work in costs.stages.items()]
    stages += [{"stage": stage, "scope": "step", **work.as_dict()} for stage, work in costs.steps.items()]
    return {
        "note": costs.note or None,
        "stages": stages,
        "families": [
            {"stage": f.stage, "scope": f.scope, "family": f.family, **f.work.as_dict()}
            for f in costs.families
        ],
        "ranges": [{"stage": name, **work.as_dict()} for name, work in costs.ranges.items()],
        "experts": [dataclasses.asdict(row) for row in costs.experts or ()],
    }


def headline_figures(record: RunRecord, table: pd.DataFrame) -> Headline:
    """The medians of the headline figures (``timing.summary``), and the utilisation of the
    model's stage groups (``stage_layout``) in the stage ``table`` against the record's roofs."""
    summary = record.timing.summary
    medians = {key: None if summary.get(key) is None else summary[key].median for key in FIGURES}
    layout = record.stage_layout
    utilisation = headline(
        table,
        record.hardware.roofs,
        record.dtype,
        compute_stages=layout.compute_groups,
        bandwidth_stages=layout.bandwidth_groups,
    )
    return Headline(**medians, **utilisation)


def record_op_notes(record: RunRecord) -> tuple[OpNote, ...]:
    """The model's op notes of a run record (none in a record older than them)."""
    return tuple(OpNote(n.stage, n.ops, n.note) for n in record.notes)


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


def run_record(job: Job, table: pd.DataFrame) -> RunRecord:
    """Everything about the finished job."""
    m = job.measurement
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "error": None,
        "config": job.config,
        "versions": versions(),
        "device": describe_device(job.device),
        "cpu": None if job.host is None else job.host.record(),
        "hardware": job.hardware.record(),
        "dtype": job.dtype_name,
        "dtype_reason": job.dtype.reason,
        "weights": job.run.model.weights,
        "batch": {"size": job.run.batch_size, "padding": None},  # a batched request's describe() replaces it
        **m.request.describe(),
        "request": m.request.summary(),
        "execution": None
        if job.execution is None
        else {**job.execution.as_dict(), "summary": job.execution.summary()},
        "generated_tokens": m.result.generated_tokens if m.result else None,
        "op_notes": [note.as_dict() for note in job.op_notes],
        "headline": None,  # below: it needs the roofs and stage layout of this record
        "stage_layout": stage_layout(job),
        "timing": {
            "unit": "ms",
            "tpot": "(e2e - ttft) / decode steps; ttft = the once-per-request stages; a batch steps all its "
            "sequences at once, so TPOT is per step of the batch",
            "throughput": "tokens_per_s = real generated tokens of the batch / e2e; decode_tokens_per_s = real "
            "tokens of the decode steps / (e2e - ttft); pages_per_s = pages / e2e",
            "summary": m.summary(),
            "stages": {s.name: summarize(m.stage_totals(s.name)) for s in m.stages if m.runs},
            "os_unit": "user_ms, sys_ms: CPU time in ms over all the process's threads; the others: counts "
            "(getrusage's minor and major page faults, voluntary and involuntary context switches)",
            "os_stages": {s.name: os_summary(m, s.name) for s in m.stages if m.runs},
            "outlier_factor": OUTLIER_FACTOR,
            "until_cv": m.until_cv,
            "samples": [r.as_dict() for r in m.runs],
        },
        "memory": {
            "measured": None if m.memory is None else m.memory.as_dict(),
            "analytic": footprint_record(job.footprint),
        },
        "routing": None
        if m.routing is None
        else {
            stage: {"calls": len(calls), "tokens_per_expert": _sum_calls(calls)}
            for stage, calls in m.routing.items()
        },
        "analytic": analytic_record(job.stage_model),
        "trace": None if m.attribution is None else trace_record(m.attribution, m.trace_path.name),
    }
    typed = RunRecord.from_dict(record)
    return dataclasses.replace(typed, headline=headline_figures(typed, table))


def failure_record(config: dict, status: str, error: str) -> RunRecord:
    """The record of a job that failed or was interrupted: why, and what it was asked to run."""
    return RunRecord(SCHEMA_VERSION, status, error, config, Versions.from_dict(versions()))


def os_summary(m: Measurement, stage: str) -> dict[str, dict]:
    """Per OS counter, the summary over the timed runs of the stage's total (none without counters)."""
    calls = [run[stage] for run in m.os_runs() if stage in run]
    return (
        {counter: summarize([sum(call[counter]) for call in calls]) for counter in COUNTERS} if calls else {}
    )


def _sum_calls(calls: list[list[list[int]]]) -> list[list[int]]:
    """Tokens per expert of each routed layer, summed over the calls."""
    return [[sum(counts) for counts in zip(*layer)] for layer in zip(*calls)]
