"""Compare a run or sweep against a baseline: headline and per-stage deltas with a noise-aware verdict.

Each side of a row is the list of per-repeat values of one figure (``timing.samples`` of
run.json): TTFT, TPOT, decode tokens/s (``1000 / TPOT``: decode steps per second of decode
time), end-to-end, and per stage its total time per run (the sum of its per-call times).
A row compares the medians of the two sides::

    delta % = 100 · (median(current) − median(baseline)) / median(baseline)
    worse % = delta %    for times (lower is better)
            = −delta %   for decode tokens/s (higher is better)

Verdict of a row (``warn`` and ``fail`` are the thresholds, in %):

* ``ok`` when |worse %| ≤ warn;
* otherwise the change must also be significant: a two-sided Mann-Whitney U test of the two
  sides' repeats (``scipy.stats.mannwhitneyu``, exact for these sizes) with p ≤ ``ALPHA``
  (0.05); ``noise`` when p > ALPHA. Too few repeats can never reach that p (3 against 3: the
  smallest two-sided p is 0.1); then the sample ranges decide, as a cruder test: ``noise`` when
  [min, max] of the two sides overlap, and the job's notes say so (``profiling.repeats=5`` or
  more gives the test its power: 4 against 4 can reach p = 0.029). A side with a single repeat
  has no spread, so then the thresholds alone decide (and the notes say so);
* otherwise ``fail`` when worse % > fail, ``warn`` when worse % > warn, ``improved`` when
  worse % < −warn;
* ``n/a`` when the baseline median is not positive (no relative change exists).

Jobs of two sweeps are paired by identity (:class:`~llm_perf_opt.report.run_dirs.JobIdentity`);
two single runs are paired as given. A job that ran in the baseline but failed, was
interrupted or is missing in the current set fails the comparison. Runs on a different
device, model, mode, dtype or weights are refused unless forced.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import mannwhitneyu

from llm_perf_opt.errors import UserError

from .run_dirs import Job, RunSet, mode_name, model_name

OK, NOISE, WARN, FAIL, IMPROVED, NOT_COMPARABLE = "ok", "noise", "warn", "fail", "improved", "n/a"
#: Verdict of a whole comparison.
PASSED, WARNED, FAILED = "PASS", "WARN", "FAIL"

TTFT, TPOT, DECODE_TPS, E2E = "TTFT (ms)", "TPOT (ms)", "decode tokens/s", "end-to-end (ms)"
HIGHER_IS_BETTER = frozenset({DECODE_TPS})

#: Fields that must match for two runs to be comparable, in the order they are checked.
MATCHED_FIELDS = ("device", "model", "mode", "dtype", "weights")

_OK_STATUS = "ok"
#: Largest p-value of the rank test at which a change counts as significant.
ALPHA = 0.05


@dataclass(frozen=True)
class Thresholds:
    """Percentages above which a figure that got worse is a warning or a failure."""

    warn_pct: float = 5.0
    fail_pct: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.warn_pct <= self.fail_pct:
            raise UserError(f"thresholds need 0 <= warn <= fail, got warn {self.warn_pct}%, fail {self.fail_pct}%")


@dataclass(frozen=True)
class Row:
    """One figure of one job: the per-repeat values of both sides and the verdict."""

    figure: str
    baseline: tuple[float, ...]
    current: tuple[float, ...]
    delta_pct: float | None
    verdict: str
    p_value: float | None = None  # the rank test's, where it could decide (see the module docstring)


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

    @property
    def verdict(self) -> str:
        verdicts = {row.verdict for row in self.rows}
        if self.problem_fails or FAIL in verdicts:
            return FAIL
        return WARN if WARN in verdicts else OK


@dataclass(frozen=True)
class Comparison:
    """All job results of comparing ``current`` against ``baseline``."""

    baseline: RunSet
    current: RunSet
    thresholds: Thresholds
    jobs: tuple[JobResult, ...]
    #: Jobs left out by ``shared_only`` (only one side has them).
    left_out: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        verdicts = {job.verdict for job in self.jobs}
        return FAILED if FAIL in verdicts else WARNED if WARN in verdicts else PASSED

    @property
    def failed(self) -> bool:
        return self.verdict == FAILED


def judge(
    baseline: Sequence[float], current: Sequence[float], *, higher_is_better: bool, thresholds: Thresholds
) -> tuple[float | None, str, float | None]:
    """Delta % of the medians, the verdict of one row and the rank test's p-value (None where
    it was not run or cannot decide; rules in the module docstring)."""
    base, cur = statistics.median(baseline), statistics.median(current)
    if base <= 0:
        return None, NOT_COMPARABLE, None
    delta = 100 * (cur - base) / base
    worse = -delta if higher_is_better else delta
    if abs(worse) <= thresholds.warn_pct:
        return delta, OK, None
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


def run_fields(record: dict[str, Any]) -> dict[str, str | None]:
    """The fields of :data:`MATCHED_FIELDS`, as resolved for the run; a run that failed before
    its settings were resolved lacks device, dtype and weights (``None``)."""
    return {
        "device": (record.get("device") or {}).get("name"),
        "model": model_name(record),
        "mode": mode_name(record),
        "dtype": record.get("dtype"),
        "weights": record.get("weights"),
    }


def mismatches(baseline: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, baseline value, current value)`` for each matched field known on both sides that differs."""
    base, cur = run_fields(baseline), run_fields(current)
    return [
        (name, base[name], cur[name])
        for name in MATCHED_FIELDS
        if base[name] is not None and cur[name] is not None and base[name] != cur[name]
    ]


def pair_jobs(baseline: RunSet, current: RunSet) -> list[tuple[Job | None, Job | None]]:
    """Two single runs pair as given; otherwise jobs pair by identity, baseline order first,
    then jobs only in the current set."""
    if not baseline.sweep and not current.sweep:
        return [(baseline.jobs[0], current.jobs[0])]
    unpaired = {job.identity: job for job in current.jobs}
    pairs: list[tuple[Job | None, Job | None]] = [(job, unpaired.pop(job.identity, None)) for job in baseline.jobs]
    return pairs + [(None, job) for job in unpaired.values()]


def compare(
    baseline: RunSet, current: RunSet, thresholds: Thresholds, *, force: bool = False, shared_only: bool = False
) -> Comparison:
    """Compare every pair of jobs (with ``shared_only``, only the jobs both sides have). Raises
    :class:`UserError` for runs that are not comparable (see :data:`MATCHED_FIELDS`) unless
    ``force``."""
    pairs = pair_jobs(baseline, current)
    left_out: tuple[str, ...] = ()
    if shared_only:
        left_out = tuple(str((b or c).identity) for b, c in pairs if b is None or c is None)
        pairs = [(b, c) for b, c in pairs if b is not None and c is not None]
        if not pairs:
            raise UserError("--shared-only: the two sides have no job in common")
    differences = [mismatches(b.record, c.record) if b and c else [] for b, c in pairs]
    if not force:
        for (base, _), diffs in zip(pairs, differences):
            if diffs:
                where = f" {base.identity}" if baseline.sweep else ""
                raise UserError(f"refusing to compare{where}: {_describe(diffs)}; --force compares anyway")
    jobs = tuple(compare_jobs(b, c, thresholds, forced=diffs) for (b, c), diffs in zip(pairs, differences))
    return Comparison(baseline, current, thresholds, jobs, left_out)


def compare_jobs(
    baseline: Job | None, current: Job | None, thresholds: Thresholds, *, forced: Sequence[tuple[str, Any, Any]] = ()
) -> JobResult:
    """Rows and notes of one pair; either side may be absent."""
    label = str((baseline or current).identity)
    if baseline is None:
        return JobResult(label, None, current, problem="new job: no baseline to compare with")
    if current is None:
        return JobResult(
            label, baseline, None, problem="missing in current", problem_fails=baseline.status == _OK_STATUS
        )
    if current.status != _OK_STATUS:
        return JobResult(
            label, baseline, current,
            problem=f"current run {current.status}: {current.error}",
            problem_fails=baseline.status == _OK_STATUS,
        )
    if baseline.status != _OK_STATUS:
        return JobResult(label, baseline, current, problem=f"baseline run {baseline.status}: nothing to compare with")

    base_figures, cur_figures = sample_figures(baseline.record), sample_figures(current.record)
    rows = []
    notes = [f"compared with --force: {_describe(forced)}"] if forced else []
    for figure in [*base_figures, *(f for f in cur_figures if f not in base_figures)]:
        if figure not in cur_figures or figure not in base_figures:
            notes.append(f"{figure}: only in {'baseline' if figure in base_figures else 'current'}")
            continue
        delta, verdict, p = judge(
            base_figures[figure], cur_figures[figure],
            higher_is_better=figure in HIGHER_IS_BETTER, thresholds=thresholds,
        )
        rows.append(Row(figure, tuple(base_figures[figure]), tuple(cur_figures[figure]), delta, verdict, p))
    notes += _sample_notes(baseline.record, current.record)
    if baseline.identity.overrides != current.identity.overrides:
        notes.append(
            f"different overrides: baseline {list(baseline.identity.overrides)}, "
            f"current {list(current.identity.overrides)}"
        )
    notes += _version_notes(baseline.record, current.record)
    return JobResult(label, baseline, current, tuple(rows), tuple(notes))


def _sample_notes(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    single = [side for side, r in (("baseline", baseline), ("current", current)) if _repeats(r) == 1]
    if single:
        return [f"{' and '.join(single)}: a single repeat has no spread, so the thresholds alone decide (no noise)"]
    n_base, n_cur = _repeats(baseline), _repeats(current)
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
    """The comparison as Markdown for a CI job summary: a one-line verdict, then a table per job."""
    t = comparison.thresholds
    lines = [
        _headline(comparison),
        "",
        f"Baseline `{comparison.baseline.path}`, current `{comparison.current.path}`. Medians of the repeats; "
        f"warn above +{t.warn_pct:g}%, fail above +{t.fail_pct:g}% (decode tokens/s: below −{t.warn_pct:g}% / "
        f"−{t.fail_pct:g}%); a change beyond a threshold counts only if significant (two-sided Mann-Whitney U "
        f"on the repeats, p ≤ {ALPHA:g}; too few repeats for the test: the [min, max] ranges must not overlap), "
        "else it is noise.",
    ]
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
        lines += [
            f"{fields['device']} · {fields['dtype']} · weights {fields['weights']} · "
            f"repeats {_repeats(job.baseline.record)} baseline, {_repeats(job.current.record)} current",
            "",
            "| figure | baseline median [min, max] | current median [min, max] | delta | p | verdict |",
            "|---|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {_cell(row.figure)} | {_spread(row.baseline)} | {_spread(row.current)} | "
            f"{'-' if row.delta_pct is None else f'{row.delta_pct:+.1f}%'} | "
            f"{'-' if row.p_value is None else f'{row.p_value:.2g}'} | "
            f"{f'**{row.verdict}**' if row.verdict in (FAIL, WARN) else row.verdict} |"
            for row in job.rows
        ]
        if job.notes:
            lines += ["", *(f"- {_cell(note)}" for note in job.notes)]
    return "\n".join(lines) + "\n"


def to_dict(comparison: Comparison) -> dict[str, Any]:
    """The comparison as data (``--json-out``): the verdict, the rules and every row."""
    t = comparison.thresholds
    return {
        "verdict": comparison.verdict,
        "baseline": str(comparison.baseline.path),
        "current": str(comparison.current.path),
        "thresholds": {"warn_pct": t.warn_pct, "fail_pct": t.fail_pct, "alpha": ALPHA,
                       "test": "two-sided Mann-Whitney U on the repeats"},  # fmt: skip
        "left_out": list(comparison.left_out),
        "jobs": [
            {
                "label": job.label,
                "verdict": job.verdict,
                "problem": job.problem,
                "notes": list(job.notes),
                "rows": [
                    {
                        "figure": row.figure,
                        "baseline_median": statistics.median(row.baseline),
                        "current_median": statistics.median(row.current),
                        "baseline": list(row.baseline),
                        "current": list(row.current),
                        "delta_pct": row.delta_pct,
                        "p_value": row.p_value,
                        "verdict": row.verdict,
                    }
                    for row in job.rows
                ],
            }
            for job in comparison.jobs
        ],
    }


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


def _spread(values: Sequence[float]) -> str:
    """``median [min, max]``, all with the decimals that suit the median (about 4 significant digits)."""
    median = statistics.median(values)
    decimals = 1 if abs(median) >= 100 else 2 if abs(median) >= 1 else 3
    return f"{median:.{decimals}f} [{min(values):.{decimals}f}, {max(values):.{decimals}f}]"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table row (and on one line)."""
    return " ".join(str(text).split()).replace("|", "\\|")
