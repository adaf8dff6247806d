"""Compare a run or sweep against a baseline: headline and per-stage deltas with a noise-aware verdict.

Each side of a row is the list of per-repeat values of one figure (``timing.samples`` of
run.json): TTFT, TPOT, decode tokens/s (``1000 / TPOT``: decode steps per second of decode
time), end-to-end, and per stage its total time per run (the sum of its per-call times).
A row compares the centres of the two sides: the median of a run's repeats, or, with k ≥ 2
runs of one code version on a side (each its own process), the Hodges-Lehmann centre of their k
medians (:func:`~llm_perf_opt.report.noise_floor.log_centre`; the pooled repeats of the k runs are
that side of the tests below)::

    delta % = 100 · (centre(current) − centre(baseline)) / centre(baseline)
    worse % = delta %    for times (lower is better)
            = −delta %   for decode tokens/s (higher is better)

Verdict of a row (``warn`` and ``fail`` are the thresholds, in %):

* ``ok`` when |worse %| ≤ warn;
* otherwise ``noise`` when the change is within the row's noise floor (:mod:`.noise_floor`), else
  the change must also be significant: a two-sided Mann-Whitney U test of the two sides' repeats
  (``scipy.stats.mannwhitneyu``, exact for these sizes) with p ≤ ``ALPHA`` (0.05); ``noise``
  when p > ALPHA. Too few repeats can never reach that p (3 against 3: the smallest two-sided
  p is 0.1); then the sample ranges decide, as a cruder test: ``noise`` when [min, max] of the
  two sides overlap, and the job's notes say so (``profiling.repeats=5`` or more gives the test
  its power: 4 against 4 can reach p = 0.029). A side with a single repeat has no spread, so
  then the thresholds alone decide (and the notes say so);
* otherwise ``fail`` when worse % > fail, ``warn`` when worse % > warn, ``improved`` when
  worse % < −warn;
* ``n/a`` when the baseline centre is not positive (no relative change exists).

A verdict that the floor decided is marked ``noise (floor)`` or ``noise (min-ms)`` (the markdown
and JSON of :mod:`.compare_output` give each row's floor and its source).

Jobs of two sweeps are paired by identity (:class:`~llm_perf_opt.report.run_dirs.JobIdentity`);
two single runs are paired as given. A job that ran in the baseline but failed, was
interrupted or is missing in the current set fails the comparison. Runs on a different
device, model, mode, dtype, weights or batch size are refused unless forced, and so are
baseline runs that differ among themselves and a noise floor recorded for other runs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import mannwhitneyu

from llm_perf_opt.errors import UserError

from .noise_floor import (
    ALPHA,
    JobFloor,
    NoiseFloor,
    floor_notes,
    floor_pct,
    floor_width,
    job_floor,
    log_centre,
    noise_floor_name,
    pooled,
    row_alpha,
    run_spreads,
    within_floor,
)
from .record import RunRecord
from .run_dirs import Job, RunSet
from .run_figures import (
    HIGHER_IS_BETTER,
    OK_STATUS,
    describe_mismatches,
    field_mismatches,
    group_runs,
    mismatches,
    repeats,
    run_fields,
    sample_figures,
)

OK, NOISE, WARN, FAIL, IMPROVED, NOT_COMPARABLE = "ok", "noise", "warn", "fail", "improved", "n/a"
#: Verdict of a whole comparison.
PASSED, WARNED, FAILED = "PASS", "WARN", "FAIL"


@dataclass(frozen=True)
class Thresholds:
    """Percentages above which a figure that got worse is a warning or a failure, and the
    absolute floor in ms below which a change is noise (0: none)."""

    warn_pct: float = 5.0
    fail_pct: float = 10.0
    min_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warn_pct <= self.fail_pct:
            raise UserError(
                f"thresholds need 0 <= warn <= fail, got warn {self.warn_pct}%, fail {self.fail_pct}%"
            )
        if not self.min_ms >= 0:
            raise UserError(f"--min-ms must be >= 0, got {self.min_ms}")


@dataclass(frozen=True)
class Row:
    """One figure of one job: the per-repeat values of both sides and the verdict."""

    figure: str
    baseline: tuple[float, ...]
    current: tuple[float, ...]
    delta_pct: float | None
    verdict: str
    p_value: float | None = None  # the rank test's, where it could decide (see the module docstring)
    #: The baseline's centre (the median, or the robust centre of several runs' medians).
    baseline_centre: float | None = None
    #: The relative noise floor of this row, in %, and where its spread was measured.
    floor_pct: float | None = None
    floor_source: str | None = None
    #: BY_FLOOR or BY_MIN_MS where a floor made the row ``noise``.
    floor_decided: str | None = None
    #: The current side's centre where it has several runs (else its median is the centre).
    current_centre: float | None = None


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
    #: Every current run of the job (``current`` is the first of them).
    currents: tuple[Job, ...] = ()

    @property
    def verdict(self) -> str:
        verdicts = {row.verdict for row in self.rows}
        if self.problem_fails or FAIL in verdicts:
            return FAIL
        return WARN if WARN in verdicts else OK


@dataclass(frozen=True)
class Comparison:
    """All job results of comparing ``current`` (the first of ``currents``) against ``baseline``
    (the first of ``baselines``)."""

    baseline: RunSet
    current: RunSet
    thresholds: Thresholds
    jobs: tuple[JobResult, ...]
    #: Jobs left out by ``shared_only`` (only one side has them).
    left_out: tuple[str, ...] = ()
    baselines: tuple[RunSet, ...] = ()
    noise_floor: NoiseFloor | None = None
    currents: tuple[RunSet, ...] = ()

    @property
    def verdict(self) -> str:
        verdicts = {job.verdict for job in self.jobs}
        return FAILED if FAIL in verdicts else WARNED if WARN in verdicts else PASSED

    @property
    def failed(self) -> bool:
        return self.verdict == FAILED

    @property
    def uses_floor(self) -> bool:
        """Whether any row may have a floor: a floor file, several runs on a side or ``min_ms``."""
        return (
            self.noise_floor is not None
            or self.thresholds.min_ms > 0
            or any(len(job.baselines) > 1 or len(job.currents) > 1 for job in self.jobs)
        )


def judge(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    higher_is_better: bool,
    thresholds: Thresholds,
    floor_pct: float | None = None,
    baseline_centre: float | None = None,
    current_centre: float | None = None,
) -> tuple[float | None, str, float | None]:
    """Delta % of the centres, the verdict of one row and the rank test's p-value (None where
    it was not run or cannot decide; rules in the module docstring). ``baseline_centre`` and
    ``current_centre`` replace a side's median (several runs on that side); ``floor_pct`` is the
    row's relative noise floor (None: none)."""
    base = statistics.median(baseline) if baseline_centre is None else baseline_centre
    cur = statistics.median(current) if current_centre is None else current_centre
    if base <= 0:
        return None, NOT_COMPARABLE, None
    delta = 100 * (cur - base) / base
    worse = -delta if higher_is_better else delta
    if abs(worse) <= thresholds.warn_pct:
        return delta, OK, None
    if within_floor(
        base, cur, higher_is_better=higher_is_better, floor_pct=floor_pct, min_ms=thresholds.min_ms
    ):
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


def test_can_decide(n_baseline: int, n_current: int) -> bool:
    """Whether the two-sided rank test can reach ALPHA at these sizes: its smallest p-value
    (the two samples fully apart) is 2 / C(n1 + n2, n1)."""
    return 2 / math.comb(n_baseline + n_current, n_baseline) <= ALPHA


def pair_jobs(
    baselines: RunSet | Sequence[RunSet], currents: RunSet | Sequence[RunSet]
) -> list[tuple[tuple[Job, ...], tuple[Job, ...]]]:
    """Each job's baseline runs with its current runs (``()`` where a side lacks the job).
    Single runs pair as given; otherwise jobs pair by identity, baseline order first, then jobs
    only in the current sets (no baseline)."""
    baselines, currents = _as_tuple(baselines), _as_tuple(currents, "current")
    if not any(run_set.sweep for run_set in (*baselines, *currents)):
        return [(group_runs(baselines)[0], group_runs(currents)[0])]
    unpaired = {group[0].identity: group for group in group_runs(currents)}
    pairs: list[tuple[tuple[Job, ...], tuple[Job, ...]]] = [
        (group, unpaired.pop(group[0].identity, ())) for group in group_runs(baselines)
    ]
    return pairs + [((), group) for group in unpaired.values()]


def compare(
    baseline: RunSet | Sequence[RunSet],
    current: RunSet | Sequence[RunSet],
    thresholds: Thresholds,
    *,
    force: bool = False,
    shared_only: bool = False,
    noise_floor: NoiseFloor | None = None,
) -> Comparison:
    """Compare every pair of jobs (with ``shared_only``, only the jobs both sides have).
    ``baseline`` and ``current`` are each one run set or several runs of one code version (each
    its own process), whose spread gives a noise floor, as ``noise_floor`` does. Raises :class:`UserError` for
    runs that are not comparable (see :data:`~llm_perf_opt.report.run_figures.MATCHED_FIELDS`) unless
    ``force``."""
    baselines, currents = _as_tuple(baseline), _as_tuple(current, "current")
    pairs = pair_jobs(baselines, currents)
    left_out: tuple[str, ...] = ()
    if shared_only:
        left_out = tuple(str((b or c)[0].identity) for b, c in pairs if not b or not c)
        pairs = [(b, c) for b, c in pairs if b and c]
        if not pairs:
            raise UserError("--shared-only: the two sides have no job in common")
    sweep = any(run_set.sweep for run_set in (*baselines, *currents))
    floors = [job_floor(noise_floor, b, c[0] if c else None, single=not sweep) for b, c in pairs]
    differences = []
    for (group, cur_group), floor in zip(pairs, floors):
        where = f" {group[0].identity}" if sweep and group else ""
        diffs = [
            (f"{side} {b.path}: {describe_mismatches(d)}", d)
            for side, runs in (("baseline", group), ("current", cur_group))
            for b in runs[1:]
            if (d := mismatches(runs[0].record, b.record))
        ]
        if cur_group:
            cur = cur_group[0]
            diffs += [
                (describe_mismatches(d), d) for b in group[:1] if (d := mismatches(b.record, cur.record))
            ]
            if floor is not None and (d := field_mismatches(floor.fields, run_fields(cur.record))):
                diffs.append((f"noise floor {noise_floor_name(noise_floor)}: {describe_mismatches(d)}", d))
        if diffs and not force:
            what = "; ".join(text for text, _ in diffs)
            raise UserError(f"refusing to compare{where}: {what}; --force compares anyway")
        differences.append([text for text, _ in diffs])
    jobs = tuple(
        compare_jobs(b, c, thresholds, forced=diffs, floor=floor, floor_name=noise_floor_name(noise_floor))
        for (b, c), diffs, floor in zip(pairs, differences, floors)
    )
    return Comparison(baselines[0], currents[0], thresholds, jobs, left_out, baselines, noise_floor, currents)


def compare_jobs(
    baseline: Job | Sequence[Job] | None,
    current: Job | Sequence[Job] | None,
    thresholds: Thresholds,
    *,
    forced: Sequence[str] = (),
    floor: JobFloor | None = None,
    floor_name: str = "",
) -> JobResult:
    """Rows and notes of one job: its baseline runs against its current runs (each side one job
    or several runs of it, each its own process); either side may be absent."""
    group, currents = _jobs(baseline), _jobs(current)
    ok_runs = tuple(job for job in group if job.status == OK_STATUS)
    first = ok_runs[0] if ok_runs else group[0] if group else None
    current = currents[0] if currents else None
    label = str((first or current).identity)
    if first is None:
        return JobResult(
            label, None, current, problem="new job: no baseline to compare with", currents=currents
        )
    if current is None:
        return JobResult(
            label, first, None, problem="missing in current", problem_fails=bool(ok_runs), baselines=ok_runs
        )
    if failed := next((job for job in currents if job.status != OK_STATUS), None):
        return JobResult(
            label,
            first,
            failed,
            problem=f"current run {failed.status}: {failed.error}",
            problem_fails=bool(ok_runs),
            baselines=ok_runs,
            currents=currents,
        )
    if not ok_runs:
        return JobResult(
            label, first, current, problem=f"baseline run {first.status}: nothing to compare with"
        )

    per_run = [sample_figures(job.record) for job in ok_runs]
    base_spreads, base_medians = run_spreads(ok_runs, f"{len(ok_runs)} baseline runs")
    cur_spreads, cur_medians = run_spreads(currents, f"{len(currents)} current runs")
    cur_per_run = [sample_figures(job.record) for job in currents]
    cur_figures = cur_per_run[0]
    base_names = list(dict.fromkeys(figure for figures in per_run for figure in figures))
    shared = [figure for figure in base_names if figure in cur_figures]
    rows = []
    notes = [f"compared with --force: {text}" for text in forced]
    for figure in [*base_names, *(f for f in cur_figures if f not in base_names)]:
        if figure not in shared:
            notes.append(f"{figure}: only in {'baseline' if figure in base_names else 'current'}")
            continue
        pooled_repeats = [value for figures in per_run for value in figures.get(figure, [])]
        cur_repeats = [value for figures in cur_per_run for value in figures.get(figure, [])]
        medians, cur_run_medians = base_medians[figure], cur_medians.get(figure, ())
        centre = _centre(medians)
        cur_centre = _centre(cur_run_medians) if len(cur_run_medians) > 1 else None
        spread = pooled(
            floor.figures.get(figure) if floor else None, base_spreads.get(figure), cur_spreads.get(figure)
        )
        pct = (
            None
            if spread is None
            else floor_pct(
                spread,
                baseline_runs=len(medians),
                current_runs=len(currents),
                alpha=row_alpha(figure, shared),
            )
        )
        higher = figure in HIGHER_IS_BETTER
        delta, verdict, p = judge(
            pooled_repeats,
            cur_repeats,
            higher_is_better=higher,
            thresholds=thresholds,
            floor_pct=pct,
            baseline_centre=centre,
            current_centre=cur_centre,
        )
        decided = None
        if verdict == NOISE and p is None and centre > 0:
            decided = within_floor(
                centre,
                statistics.median(cur_repeats) if cur_centre is None else cur_centre,
                higher_is_better=higher,
                floor_pct=pct,
                min_ms=thresholds.min_ms,
            )
        rows.append(
            Row(
                figure,
                tuple(pooled_repeats),
                tuple(cur_repeats),
                delta,
                verdict,
                p,
                centre,
                pct,
                None if spread is None else spread.source,
                decided,
                cur_centre,
            )
        )
    notes += _sample_notes([job.record for job in ok_runs], [job.record for job in currents])
    notes += floor_notes(floor, floor_name, len(ok_runs), current.record)
    notes += _wide_floor_notes(rows, thresholds)
    if first.identity.overrides != current.identity.overrides:
        notes.append(
            f"different overrides: baseline {list(first.identity.overrides)}, "
            f"current {list(current.identity.overrides)}"
        )
    notes += _version_notes(first.record, current.record)
    return JobResult(label, first, current, tuple(rows), tuple(notes), baselines=ok_runs, currents=currents)


def _wide_floor_notes(rows: Sequence[Row], thresholds: Thresholds) -> list[str]:
    """Where a floor hides regressions the thresholds would catch, say so."""
    wide = [row for row in rows if row.floor_pct is not None and row.floor_pct > thresholds.fail_pct]
    if not wide:
        return []
    widest = max(wide, key=lambda row: row.floor_pct or 0)
    return [
        f"the noise floor is above the fail threshold ({thresholds.fail_pct:g}%) on {len(wide)} of {len(rows)} "
        f"figures (widest: {widest.figure} {floor_width(widest.floor_pct or 0)}): a smaller regression there "
        "cannot be told from the spread between runs"
    ]


def _centre(medians: Sequence[float]) -> float:
    """A side's centre: its one run's median, or the robust centre of several runs' medians."""
    return log_centre(medians) if len(medians) > 1 and min(medians) > 0 else statistics.median(medians)


def _jobs(side: Job | Sequence[Job] | None) -> tuple[Job, ...]:
    return () if side is None else (side,) if isinstance(side, Job) else tuple(side)


def _as_tuple(run_sets: RunSet | Sequence[RunSet], side: str = "baseline") -> tuple[RunSet, ...]:
    result = (run_sets,) if isinstance(run_sets, RunSet) else tuple(run_sets)
    if not result:
        raise UserError(f"no {side} to compare")
    return result


def _sample_notes(baselines: Sequence[RunRecord], currents: Sequence[RunRecord]) -> list[str]:
    n_base, n_cur = sum(repeats(r) for r in baselines), sum(repeats(r) for r in currents)
    single = [side for side, n in (("baseline", n_base), ("current", n_cur)) if n == 1]
    if single:
        return [
            f"{' and '.join(single)}: a single repeat has no spread, so the thresholds alone decide (no noise)"
        ]
    if n_base and n_cur and not test_can_decide(n_base, n_cur):
        smallest = 2 / math.comb(n_base + n_cur, n_base)
        return [
            f"{n_base} against {n_cur} repeats: the rank test cannot reach p <= {ALPHA} (smallest p "
            f"{smallest:.2g}), so overlapping [min, max] ranges decide; profiling.repeats=5 gives it power"
        ]
    return []


def _version_notes(baseline: RunRecord, current: RunRecord) -> list[str]:
    base, cur = (r.versions.to_dict() if r.versions else {} for r in (baseline, current))
    changed = [
        f"{name} {base.get(name)} → {cur.get(name)}"
        for name in sorted(base.keys() | cur.keys())
        if base.get(name) != cur.get(name)
    ]
    return [f"versions differ: {', '.join(changed)}"] if changed else []
