"""The between-process noise floor a change must exceed: its estimation, its file and its loading.

Repeats in one process agree more closely than runs of the same code in separate processes do
(a process lands a few % faster or slower as a whole, or on one stage), so the rank test on one
process's repeats (:mod:`.compare`) is confident about differences between processes. The
floor is the change between processes that identical code shows, and a change must exceed it:

* between-process spread of a figure (:func:`log_spread`): ``s``, the spread of x = ln(median)
  over n runs of identical code, each its own process. Fewer than 5 runs: the sample standard
  deviation, with ``n − 1`` degrees of freedom. From 5 runs on, robustly, so that one process
  that ran slow as a whole (seen: 1 of 10 at twice the others' end-to-end) does not widen every
  floor past the regressions it should catch: the Shamos estimator, the median distance between
  two runs scaled to a standard deviation, ``s = 1.0483 · med_{i<j} |x_i − x_j| / (1 + 0.5 / n)``,
  with ``0.7 · (n − 1)`` degrees of freedom (on normal data the estimator has 86 % of the
  standard deviation's efficiency for large n; at n = 5-20 a simulation gives its mean as
  (1 + 0.5 / n) σ and its variance as that of a standard deviation with 0.70-0.82 · (n − 1)
  degrees of freedom). Its sources: the runs of each side of this comparison (both sides are runs
  of one code version each), and a noise-floor file recorded from such runs earlier
  (:func:`estimate_noise_floor`, ``--noise-floor-out``); the variances of several sources are
  pooled (weighted by degrees of freedom, which add up);
* centre of a side of k runs (:func:`log_centre`): the Hodges-Lehmann estimate, exp of the median
  of the pairwise means (x_i + x_j) / 2, i ≤ j (k = 1: the run's median, k = 2: the geometric
  mean of both), as robust as the spread; its variance is about ``v_k · s² / k``, with v_k = 1
  for k ≤ 2 and π / 3 from 3 runs on;
* relative floor, the largest ln(centre of current / centre of baseline) in the worse direction
  that identical code shows except with probability ``a`` (the row's level, :func:`row_alpha`),
  for ``k_c`` current and ``k_b`` baseline processes::

      ln(1 + floor % / 100) = t(1 − a, dof) · s · √(v_kb / k_b + v_kc / k_c)

  (``t`` the Student quantile at the spread's degrees of freedom: few runs give a wide floor,
  e.g. t = 63.7 at dof 1; the notes say where a floor is above the fail threshold, since a
  smaller regression cannot be seen there). One current process against k_b baseline runs can
  never see a change smaller than about 2 s; several processes a side (the CPU nightly runs 10
  against a baseline of 10) shrink the floor as 1 / √k. The gate asks whether a figure got
  worse, so the bound is one-sided; the floor is as wide in the other direction, where identical
  code is marked ``improved`` with probability ``a`` too, which fails nothing. The job's ALPHA is split so
  that identical code warns or fails in the whole job with probability ≤ ALPHA (Bonferroni):
  end-to-end, the figure a slowdown of the whole process moves, gets ALPHA / 2 alone, the m
  other rows share ALPHA / 2 (a = ALPHA / (2 m));
* absolute floor ``min_ms`` (``--min-ms``, default 0 = none): a change of the median by at
  most that many ms is noise, since a stage of a few ms moves by a scheduling slice between
  processes. Decode tokens/s is a rate: its change in ms is that of its step time 1000 / value.

A noise-floor file (:func:`noise_floor_to_dict`, read by :func:`load_noise_floor`) holds, per
job, the fields its runs matched on, and per figure ``log_sd`` (s) and ``dof``; a comparison
refuses a floor recorded for other runs.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

from llm_perf_opt.errors import UserError

from .record import RunRecord, read_json
from .run_dirs import Job, RunSet
from .run_figures import (
    E2E,
    OK_STATUS,
    describe_mismatches,
    group_runs,
    mismatches,
    repeats,
    run_fields,
    sample_figures,
)

#: Largest p-value of the rank test at which a change counts as significant; also the chance,
#: over a whole job, that identical code exceeds the noise floor.
ALPHA = 0.05
#: ``kind`` of a noise-floor file.
NOISE_FLOOR_KIND = "llm_perf_opt noise floor"
NOISE_FLOOR_SCHEMA = 1
#: Fewer baseline runs than this give a floor so wide that the notes say so; from this many
#: runs on, a spread is estimated robustly (fewer cannot tell a slow process from the spread).
_FEW_RUNS = ROBUST_RUNS = 5
#: Shamos estimator: 1 / (√2 · Φ⁻¹(3/4)), which makes the median pairwise distance of normal
#: data a standard deviation.
_SHAMOS_SCALE = 1.0483
#: Degrees of freedom of the Shamos estimator per (n − 1) (simulated, the smallest at n = 5-20).
_SHAMOS_DOF = 0.7
#: What made a row ``noise`` before the rank test ran (``Row.floor_decided``).
BY_FLOOR, BY_MIN_MS = "floor", "min-ms"


@dataclass(frozen=True)
class Spread:
    """Between-process spread of one figure: ``log_sd`` estimates the standard deviation of
    ln(median) over runs of identical code in separate processes (:func:`log_spread`), with
    ``dof`` degrees of freedom; ``source`` says where it was measured."""

    log_sd: float
    dof: float
    source: str

    @property
    def pct(self) -> float:
        """The spread as a percentage of the median: 100 · (exp(s) − 1)."""
        return 100 * math.expm1(self.log_sd)


@dataclass(frozen=True)
class JobFloor:
    """Between-process spreads of one job's figures, measured on ``runs`` runs of identical code."""

    label: str
    fields: dict[str, Any]
    runs: int
    repeats: int
    figures: dict[str, Spread]
    medians: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class NoiseFloor:
    """A recorded noise floor: per job label, its :class:`JobFloor`; ``path`` where it was read."""

    jobs: dict[str, JobFloor]
    sources: tuple[str, ...] = ()
    path: Path | None = None


def within_floor(
    base: float, cur: float, *, higher_is_better: bool, floor_pct: float | None, min_ms: float
) -> str | None:
    """BY_FLOOR when |ln(cur / base)| ≤ ln(1 + floor % / 100), else BY_MIN_MS when the median
    moved by at most ``min_ms`` ms (a rate per second, higher is better: its step time
    1000 / value did), else None. ``base`` is positive."""
    if cur <= 0:
        return None
    if floor_pct is not None and abs(math.log(cur / base)) <= math.log1p(floor_pct / 100):
        return BY_FLOOR
    if min_ms > 0:
        change_ms = abs(1e3 / cur - 1e3 / base) if higher_is_better else abs(cur - base)
        if change_ms <= min_ms:
            return BY_MIN_MS
    return None


def row_alpha(figure: str, figures: Sequence[str]) -> float:
    """One-sided level of the floor of ``figure`` among the job's rows ``figures``: ALPHA / 2
    for end-to-end, the other rows ALPHA / 2 shared among them; without an end-to-end row, ALPHA
    shared among all. Their sum is at most ALPHA."""
    if E2E not in figures:
        return ALPHA / max(len(figures), 1)
    if figure == E2E:
        return ALPHA / 2
    return ALPHA / (2 * max(len(figures) - 1, 1))


def floor_pct(spread: Spread, *, baseline_runs: int, current_runs: int = 1, alpha: float) -> float:
    """Relative noise floor of a row in %, for the centre of ``current_runs`` processes against
    that of ``baseline_runs`` processes (:func:`log_centre`), at the one-sided level ``alpha``
    (:func:`row_alpha`): ``100 · (exp(t(1 − alpha, dof) · s · √(v_kb / k_b + v_kc / k_c)) − 1)``."""
    quantile = _t_quantile(1 - alpha, spread.dof)
    scale = math.sqrt(_centre_variance(baseline_runs) + _centre_variance(current_runs))
    return 100 * math.expm1(quantile * spread.log_sd * scale)


def _centre_variance(runs: int) -> float:
    """Variance of :func:`log_centre` of ``runs`` runs in units of s²: v_k / k."""
    return (1 if runs <= 2 else math.pi / 3) / runs


def log_spread(values: Sequence[float], source: str) -> Spread:
    """Spread of ln(values) (n ≥ 2 positive values, each one process's median): below
    ROBUST_RUNS the sample standard deviation with n − 1 degrees of freedom, from there the
    Shamos estimator ``1.0483 · med_{i<j} |ln v_i − ln v_j| / (1 + 0.5 / n)`` with
    0.7 · (n − 1) degrees of freedom (see the module docstring)."""
    logs = [math.log(v) for v in values]
    n = len(logs)
    if n < ROBUST_RUNS:
        return Spread(statistics.stdev(logs), n - 1, source)
    distances = [abs(a - b) for a, b in itertools.combinations(logs, 2)]
    log_sd = _SHAMOS_SCALE * statistics.median(distances) / (1 + 0.5 / n)
    return Spread(log_sd, _SHAMOS_DOF * (n - 1), f"{source}, robust")


def log_centre(values: Sequence[float]) -> float:
    """Hodges-Lehmann centre of positive values (each one process's median): exp of the median
    of the pairwise means (ln v_i + ln v_j) / 2 over i ≤ j."""
    logs = [math.log(v) for v in values]
    walsh = [(a + b) / 2 for a, b in itertools.combinations_with_replacement(logs, 2)]
    return math.exp(statistics.median(walsh))


@functools.lru_cache(maxsize=256)
def _t_quantile(probability: float, dof: float) -> float:
    """Student t quantile; cached because a comparison asks for the same few many times."""
    return float(student_t.ppf(probability, dof))


def floor_width(pct: float) -> str:
    """``±12.3%``; a floor of 1000 % or more as the factor it allows, ``×15.2``."""
    return f"±{pct:.1f}%" if pct < 1000 else f"×{1 + pct / 100:.3g}"


def pooled(*spreads: Spread | None) -> Spread | None:
    """The spreads' pooled estimate: variances weighted by degrees of freedom, which add up."""
    known = [s for s in spreads if s is not None and s.dof > 0]
    if not known:
        return None
    dof = sum(s.dof for s in known)
    variance = sum(s.dof * s.log_sd**2 for s in known) / dof
    return Spread(math.sqrt(variance), dof, " + ".join(s.source for s in known))


def run_spreads(jobs: Sequence[Job], source: str) -> tuple[dict[str, Spread], dict[str, tuple[float, ...]]]:
    """Per figure, the between-process spread over the runs ``jobs`` (of one job, each its own
    process; figures with fewer than 2 positive medians have none), and the medians."""
    medians: dict[str, list[float]] = {}
    for job in jobs:
        for figure, values in sample_figures(job.record).items():
            medians.setdefault(figure, []).append(statistics.median(values))
    spreads = {
        figure: log_spread(values, source)
        for figure, values in medians.items()
        if len(values) >= 2 and min(values) > 0
    }
    return spreads, {figure: tuple(values) for figure, values in medians.items()}


def estimate_noise_floor(run_sets: Sequence[RunSet]) -> NoiseFloor:
    """The noise floor measured on several runs of one code version, each its own process: per
    job that ran ok in at least 2 of them, each figure's between-process spread. Raises
    :class:`UserError` when no job has 2 such runs or a job's runs differ
    (:data:`~llm_perf_opt.report.run_figures.MATCHED_FIELDS`)."""
    jobs = {}
    for group in group_runs(run_sets):
        ok_runs = [job for job in group if job.status == OK_STATUS]
        if len(ok_runs) < 2:
            continue
        label = str(ok_runs[0].identity)
        for job in ok_runs[1:]:
            if diffs := mismatches(ok_runs[0].record, job.record):
                raise UserError(f"noise floor of {label}: {job.path}: {describe_mismatches(diffs)}")
        spreads, medians = run_spreads(ok_runs, f"floor of {len(ok_runs)} runs")
        runs_repeats = round(statistics.median(repeats(job.record) for job in ok_runs))
        jobs[label] = JobFloor(
            label, run_fields(ok_runs[0].record), len(ok_runs), runs_repeats, spreads, medians
        )
    if not jobs:
        raise UserError("a noise floor needs at least 2 runs of the same job that ran ok")
    return NoiseFloor(jobs, tuple(str(run_set.path) for run_set in run_sets))


def noise_floor_to_dict(floor: NoiseFloor) -> dict[str, Any]:
    """A noise floor as the JSON of a noise-floor file (:func:`load_noise_floor` reads it)."""
    return {
        "kind": NOISE_FLOOR_KIND,
        "schema_version": NOISE_FLOOR_SCHEMA,
        "what": "per job and figure, the spread of ln(median) over runs of identical code, each its own "
        "process (log_sd: the standard deviation below 5 runs, with dof = runs - 1; from 5 runs the "
        "Shamos estimator, with dof = 0.7 (runs - 1))",
        "sources": list(floor.sources),
        "jobs": [
            {
                "label": job.label,
                "fields": job.fields,
                "runs": job.runs,
                "repeats": job.repeats,
                "figures": {
                    figure: {
                        "log_sd": spread.log_sd,
                        "dof": spread.dof,
                        "spread_pct": spread.pct,
                        "medians": list(job.medians.get(figure, ())),
                    }
                    for figure, spread in job.figures.items()
                },
            }
            for job in floor.jobs.values()
        ],
    }


def load_noise_floor(path: str | Path) -> NoiseFloor:
    """Read a noise-floor file (:func:`noise_floor_to_dict`); a file that is not one is a :class:`UserError`."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != NOISE_FLOOR_KIND:
        raise UserError(f"{path}: not a noise-floor file (kind is not {NOISE_FLOOR_KIND!r})")
    if data.get("schema_version") != NOISE_FLOOR_SCHEMA:
        raise UserError(
            f"{path}: noise-floor schema {data.get('schema_version')!r}, this version reads "
            f"{NOISE_FLOOR_SCHEMA}"
        )
    try:
        jobs = {}
        for job in data["jobs"]:
            runs = int(job["runs"])
            figures = {
                name: Spread(float(f["log_sd"]), float(f["dof"]), f"floor file, {runs} runs")
                for name, f in job["figures"].items()
            }
            if any(not s.dof > 0 or not s.log_sd >= 0 for s in figures.values()):
                raise ValueError("a spread needs dof > 0 and log_sd >= 0")
            medians = {name: tuple(f.get("medians", ())) for name, f in job["figures"].items()}
            jobs[job["label"]] = JobFloor(
                job["label"], dict(job["fields"]), runs, int(job["repeats"]), figures, medians
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed noise-floor file ({type(exc).__name__}: {exc})") from None
    return NoiseFloor(jobs, tuple(data.get("sources") or ()), path)


def job_floor(
    floor: NoiseFloor | None, group: tuple[Job, ...], current: Job | None, *, single: bool
) -> JobFloor | None:
    """The recorded floor of a job: by its label; two single runs take a file's only job."""
    if floor is None or not (group or current):
        return None
    label = str((group[0] if group else current).identity)
    if label in floor.jobs:
        return floor.jobs[label]
    return next(iter(floor.jobs.values())) if single and len(floor.jobs) == 1 else None


def noise_floor_name(floor: NoiseFloor | None) -> str:
    """Where a noise floor was read (``(given)`` for one built in memory); ``""`` for none."""
    return "" if floor is None else str(floor.path or "(given)")


def floor_notes(floor: JobFloor | None, name: str, runs: int, current: RunRecord) -> list[str]:
    """Notes of a job on its floor: none recorded for it in the file ``name``, a floor measured with
    other repeats than the current run, or a floor from too few baseline runs."""
    notes = []
    if name and floor is None:
        notes.append(f"no noise floor recorded for this job in {name}")
    if floor is not None and floor.repeats != repeats(current):
        notes.append(
            f"the noise floor was measured with {floor.repeats} repeats per run, the current run has "
            f"{repeats(current)}"
        )
    if 1 < runs < _FEW_RUNS and floor is None:
        notes.append(
            f"a floor from {runs} baseline runs is wide (Student t with {runs - 1} degrees of freedom); "
            f"{_FEW_RUNS}-10 runs or a recorded noise floor narrow it"
        )
    return notes
