"""Compare a run or sweep against a baseline: headline and per-stage deltas with a noise-aware verdict.

Each side of a row is the list of per-repeat values of one figure (``timing.samples`` of
run.json): TTFT, TPOT, decode tokens/s (``1000 / TPOT``: decode steps per second of decode
time), end-to-end, and per stage its total time per run (the sum of its per-call times).
A row compares the current median with the baseline's centre: the median of its repeats, or,
with k ≥ 2 baseline runs of one code version (each its own process), the geometric mean of
their k medians (the pooled repeats of the k runs are the baseline side of the tests below)::

    delta % = 100 · (median(current) − centre(baseline)) / centre(baseline)
    worse % = delta %    for times (lower is better)
            = −delta %   for decode tokens/s (higher is better)

Verdict of a row (``warn`` and ``fail`` are the thresholds, in %):

* ``ok`` when |worse %| ≤ warn;
* otherwise ``noise`` when the change is within the row's noise floor (below), else the change
  must also be significant: a two-sided Mann-Whitney U test of the two sides' repeats
  (``scipy.stats.mannwhitneyu``, exact for these sizes) with p ≤ ``ALPHA`` (0.05); ``noise``
  when p > ALPHA. Too few repeats can never reach that p (3 against 3: the smallest two-sided
  p is 0.1); then the sample ranges decide, as a cruder test: ``noise`` when [min, max] of the
  two sides overlap, and the job's notes say so (``profiling.repeats=5`` or more gives the test
  its power: 4 against 4 can reach p = 0.029). A side with a single repeat has no spread, so
  then the thresholds alone decide (and the notes say so);
* otherwise ``fail`` when worse % > fail, ``warn`` when worse % > warn, ``improved`` when
  worse % < −warn;
* ``n/a`` when the baseline centre is not positive (no relative change exists).

Noise floor. Repeats in one process agree more closely than runs of the same code in separate
processes do (a process lands a few % faster or slower as a whole, or on one stage), so the
rank test on one process's repeats is confident about differences between processes. The
floor is the change between processes that identical code shows, and a change must exceed it:

* between-process spread of a figure: ``s``, the sample standard deviation of ln(median) over
  k runs of identical code, each its own process, with ``k − 1`` degrees of freedom. Its
  sources: the k ≥ 2 baseline runs of this comparison, and a noise-floor file recorded from
  such runs earlier (:func:`estimate_noise_floor`, ``--noise-floor-out``); with both, their
  variances are pooled (weighted by degrees of freedom, which add up);
* relative floor, the largest |ln(current / centre)| that identical code shows except with
  probability ALPHA over the m figures of the job (Bonferroni, so that identical code passes
  the whole job, not each figure, with probability ≥ 1 − ALPHA; m = 10 for 6 stages), where
  the current run is one process and the centre the mean of k_b baseline processes::

      ln(1 + floor % / 100) = t(1 − ALPHA / (2 m), dof) · s · √(1 + 1 / k_b)

  (``t`` the Student quantile at the spread's degrees of freedom: few runs give a wide floor,
  e.g. t = 127 at dof 1, 3.69 at 9; the notes say where a floor is above the fail threshold,
  since a smaller regression cannot be seen there);
* absolute floor ``min_ms`` (``--min-ms``, default 0 = none): a change of the median by at
  most that many ms is noise, since a stage of a few ms moves by a scheduling slice between
  processes. Decode tokens/s is a rate: its change in ms is that of its step time 1000 / value.

The markdown and JSON give each row's floor and its source, and mark a verdict that the floor
decided (``noise (floor)``, ``noise (min-ms)``).

Jobs of two sweeps are paired by identity (:class:`~llm_perf_opt.report.run_dirs.JobIdentity`);
two single runs are paired as given. A job that ran in the baseline but failed, was
interrupted or is missing in the current set fails the comparison. Runs on a different
device, model, mode, dtype, weights or batch size are refused unless forced, and so are
baseline runs that differ among themselves and a noise floor recorded for other runs.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import mannwhitneyu
from scipy.stats import t as student_t

from llm_perf_opt.errors import UserError

from .run_dirs import Job, JobIdentity, RunSet, mode_name, model_name

OK, NOISE, WARN, FAIL, IMPROVED, NOT_COMPARABLE = "ok", "noise", "warn", "fail", "improved", "n/a"
#: Verdict of a whole comparison.
PASSED, WARNED, FAILED = "PASS", "WARN", "FAIL"
#: What made a row ``noise`` before the rank test ran (``Row.floor_decided``).
BY_FLOOR, BY_MIN_MS = "floor", "min-ms"

TTFT, TPOT, DECODE_TPS, E2E = "TTFT (ms)", "TPOT (ms)", "decode tokens/s", "end-to-end (ms)"
HIGHER_IS_BETTER = frozenset({DECODE_TPS})

#: Fields that must match for two runs to be comparable, in the order they are checked.
MATCHED_FIELDS = ("device", "model", "mode", "dtype", "weights", "batch")

_OK_STATUS = "ok"
#: Largest p-value of the rank test at which a change counts as significant; also the chance,
#: over a whole job, that identical code exceeds the noise floor.
ALPHA = 0.05
#: ``kind`` of a noise-floor file.
NOISE_FLOOR_KIND = "llm_perf_opt noise floor"
NOISE_FLOOR_SCHEMA = 1
#: Fewer baseline runs than this give a floor so wide that the notes say so.
_FEW_RUNS = 5


@dataclass(frozen=True)
class Thresholds:
    """Percentages above which a figure that got worse is a warning or a failure, and the
    absolute floor in ms below which a change is noise (0: none)."""

    warn_pct: float = 5.0
    fail_pct: float = 10.0
    min_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warn_pct <= self.fail_pct:
            raise UserError(f"thresholds need 0 <= warn <= fail, got warn {self.warn_pct}%, fail {self.fail_pct}%")
        if not self.min_ms >= 0:
            raise UserError(f"--min-ms must be >= 0, got {self.min_ms}")


@dataclass(frozen=True)
class Spread:
    """Between-process spread of one figure: ``log_sd`` is the sample standard deviation of
    ln(median) over runs of identical code in separate processes, with ``dof`` degrees of
    freedom (runs − 1); ``source`` says where it was measured."""

    log_sd: float
    dof: int
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


@dataclass(frozen=True)
class Row:
    """One figure of one job: the per-repeat values of both sides and the verdict."""

    figure: str
    baseline: tuple[float, ...]
    current: tuple[float, ...]
    delta_pct: float | None
    verdict: str
    p_value: float | None = None  # the rank test's, where it could decide (see the module docstring)
    #: The baseline's centre (the median, or the geometric mean of several runs' medians).
    baseline_centre: float | None = None
    #: The relative noise floor of this row, in %, and where its spread was measured.
    floor_pct: float | None = None
    floor_source: str | None = None
    #: BY_FLOOR or BY_MIN_MS where a floor made the row ``noise``.
    floor_decided: str | None = None


@dataclass(frozen=True)
class JobResult:
    """The comparison of one job; ``problem`` says why a job could not be compared."""

    label: str
    baseline: Job | None
    current: Job | None
    rows: tuple[Row, ...] = ()
    notes: tuple[str, ...] = ()
    problem: str | None = None
    #: Whether the problem fails the comparison (a job lost since the baseline does).
    problem_fails: bool = False
    #: Every baseline run of the job that ran ok (``baseline`` is the first of them).
    baselines: tuple[Job, ...] = ()

    @property
    def verdict(self) -> str:
        verdicts = {row.verdict for row in self.rows}
        if self.problem_fails or FAIL in verdicts:
            return FAIL
        return WARN if WARN in verdicts else OK


@dataclass(frozen=True)
class Comparison:
    """All job results of comparing ``current`` against ``baseline`` (the first of ``baselines``)."""

    baseline: RunSet
    current: RunSet
    thresholds: Thresholds
    jobs: tuple[JobResult, ...]
    #: Jobs left out by ``shared_only`` (only one side has them).
    left_out: tuple[str, ...] = ()
    baselines: tuple[RunSet, ...] = ()
    noise_floor: NoiseFloor | None = None

    @property
    def verdict(self) -> str:
        verdicts = {job.verdict for job in self.jobs}
        return FAILED if FAIL in verdicts else WARNED if WARN in verdicts else PASSED

    @property
    def failed(self) -> bool:
        return self.verdict == FAILED

    @property
    def uses_floor(self) -> bool:
        """Whether any row may have a floor: a floor file, several baseline runs or ``min_ms``."""
        return (self.noise_floor is not None or self.thresholds.min_ms > 0
                or any(len(job.baselines) > 1 for job in self.jobs))  # fmt: skip


def judge(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    higher_is_better: bool,
    thresholds: Thresholds,
    floor_pct: float | None = None,
    baseline_centre: float | None = None,
) -> tuple[float | None, str, float | None]:
    """Delta % of the medians, the verdict of one row and the rank test's p-value (None where
    it was not run or cannot decide; rules in the module docstring). ``baseline_centre``
    replaces the baseline's median (several baseline runs); ``floor_pct`` is the row's relative
    noise floor (None: none)."""
    base = statistics.median(baseline) if baseline_centre is None else baseline_centre
    cur = statistics.median(current)
    if base <= 0:
        return None, NOT_COMPARABLE, None
    delta = 100 * (cur - base) / base
    worse = -delta if higher_is_better else delta
    if abs(worse) <= thresholds.warn_pct:
        return delta, OK, None
    if within_floor(base, cur, higher_is_better=higher_is_better, floor_pct=floor_pct, min_ms=thresholds.min_ms):
        return delta, NOISE, None
    p = None
    if min(len(baseline), len(current)) >= 2:
        if test_can_decide(len(baseline), len(current)):
            p = float(mannwhitneyu(baseline, current, alternative="two-sided").pvalue)
            if p > ALPHA:
                return delta, NOISE, p
        elif max(min(baseline), min(current)) <= min(max(baseline), max(current)):
            return delta, NOISE, None
    if worse > thresholds.fail_pct:
        return delta, FAIL, p
    return delta, WARN if worse > 0 else IMPROVED, p


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


def floor_pct(spread: Spread, *, baseline_runs: int, figures: int) -> float:
    """Relative noise floor of a row in %, for a current run of one process against the
    centre of ``baseline_runs`` processes, among ``figures`` rows of the job:
    ``100 · (exp(t(1 − ALPHA / (2 · figures), dof) · s · √(1 + 1 / baseline_runs)) − 1)``."""
    quantile = _t_quantile(1 - ALPHA / (2 * max(figures, 1)), spread.dof)
    return 100 * math.expm1(quantile * spread.log_sd * math.sqrt(1 + 1 / baseline_runs))


@functools.lru_cache(maxsize=256)
def _t_quantile(probability: float, dof: int) -> float:
    """Student t quantile; cached because a comparison asks for the same few many times."""
    return float(student_t.ppf(probability, dof))


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
        figure: Spread(statistics.stdev(math.log(m) for m in values), len(values) - 1, source)
        for figure, values in medians.items()
        if len(values) >= 2 and min(values) > 0
    }
    return spreads, {figure: tuple(values) for figure, values in medians.items()}


def test_can_decide(n_baseline: int, n_current: int) -> bool:
    """Whether the two-sided rank test can reach ALPHA at these sizes: its smallest p-value
    (the two samples fully apart) is 2 / C(n1 + n2, n1)."""
    return 2 / math.comb(n_baseline + n_current, n_baseline) <= ALPHA


def sample_figures(record: dict[str, Any]) -> dict[str, list[float]]:
    """Per figure, its value in each timed repeat: the headline figures, then one row per stage."""
    samples = (record.get("timing") or {}).get("samples") or []
    figures = {
        TTFT: [s["ttft_ms"] for s in samples if s.get("ttft_ms") is not None],
        TPOT: [s["tpot_ms"] for s in samples if s.get("tpot_ms") is not None],
        DECODE_TPS: [1e3 / s["tpot_ms"] for s in samples if s.get("tpot_ms")],
        E2E: [s["e2e_ms"] for s in samples if s.get("e2e_ms") is not None],
    }
    # Stages in the order the runs recorded them, which is the order they ran.
    for stage in dict.fromkeys(stage for s in samples for stage in s.get("stages", {})):
        figures[stage_figure(stage)] = [sum(s["stages"][stage]) for s in samples if stage in s.get("stages", {})]
    return {name: values for name, values in figures.items() if values}


def stage_figure(stage: str) -> str:
    """Row label of a stage's total time per run."""
    return f"{stage} (ms)"


def run_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of :data:`MATCHED_FIELDS`, as resolved for the run; a run that failed before
    its settings were resolved lacks device, dtype and weights (``None``). A run.json without
    a batch size ran one page at a time (batch 1)."""
    return {
        "device": (record.get("device") or {}).get("name"),
        "model": model_name(record),
        "mode": mode_name(record),
        "dtype": record.get("dtype"),
        "weights": record.get("weights"),
        "batch": (record.get("batch") or {}).get("size") or 1,
    }


def mismatches(baseline: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, baseline value, current value)`` for each matched field known on both sides that differs."""
    return _field_mismatches(run_fields(baseline), run_fields(current))


def _field_mismatches(base: dict[str, Any], cur: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [
        (name, base.get(name), cur.get(name))
        for name in MATCHED_FIELDS
        if base.get(name) is not None and cur.get(name) is not None and base[name] != cur[name]
    ]


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


def pair_jobs(
    baselines: RunSet | Sequence[RunSet], current: RunSet
) -> list[tuple[tuple[Job, ...], Job | None]]:
    """Each job's baseline runs with its current run. Single runs pair as given; otherwise
    jobs pair by identity, baseline order first, then jobs only in the current set (no baseline)."""
    baselines = _as_tuple(baselines)
    if not current.sweep and not any(b.sweep for b in baselines):
        return [(group_runs(baselines)[0], current.jobs[0])]
    unpaired = {job.identity: job for job in current.jobs}
    pairs: list[tuple[tuple[Job, ...], Job | None]] = [
        (group, unpaired.pop(group[0].identity, None)) for group in group_runs(baselines)
    ]
    return pairs + [((), job) for job in unpaired.values()]


def compare(
    baseline: RunSet | Sequence[RunSet],
    current: RunSet,
    thresholds: Thresholds,
    *,
    force: bool = False,
    shared_only: bool = False,
    noise_floor: NoiseFloor | None = None,
) -> Comparison:
    """Compare every pair of jobs (with ``shared_only``, only the jobs both sides have).
    ``baseline`` is one run set or several runs of one code version (each its own process),
    whose spread gives a noise floor, as ``noise_floor`` does. Raises :class:`UserError` for
    runs that are not comparable (see :data:`MATCHED_FIELDS`) unless ``force``."""
    baselines = _as_tuple(baseline)
    pairs = pair_jobs(baselines, current)
    left_out: tuple[str, ...] = ()
    if shared_only:
        left_out = tuple(str((b[0] if b else c).identity) for b, c in pairs if not b or c is None)
        pairs = [(b, c) for b, c in pairs if b and c is not None]
        if not pairs:
            raise UserError("--shared-only: the two sides have no job in common")
    sweep = current.sweep or any(b.sweep for b in baselines)
    floors = [_job_floor(noise_floor, b, c, single=not sweep) for b, c in pairs]
    differences = []
    for (group, cur), floor in zip(pairs, floors):
        where = f" {group[0].identity}" if sweep and group else ""
        diffs = [(f"baseline {b.path}: {_describe(d)}", d) for b in group[1:]
                 if (d := mismatches(group[0].record, b.record))]  # fmt: skip
        if cur is not None:
            diffs += [(_describe(d), d) for b in group[:1] if (d := mismatches(b.record, cur.record))]
            if floor is not None and (d := _field_mismatches(floor.fields, run_fields(cur.record))):
                diffs.append((f"noise floor {_floor_name(noise_floor)}: {_describe(d)}", d))
        if diffs and not force:
            what = "; ".join(text for text, _ in diffs)
            raise UserError(f"refusing to compare{where}: {what}; --force compares anyway")
        differences.append([text for text, _ in diffs])
    jobs = tuple(
        compare_jobs(b, c, thresholds, forced=diffs, floor=floor, floor_name=_floor_name(noise_floor))
        for (b, c), diffs, floor in zip(pairs, differences, floors)
    )
    return Comparison(baselines[0], current, thresholds, jobs, left_out, baselines, noise_floor)


def compare_jobs(
    baseline: Job | Sequence[Job] | None,
    current: Job | None,
    thresholds: Thresholds,
    *,
    forced: Sequence[str] = (),
    floor: JobFloor | None = None,
    floor_name: str = "",
) -> JobResult:
    """Rows and notes of one job: its baseline runs (one job or several runs of it, each its
    own process) against its current run; either side may be absent."""
    group = () if baseline is None else (baseline,) if isinstance(baseline, Job) else tuple(baseline)
    ok_runs = tuple(job for job in group if job.status == _OK_STATUS)
    first = ok_runs[0] if ok_runs else group[0] if group else None
    label = str((first or current).identity)
    if first is None:
        return JobResult(label, None, current, problem="new job: no baseline to compare with")
    if current is None:
        return JobResult(label, first, None, problem="missing in current", problem_fails=bool(ok_runs),
                         baselines=ok_runs)  # fmt: skip
    if current.status != _OK_STATUS:
        return JobResult(
            label, first, current,
            problem=f"current run {current.status}: {current.error}",
            problem_fails=bool(ok_runs),
            baselines=ok_runs,
        )
    if not ok_runs:
        return JobResult(label, first, current, problem=f"baseline run {first.status}: nothing to compare with")

    per_run = [sample_figures(job.record) for job in ok_runs]
    base_spreads, base_medians = run_spreads(ok_runs, f"{len(ok_runs)} baseline runs")
    cur_figures = sample_figures(current.record)
    base_names = list(dict.fromkeys(figure for figures in per_run for figure in figures))
    shared = [figure for figure in base_names if figure in cur_figures]
    rows = []
    notes = [f"compared with --force: {text}" for text in forced]
    for figure in [*base_names, *(f for f in cur_figures if f not in base_names)]:
        if figure not in shared:
            notes.append(f"{figure}: only in {'baseline' if figure in base_names else 'current'}")
            continue
        pooled_repeats = [value for figures in per_run for value in figures.get(figure, [])]
        medians = base_medians[figure]
        centre = _geometric_mean(medians) if len(medians) > 1 and min(medians) > 0 else statistics.median(medians)
        spread = pooled(floor.figures.get(figure) if floor else None, base_spreads.get(figure))
        pct = None if spread is None else floor_pct(spread, baseline_runs=len(medians), figures=len(shared))
        higher = figure in HIGHER_IS_BETTER
        delta, verdict, p = judge(pooled_repeats, cur_figures[figure], higher_is_better=higher,
                                  thresholds=thresholds, floor_pct=pct, baseline_centre=centre)  # fmt: skip
        decided = None
        if verdict == NOISE and p is None and centre > 0:
            decided = within_floor(centre, statistics.median(cur_figures[figure]), higher_is_better=higher,
                                   floor_pct=pct, min_ms=thresholds.min_ms)  # fmt: skip
        rows.append(Row(figure, tuple(pooled_repeats), tuple(cur_figures[figure]), delta, verdict, p,
                        centre, pct, None if spread is None else spread.source, decided))  # fmt: skip
    notes += _sample_notes([job.record for job in ok_runs], current.record)
    notes += _floor_notes(floor, floor_name, len(ok_runs), current.record)
    notes += _wide_floor_notes(rows, thresholds)
    if first.identity.overrides != current.identity.overrides:
        notes.append(
            f"different overrides: baseline {list(first.identity.overrides)}, "
            f"current {list(current.identity.overrides)}"
        )
    notes += _version_notes(first.record, current.record)
    return JobResult(label, first, current, tuple(rows), tuple(notes), baselines=ok_runs)


def estimate_noise_floor(run_sets: Sequence[RunSet]) -> NoiseFloor:
    """The noise floor measured on several runs of one code version, each its own process: per
    job that ran ok in at least 2 of them, each figure's between-process spread. Raises
    :class:`UserError` when no job has 2 such runs or a job's runs differ (:data:`MATCHED_FIELDS`)."""
    jobs = {}
    for group in group_runs(run_sets):
        ok_runs = [job for job in group if job.status == _OK_STATUS]
        if len(ok_runs) < 2:
            continue
        label = str(ok_runs[0].identity)
        for job in ok_runs[1:]:
            if diffs := mismatches(ok_runs[0].record, job.record):
                raise UserError(f"noise floor of {label}: {job.path}: {_describe(diffs)}")
        spreads, medians = run_spreads(ok_runs, f"floor of {len(ok_runs)} runs")
        repeats = round(statistics.median(_repeats(job.record) for job in ok_runs))
        jobs[label] = JobFloor(label, run_fields(ok_runs[0].record), len(ok_runs), repeats, spreads, medians)
    if not jobs:
        raise UserError("a noise floor needs at least 2 runs of the same job that ran ok")
    return NoiseFloor(jobs, tuple(str(run_set.path) for run_set in run_sets))


def noise_floor_to_dict(floor: NoiseFloor) -> dict[str, Any]:
    """A noise floor as the JSON of a noise-floor file (:func:`load_noise_floor` reads it)."""
    return {
        "kind": NOISE_FLOOR_KIND,
        "schema_version": NOISE_FLOOR_SCHEMA,
        "what": "per job and figure, the standard deviation of ln(median) over runs of identical code, "
                "each its own process (log_sd, with dof = runs - 1)",
        "sources": list(floor.sources),
        "jobs": [
            {
                "label": job.label,
                "fields": job.fields,
                "runs": job.runs,
                "repeats": job.repeats,
                "figures": {
                    figure: {"log_sd": spread.log_sd, "dof": spread.dof, "spread_pct": spread.pct,
                             "medians": list(job.medians.get(figure, ()))}  # fmt: skip
                    for figure, spread in job.figures.items()
                },
            }
            for job in floor.jobs.values()
        ],
    }


def load_noise_floor(path: str | Path) -> NoiseFloor:
    """Read a noise-floor file (:func:`noise_floor_to_dict`); a file that is not one is a :class:`UserError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != NOISE_FLOOR_KIND:
        raise UserError(f"{path}: not a noise-floor file (kind is not {NOISE_FLOOR_KIND!r})")
    if data.get("schema_version") != NOISE_FLOOR_SCHEMA:
        raise UserError(f"{path}: noise-floor schema {data.get('schema_version')!r}, this version reads "
                        f"{NOISE_FLOOR_SCHEMA}")  # fmt: skip
    try:
        jobs = {}
        for job in data["jobs"]:
            runs = int(job["runs"])
            figures = {name: Spread(float(f["log_sd"]), int(f["dof"]), f"floor file, {runs} runs")
                       for name, f in job["figures"].items()}  # fmt: skip
            if any(s.dof < 1 or not s.log_sd >= 0 for s in figures.values()):
                raise ValueError("a spread needs dof >= 1 and log_sd >= 0")
            medians = {name: tuple(f.get("medians", ())) for name, f in job["figures"].items()}
            jobs[job["label"]] = JobFloor(job["label"], dict(job["fields"]), runs, int(job["repeats"]), figures,
                                          medians)  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed noise-floor file ({type(exc).__name__}: {exc})") from None
    return NoiseFloor(jobs, tuple(data.get("sources") or ()), path)


def _job_floor(
    floor: NoiseFloor | None, group: tuple[Job, ...], current: Job | None, *, single: bool
) -> JobFloor | None:
    """The recorded floor of a job: by its label; two single runs take a file's only job."""
    if floor is None or not (group or current):
        return None
    label = str((group[0] if group else current).identity)
    if label in floor.jobs:
        return floor.jobs[label]
    return next(iter(floor.jobs.values())) if single and len(floor.jobs) == 1 else None


def _floor_name(floor: NoiseFloor | None) -> str:
    return "" if floor is None else str(floor.path or "(given)")


def _floor_notes(floor: JobFloor | None, floor_name: str, runs: int, current: dict[str, Any]) -> list[str]:
    notes = []
    if floor_name and floor is None:
        notes.append(f"no noise floor recorded for this job in {floor_name}")
    if floor is not None and floor.repeats != _repeats(current):
        notes.append(f"the noise floor was measured with {floor.repeats} repeats per run, the current run has "
                     f"{_repeats(current)}")  # fmt: skip
    if 1 < runs < _FEW_RUNS and floor is None:
        notes.append(f"a floor from {runs} baseline runs is wide (Student t with {runs - 1} degrees of freedom); "
                     f"{_FEW_RUNS}-10 runs or a recorded noise floor narrow it")  # fmt: skip
    return notes


def _wide_floor_notes(rows: Sequence[Row], thresholds: Thresholds) -> list[str]:
    """Where a floor hides regressions the thresholds would catch, say so."""
    wide = [row for row in rows if row.floor_pct is not None and row.floor_pct > thresholds.fail_pct]
    if not wide:
        return []
    widest = max(wide, key=lambda row: row.floor_pct or 0)
    return [f"the noise floor is above the fail threshold ({thresholds.fail_pct:g}%) on {len(wide)} of {len(rows)} "
            f"figures (widest: {widest.figure} {_floor_width(widest.floor_pct or 0)}): a smaller regression there "
            "cannot be told from the spread between runs"]  # fmt: skip


def _geometric_mean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _as_tuple(baselines: RunSet | Sequence[RunSet]) -> tuple[RunSet, ...]:
    result = (baselines,) if isinstance(baselines, RunSet) else tuple(baselines)
    if not result:
        raise UserError("no baseline to compare with")
    return result


def _sample_notes(baselines: Sequence[dict[str, Any]], current: dict[str, Any]) -> list[str]:
    n_base, n_cur = sum(_repeats(r) for r in baselines), _repeats(current)
    single = [side for side, n in (("baseline", n_base), ("current", n_cur)) if n == 1]
    if single:
        return [f"{' and '.join(single)}: a single repeat has no spread, so the thresholds alone decide (no noise)"]
    if n_base and n_cur and not test_can_decide(n_base, n_cur):
        smallest = 2 / math.comb(n_base + n_cur, n_base)
        return [f"{n_base} against {n_cur} repeats: the rank test cannot reach p <= {ALPHA} (smallest p "
                f"{smallest:.2g}), so overlapping [min, max] ranges decide; profiling.repeats=5 gives it power"]
    return []


def _version_notes(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    base, cur = baseline.get("versions") or {}, current.get("versions") or {}
    changed = [
        f"{name} {base.get(name)} → {cur.get(name)}"
        for name in sorted(base.keys() | cur.keys())
        if base.get(name) != cur.get(name)
    ]
    return [f"versions differ: {', '.join(changed)}"] if changed else []


def _repeats(record: dict[str, Any]) -> int:
    return len((record.get("timing") or {}).get("samples") or [])


def _describe(diffs: Sequence[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{name} differs (baseline {base!r}, current {cur!r})" for name, base, cur in diffs)


def to_markdown(comparison: Comparison) -> str:
    """The comparison as Markdown for a CI job summary: a one-line verdict, then a table per job
    (with a floor column when a noise floor is in use)."""
    t = comparison.thresholds
    floors = comparison.uses_floor
    lines = [
        _headline(comparison),
        "",
        f"{_sides(comparison)} Medians of the repeats; "
        f"warn above +{t.warn_pct:g}%, fail above +{t.fail_pct:g}% (decode tokens/s: below −{t.warn_pct:g}% / "
        f"−{t.fail_pct:g}%); a change beyond a threshold counts only if significant (two-sided Mann-Whitney U "
        f"on the repeats, p ≤ {ALPHA:g}; too few repeats for the test: the [min, max] ranges must not overlap), "
        "else it is noise.",
    ]
    if floors:
        lines[-1] += (
            " It must also exceed the row's noise floor (column floor): the change between separate processes "
            f"that identical code shows except with probability {ALPHA:g} per job, from the spread of runs' "
            "medians (several baseline runs or a noise-floor file)"
            + (f", and at least {t.min_ms:g} ms" if t.min_ms > 0 else "") + "."
        )
    if comparison.left_out:
        lines += ["", f"--shared-only left out {len(comparison.left_out)} job(s) only one side has: "
                  + ", ".join(f"`{_cell(label)}`" for label in comparison.left_out)]
    for job in comparison.jobs:
        lines += ["", f"### {_cell(job.label)}: {job.verdict}", ""]
        run = (job.current or job.baseline).record
        fields = run_fields(run)
        if job.problem is not None:
            lines.append(f"- {_cell(job.problem)}")
            continue
        runs = len(job.baselines)
        base_repeats = "+".join(str(_repeats(b.record)) for b in job.baselines)
        lines += [
            f"{fields['device']} · {fields['dtype']} · weights {fields['weights']} · batch {fields['batch']} · "
            f"repeats {base_repeats} baseline{f' ({runs} runs)' if runs > 1 else ''}, "
            f"{_repeats(job.current.record)} current",
            "",
            f"| figure | baseline {'centre' if runs > 1 else 'median'} [min, max] | current median [min, max] "
            "| delta | p |"
            + (" floor |" if floors else "") + " verdict |",
            "|---|---:|---:|---:|---:|" + ("---|" if floors else "") + "---|",
        ]
        lines += [
            f"| {_cell(row.figure)} | {_spread(row.baseline, row.baseline_centre)} | {_spread(row.current)} | "
            f"{'-' if row.delta_pct is None else f'{row.delta_pct:+.1f}%'} | "
            f"{'-' if row.p_value is None else f'{row.p_value:.2g}'} | "
            + (f"{_cell(_floor_text(row, t))} | " if floors else "")
            + f"{_verdict_text(row)} |"
            for row in job.rows
        ]
        if job.notes:
            lines += ["", *(f"- {_cell(note)}" for note in job.notes)]
    return "\n".join(lines) + "\n"


def to_dict(comparison: Comparison) -> dict[str, Any]:
    """The comparison as data (``--json-out``): the verdict, the rules and every row."""
    t = comparison.thresholds
    floor = comparison.noise_floor
    return {
        "verdict": comparison.verdict,
        "baseline": str(comparison.baseline.path),
        "baselines": [str(b.path) for b in comparison.baselines or (comparison.baseline,)],
        "current": str(comparison.current.path),
        "thresholds": {"warn_pct": t.warn_pct, "fail_pct": t.fail_pct, "alpha": ALPHA, "min_ms": t.min_ms,
                       "test": "two-sided Mann-Whitney U on the repeats",
                       "floor": "ln(1 + floor_pct/100) = t(1 - alpha/(2m), dof) * log_sd * sqrt(1 + 1/k)"},  # fmt: skip
        "noise_floor_file": None if floor is None else _floor_name(floor),
        "left_out": list(comparison.left_out),
        "jobs": [
            {
                "label": job.label,
                "verdict": job.verdict,
                "problem": job.problem,
                "baseline_runs": [str(b.path) for b in job.baselines],
                "notes": list(job.notes),
                "rows": [
                    {
                        "figure": row.figure,
                        "baseline_median": _centre(row),
                        "current_median": statistics.median(row.current),
                        "baseline": list(row.baseline),
                        "current": list(row.current),
                        "delta_pct": row.delta_pct,
                        "p_value": row.p_value,
                        "floor_pct": row.floor_pct,
                        "floor_source": row.floor_source,
                        "floor_decided": row.floor_decided,
                        "verdict": row.verdict,
                    }
                    for row in job.rows
                ],
            }
            for job in comparison.jobs
        ],
    }


def _sides(comparison: Comparison) -> str:
    baselines = comparison.baselines or (comparison.baseline,)
    base = ", ".join(f"`{b.path}`" for b in baselines)
    floor = comparison.noise_floor
    return (f"Baseline{'s' if len(baselines) > 1 else ''} {base}, current `{comparison.current.path}`"
            + (f", noise floor `{_floor_name(floor)}`" if floor is not None else "") + ".")  # fmt: skip


def _floor_text(row: Row, thresholds: Thresholds) -> str:
    parts = []
    if row.floor_pct is not None:
        parts.append(f"{_floor_width(row.floor_pct)} ({row.floor_source})")
    if thresholds.min_ms > 0:
        parts.append(f"{thresholds.min_ms:g} ms")
    return "; ".join(parts) or "-"


def _floor_width(pct: float) -> str:
    """``±12.3%``; a floor of 1000 % or more as the factor it allows, ``×15.2``."""
    return f"±{pct:.1f}%" if pct < 1000 else f"×{1 + pct / 100:.3g}"


def _verdict_text(row: Row) -> str:
    if row.verdict in (FAIL, WARN):
        return f"**{row.verdict}**"
    return f"{row.verdict} ({row.floor_decided})" if row.floor_decided else row.verdict


def _headline(comparison: Comparison) -> str:
    """One line: the overall verdict and what caused it."""
    verdict = comparison.verdict
    if verdict == PASSED:
        return f"**{PASSED}**: no regression in {len(comparison.jobs)} job(s)"
    wanted = FAIL if verdict == FAILED else WARN
    causes = []
    for job in comparison.jobs:
        if wanted == FAIL and job.problem_fails:
            causes.append(f"{job.label}: {job.problem}")
        causes += [
            f"{job.label}: {row.figure} {row.delta_pct:+.1f}%" for row in job.rows if row.verdict == wanted
        ]
    return f"**{verdict}**: " + "; ".join(_cell(cause) for cause in causes)


def _centre(row: Row) -> float:
    return statistics.median(row.baseline) if row.baseline_centre is None else row.baseline_centre


def _spread(values: Sequence[float], centre: float | None = None) -> str:
    """``centre [min, max]`` (centre: the median unless given), all with the decimals that suit
    the centre (about 4 significant digits)."""
    median = statistics.median(values) if centre is None else centre
    decimals = 1 if abs(median) >= 100 else 2 if abs(median) >= 1 else 3
    return f"{median:.{decimals}f} [{min(values):.{decimals}f}, {max(values):.{decimals}f}]"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table row (and on one line)."""
    return " ".join(str(text).split()).replace("|", "\\|")
