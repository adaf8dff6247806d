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
* otherwise ``noise`` when the sample ranges [min, max] of the two sides overlap: the change
  lies inside the spread of the repeats. A side with a single repeat has no spread, so then
  the thresholds alone decide (and the job's notes say so);
* otherwise ``fail`` when worse % > fail, ``warn`` when worse % > warn, ``improved`` when
  worse % < −warn;
* ``n/a`` when the baseline median is not positive (no relative change exists).

Jobs of two sweeps are paired by identity (:class:`~llm_perf_opt.report.run_dirs.JobIdentity`);
two single runs are paired as given. A job that ran in the baseline but failed, was
interrupted or is missing in the current set fails the comparison. Runs on a different
device, model, mode, dtype or weights are refused unless forced.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

    @property
    def verdict(self) -> str:
        verdicts = {job.verdict for job in self.jobs}
        return FAILED if FAIL in verdicts else WARNED if WARN in verdicts else PASSED

    @property
    def failed(self) -> bool:
        return self.verdict == FAILED


def judge(
    baseline: Sequence[float], current: Sequence[float], *, higher_is_better: bool, thresholds: Thresholds
) -> tuple[float | None, str]:
    """Delta % of the medians and the verdict of one row (rules in the module docstring)."""
    base, cur = statistics.median(baseline), statistics.median(current)
    if base <= 0:
        return None, NOT_COMPARABLE
    delta = 100 * (cur - base) / base
    worse = -delta if higher_is_better else delta
    if abs(worse) <= thresholds.warn_pct:
        return delta, OK
    if min(len(baseline), len(current)) >= 2 and max(min(baseline), min(current)) <= min(max(baseline), max(current)):
        return delta, NOISE
    if worse > thresholds.fail_pct:
        return delta, FAIL
    return delta, WARN if worse > 0 else IMPROVED


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


def compare(baseline: RunSet, current: RunSet, thresholds: Thresholds, *, force: bool = False) -> Comparison:
    """Compare every pair of jobs. Raises :class:`UserError` for runs that are not comparable
    (see :data:`MATCHED_FIELDS`) unless ``force``."""
    pairs = pair_jobs(baseline, current)
    differences = [mismatches(b.record, c.record) if b and c else [] for b, c in pairs]
    if not force:
        for (base, _), diffs in zip(pairs, differences):
            if diffs:
                where = f" {base.identity}" if baseline.sweep else ""
                raise UserError(f"refusing to compare{where}: {_describe(diffs)}; --force compares anyway")
    jobs = tuple(compare_jobs(b, c, thresholds, forced=diffs) for (b, c), diffs in zip(pairs, differences))
    return Comparison(baseline, current, thresholds, jobs)


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
        delta, verdict = judge(
            base_figures[figure], cur_figures[figure],
            higher_is_better=figure in HIGHER_IS_BETTER, thresholds=thresholds,
        )
        rows.append(Row(figure, tuple(base_figures[figure]), tuple(cur_figures[figure]), delta, verdict))
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
    if not single:
        return []
    return [f"{' and '.join(single)}: a single repeat has no spread, so the thresholds alone decide (no noise)"]


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
        f"−{t.fail_pct:g}%); a change inside the [min, max] spread of the repeats of both sides is noise.",
    ]
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
            "| figure | baseline median [min, max] | current median [min, max] | delta | verdict |",
            "|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| {_cell(row.figure)} | {_spread(row.baseline)} | {_spread(row.current)} | "
            f"{'-' if row.delta_pct is None else f'{row.delta_pct:+.1f}%'} | "
            f"{f'**{row.verdict}**' if row.verdict in (FAIL, WARN) else row.verdict} |"
            for row in job.rows
        ]
        if job.notes:
            lines += ["", *(f"- {_cell(note)}" for note in job.notes)]
    return "\n".join(lines) + "\n"


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
