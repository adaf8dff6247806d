"""A comparison (:mod:`.compare`) as Markdown for a CI job summary and as data for ``--json-out``.

Both give each row's noise floor (:mod:`.noise_floor`) and its source, and mark a verdict that
the floor decided (``noise (floor)``, ``noise (min-ms)``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .compare import FAIL, FAILED, PASSED, WARN, Comparison, Row, Thresholds
from .noise_floor import ALPHA, floor_width, noise_floor_name
from .run_figures import repeats, run_fields


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
            "medians (several runs on a side or a noise-floor file); a side of several runs is centred on "
            "their medians' Hodges-Lehmann centre"
            + (f", and at least {t.min_ms:g} ms" if t.min_ms > 0 else "")
            + "."
        )
    if comparison.left_out:
        lines += [
            "",
            f"--shared-only left out {len(comparison.left_out)} job(s) only one side has: "
            + ", ".join(f"`{_cell(label)}`" for label in comparison.left_out),
        ]
    for job in comparison.jobs:
        lines += ["", f"### {_cell(job.label)}: {job.verdict}", ""]
        run = (job.current or job.baseline).record
        fields = run_fields(run)
        if job.problem is not None:
            lines.append(f"- {_cell(job.problem)}")
            continue
        runs, cur_runs = len(job.baselines), len(job.currents)
        base_repeats = "+".join(str(repeats(b.record)) for b in job.baselines)
        cur_repeats = "+".join(str(repeats(c.record)) for c in job.currents)
        lines += [
            f"{fields['device']} · {fields['dtype']} · weights {fields['weights']} · batch {fields['batch']} · "
            f"repeats {base_repeats} baseline{f' ({runs} runs)' if runs > 1 else ''}, "
            f"{cur_repeats} current{f' ({cur_runs} runs)' if cur_runs > 1 else ''}",
            "",
            f"| figure | baseline {'centre' if runs > 1 else 'median'} [min, max] "
            f"| current {'centre' if cur_runs > 1 else 'median'} [min, max] "
            "| delta | p |" + (" floor |" if floors else "") + " verdict |",
            "|---|---:|---:|---:|---:|" + ("---|" if floors else "") + "---|",
        ]
        lines += [
            f"| {_cell(row.figure)} | {_spread(row.baseline, row.baseline_centre)} | {_spread(row.current, row.current_centre)} | "
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
        "currents": [str(c.path) for c in comparison.currents or (comparison.current,)],
        "thresholds": {
            "warn_pct": t.warn_pct,
            "fail_pct": t.fail_pct,
            "alpha": ALPHA,
            "min_ms": t.min_ms,
            "test": "two-sided Mann-Whitney U on the repeats",
            "floor": "ln(1 + floor_pct/100) = t(1 - a, dof) * log_sd * sqrt(v_kb/k_b + v_kc/k_c), "
            "v_k = 1 for k <= 2 runs, pi/3 from 3",
        },
        "noise_floor_file": None if floor is None else noise_floor_name(floor),
        "left_out": list(comparison.left_out),
        "jobs": [
            {
                "label": job.label,
                "verdict": job.verdict,
                "problem": job.problem,
                "baseline_runs": [str(b.path) for b in job.baselines],
                "current_runs": [str(c.path) for c in job.currents],
                "notes": list(job.notes),
                "rows": [
                    {
                        "figure": row.figure,
                        "baseline_median": _centre(row.baseline, row.baseline_centre),
                        "current_median": _centre(row.current, row.current_centre),
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
    currents = comparison.currents or (comparison.current,)
    base = ", ".join(f"`{b.path}`" for b in baselines)
    cur = ", ".join(f"`{c.path}`" for c in currents)
    floor = comparison.noise_floor
    return (
        f"Baseline{'s' if len(baselines) > 1 else ''} {base}, current{' runs' if len(currents) > 1 else ''} {cur}"
        + (f", noise floor `{noise_floor_name(floor)}`" if floor is not None else "")
        + "."
    )


def _floor_text(row: Row, thresholds: Thresholds) -> str:
    parts = []
    if row.floor_pct is not None:
        parts.append(f"{floor_width(row.floor_pct)} ({row.floor_source})")
    if thresholds.min_ms > 0:
        parts.append(f"{thresholds.min_ms:g} ms")
    return "; ".join(parts) or "-"


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


def _centre(values: Sequence[float], centre: float | None) -> float:
    return statistics.median(values) if centre is None else centre


def _spread(values: Sequence[float], centre: float | None = None) -> str:
    """``centre [min, max]`` (centre: the median unless given), all with the decimals that suit
    the centre (about 4 significant digits)."""
    median = _centre(values, centre)
    decimals = 1 if abs(median) >= 100 else 2 if abs(median) >= 1 else 3
    return f"{median:.{decimals}f} [{min(values):.{decimals}f}, {max(values):.{decimals}f}]"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table row (and on one line)."""
    return " ".join(str(text).split()).replace("|", "\\|")
