"""Runs as a comparison reads them: the per-repeat figures of a run.json (``timing.samples``),
the fields two runs must share to be comparable, and several runs of one code version grouped
per job. Both the verdicts (:mod:`.compare`) and the noise floor (:mod:`.noise_floor`) read
runs through this module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .record import RunRecord
from .run_dirs import Job, JobIdentity, RunSet

TTFT, TPOT, DECODE_TPS, E2E = "TTFT (ms)", "TPOT (ms)", "decode tokens/s", "end-to-end (ms)"
HIGHER_IS_BETTER = frozenset({DECODE_TPS})

#: Fields that must match for two runs to be comparable, in the order they are checked.
MATCHED_FIELDS = ("device", "model", "mode", "dtype", "weights", "batch")

#: Status of a run that finished and has figures.
OK_STATUS = "ok"


def sample_figures(record: RunRecord) -> dict[str, list[float]]:
    """Per figure, its value in each timed repeat: the headline figures, then one row per stage."""
    samples = record.samples
    figures = {
        TTFT: [s.ttft_ms for s in samples if s.ttft_ms is not None],
        TPOT: [s.tpot_ms for s in samples if s.tpot_ms is not None],
        DECODE_TPS: [1e3 / s.tpot_ms for s in samples if s.tpot_ms],
        E2E: [s.e2e_ms for s in samples if s.e2e_ms is not None],
    }
    # Stages in the order the runs recorded them, which is the order they ran.
    for stage in dict.fromkeys(stage for s in samples for stage in s.stages):
        figures[stage_figure(stage)] = [s.stage_ms(stage) for s in samples if stage in s.stages]
    return {name: values for name, values in figures.items() if values}


def stage_figure(stage: str) -> str:
    """Row label of a stage's total time per run."""
    return f"{stage} (ms)"


def repeats(record: RunRecord) -> int:
    """How many timed repeats the run recorded."""
    return len(record.samples)


def run_fields(record: RunRecord) -> dict[str, Any]:
    """The fields of :data:`MATCHED_FIELDS`, as resolved for the run; a run that failed before
    its settings were resolved lacks device, dtype and weights (``None``). A run.json without
    a batch size ran one page at a time (batch 1)."""
    return {
        "device": None if record.device is None else record.device.name,
        "model": record.model_name,
        "mode": record.mode_name,
        "dtype": record.dtype,
        "weights": record.weights,
        "batch": record.batch_size,
    }


def mismatches(baseline: RunRecord, current: RunRecord) -> list[tuple[str, Any, Any]]:
    """``(field, baseline value, current value)`` for each matched field known on both sides that differs."""
    return field_mismatches(run_fields(baseline), run_fields(current))


def field_mismatches(base: dict[str, Any], cur: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """:func:`mismatches` of two sets of :func:`run_fields`."""
    return [
        (name, base.get(name), cur.get(name))
        for name in MATCHED_FIELDS
        if base.get(name) is not None and cur.get(name) is not None and base[name] != cur[name]
    ]


def describe_mismatches(diffs: Sequence[tuple[str, Any, Any]]) -> str:
    """The :func:`mismatches` as one clause of an error message."""
    return ", ".join(f"{name} differs (baseline {base!r}, current {cur!r})" for name, base, cur in diffs)


def group_runs(run_sets: Sequence[RunSet]) -> list[tuple[Job, ...]]:
    """The jobs of several runs of one code version, grouped per job: single runs all together;
    otherwise by identity, in the order they first appear."""
    if not any(run_set.sweep for run_set in run_sets):
        return [tuple(run_set.jobs[0] for run_set in run_sets)]
    groups: dict[JobIdentity, list[Job]] = {}
    for run_set in run_sets:
        for job in run_set.jobs:
            groups.setdefault(job.identity, []).append(job)
    return [tuple(jobs) for jobs in groups.values()]
