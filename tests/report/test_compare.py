"""`python -m llm_perf_opt.compare`: verdicts, refusals and sweep pairing on hand-built run.json files.

Every run built here has three repeats whose figures are a base value times 0.99, 1.00 and
1.01 (so each side spans ±1% around its median) unless a test says otherwise. Base values:
stages preprocess 10, sam 100, clip 20, projector 1, prefill 50 ms; decode 4 steps of 5 ms
(20 ms per run, TPOT 5 ms, 200 tokens/s); TTFT 181, end-to-end 201 ms.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from llm_perf_opt.compare import main
from llm_perf_opt.errors import UserError
from llm_perf_opt.report.compare import FAIL, IMPROVED, NOISE, OK, WARN, Thresholds, compare, judge
from llm_perf_opt.report.noise_floor import (
    Spread,
    floor_pct,
    load_noise_floor,
    log_centre,
    log_spread,
    pooled,
    row_alpha,
)
from llm_perf_opt.report.run_dirs import load_run_set
from llm_perf_opt.report.run_figures import DECODE_TPS, stage_figure

SPREAD = (0.99, 1.00, 1.01)
STAGE_MS = {"preprocess": 10.0, "sam": 100.0, "clip": 20.0, "projector": 1.0, "prefill": 50.0}
DECODE_STEP_MS = 5.0
DECODE_STEPS = 4
DEFAULT = Thresholds(5.0, 10.0)


def make_record(
    *,
    factors: tuple[float, ...] = SPREAD,
    model: str = "deepseek_ocr_tiny",
    mode: str = "tiny",
    device: str = "NVIDIA H100 80GB HBM3",
    dtype: str = "bfloat16",
    status: str = "ok",
) -> dict:
    samples = []
    for f in factors:
        stages = {name: [ms * f] for name, ms in STAGE_MS.items()}
        stages["decode"] = [DECODE_STEP_MS * f] * DECODE_STEPS
        samples.append(
            {
                "stages": stages,
                "ttft_ms": 181.0 * f,
                "tpot_ms": DECODE_STEP_MS * f,
                "e2e_ms": 201.0 * f,
            }
        )
    return {
        "schema_version": 1,
        "status": status,
        "error": None if status == "ok" else "CUDA out of memory",
        "config": {"model": {"name": model, "weights": "dummy"}, "mode": {"name": mode}, "dtype": dtype},
        "versions": {"torch": "2.13.0", "llm_perf_opt": "0.1.0"},
        "device": {"type": "cuda", "name": device},
        "dtype": dtype,
        "weights": "dummy",
        "timing": {"unit": "ms", "samples": samples if status == "ok" else []},
    }


def write_run(directory: Path, record: dict, overrides: tuple[str, ...] = ()) -> Path:
    """A job dir as `python -m llm_perf_opt.run` leaves it: run.json and .hydra/overrides.yaml."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps(record))
    (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return directory


def scale_stage(record: dict, stage: str, factor: float) -> dict:
    slowed = copy.deepcopy(record)
    for sample in slowed["timing"]["samples"]:
        sample["stages"][stage] = [ms * factor for ms in sample["stages"][stage]]
    return slowed


def rows(comparison, job: int = 0) -> dict:
    return {row.figure: row for row in comparison.jobs[job].rows}


def test_a_run_against_itself_passes(tmp_path, capsys):
    run = write_run(tmp_path / "run", make_record())
    assert main([str(run), str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**PASS**")
    comparison = compare(load_run_set(run), load_run_set(run), DEFAULT)
    assert {row.verdict for row in comparison.jobs[0].rows} == {OK}
    # 4 headline rows + 6 stages
    assert len(comparison.jobs[0].rows) == 10


def test_a_stage_slowed_by_20_percent_fails_and_is_named(tmp_path, capsys):
    base = make_record()
    baseline = write_run(tmp_path / "base", base)
    current = write_run(tmp_path / "cur", scale_stage(base, "sam", 1.2))
    out_file = tmp_path / "summary.md"
    assert main([str(baseline), str(current), "--markdown-out", str(out_file)]) == 1
    out = capsys.readouterr().out
    # sam: baseline [99, 100, 101], current [118.8, 120, 121.2]: median +20%, ranges apart.
    headline = out.splitlines()[0]
    assert headline.startswith("**FAIL**") and "sam (ms) +20.0%" in headline
    assert "| sam (ms) | 100.0 [99.0, 101.0] | 120.0 [118.8, 121.2] | +20.0% | - | **fail** |" in out
    assert "| projector (ms) | 1.00 [0.99, 1.01] | 1.00 [0.99, 1.01] | +0.0% | - | ok |" in out
    assert out_file.read_text() == out
    comparison = compare(load_run_set(baseline), load_run_set(current), DEFAULT)
    verdicts = {figure: row.verdict for figure, row in rows(comparison).items()}
    assert verdicts.pop(stage_figure("sam")) == FAIL
    assert set(verdicts.values()) == {OK}


def test_plus_7_percent_is_a_warning(tmp_path):
    base = make_record()
    comparison = compare(
        load_run_set(write_run(tmp_path / "base", base)),
        load_run_set(write_run(tmp_path / "cur", scale_stage(base, "clip", 1.07))),
        DEFAULT,
    )
    # clip: [19.8, 20, 20.2] -> [21.186, 21.4, 21.614]: +7%, ranges apart, 5 < 7 <= 10.
    row = rows(comparison)[stage_figure("clip")]
    assert row.delta_pct == pytest.approx(7.0)
    assert row.verdict == WARN
    assert comparison.verdict == "WARN" and not comparison.failed


def test_overlapping_ranges_are_noise_even_beyond_the_fail_threshold():
    # 3 against 3 repeats: the rank test cannot reach p <= 0.05, so the ranges decide. Baseline 90..110 (median 100), current 105..118 (median 112): +12% > 10%, but 105..110
    # lies inside both spreads.
    assert judge([90, 100, 110], [105, 112, 118], higher_is_better=False, thresholds=DEFAULT)[:2] == (
        pytest.approx(12.0),
        NOISE,
    )
    # Same medians with tight spreads (99..101 vs 111..113): no overlap, a failure.
    assert judge([99, 100, 101], [111, 112, 113], higher_is_better=False, thresholds=DEFAULT)[1] == FAIL


def test_noise_in_a_whole_run(tmp_path):
    wide = make_record(factors=(0.9, 1.0, 1.1))
    current = copy.deepcopy(wide)
    for sample, new in zip(current["timing"]["samples"], (52.5, 56.0, 59.0)):
        sample["stages"]["prefill"] = [new]
    comparison = compare(
        load_run_set(write_run(tmp_path / "base", wide)),
        load_run_set(write_run(tmp_path / "cur", current)),
        DEFAULT,
    )
    # prefill: baseline [45, 50, 55], current [52.5, 56, 59]: +12%, overlapping.
    row = rows(comparison)[stage_figure("prefill")]
    assert row.delta_pct == pytest.approx(12.0)
    assert row.verdict == NOISE
    assert not comparison.failed


def test_a_single_repeat_has_no_spread_so_thresholds_decide(tmp_path):
    base = make_record(factors=(1.0,))
    comparison = compare(
        load_run_set(write_run(tmp_path / "base", base)),
        load_run_set(write_run(tmp_path / "cur", scale_stage(base, "sam", 1.12))),
        DEFAULT,
    )
    assert rows(comparison)[stage_figure("sam")].verdict == FAIL
    assert any("single repeat" in note for note in comparison.jobs[0].notes)


def test_decode_tokens_per_s_dropping_is_a_regression(tmp_path):
    base = make_record()
    slow = copy.deepcopy(base)
    for sample in slow["timing"]["samples"]:
        sample["tpot_ms"] *= 1.25
    comparison = compare(
        load_run_set(write_run(tmp_path / "base", base)),
        load_run_set(write_run(tmp_path / "cur", slow)),
        DEFAULT,
    )
    # TPOT 5 ms -> 6.25 ms: 1000/5 = 200 -> 1000/6.25 = 160 tokens/s, delta -20%.
    row = rows(comparison)[DECODE_TPS]
    assert row.delta_pct == pytest.approx(-20.0)
    assert row.verdict == FAIL
    # The other direction is an improvement, not a regression.
    assert judge([99, 100, 101], [119, 120, 121], higher_is_better=True, thresholds=DEFAULT)[:2] == (
        pytest.approx(20.0),
        IMPROVED,
    )


def test_a_faster_stage_is_improved(tmp_path):
    base = make_record()
    comparison = compare(
        load_run_set(write_run(tmp_path / "base", base)),
        load_run_set(write_run(tmp_path / "cur", scale_stage(base, "sam", 0.8))),
        DEFAULT,
    )
    assert rows(comparison)[stage_figure("sam")].verdict == IMPROVED
    assert not comparison.failed


def test_different_hardware_is_refused_unless_forced(tmp_path, capsys):
    baseline = write_run(tmp_path / "base", make_record())
    current = write_run(tmp_path / "cur", make_record(device="NVIDIA H200"))
    assert main([str(baseline), str(current)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "device differs" in err and "'NVIDIA H100 80GB HBM3'" in err and "'NVIDIA H200'" in err
    assert main([str(baseline), str(current), "--force"]) == 0
    assert "compared with --force: device differs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "changed"),
    [("model", {"model": "deepseek_ocr"}), ("mode", {"mode": "base"}), ("dtype", {"dtype": "float16"})],
)
def test_each_matched_field_is_checked(tmp_path, field, changed):
    baseline = load_run_set(write_run(tmp_path / "base", make_record()))
    current = load_run_set(write_run(tmp_path / "cur", make_record(**changed)))
    with pytest.raises(UserError, match=f"{field} differs"):
        compare(baseline, current, DEFAULT)


def test_mode_under_the_model_config_is_accepted(tmp_path):
    record = make_record()
    del record["config"]["mode"]
    record["config"]["model"]["mode"] = {"name": "tiny"}
    moved = load_run_set(write_run(tmp_path / "moved", record))
    assert moved.jobs[0].identity.mode == "tiny"
    other = load_run_set(write_run(tmp_path / "base", make_record(mode="base")))
    with pytest.raises(UserError, match="mode differs .*'base'.*'tiny'"):
        compare(other, moved, DEFAULT)


def _sweep(root: Path, jobs: list[tuple[str, dict, tuple[str, ...]]]) -> Path:
    for name, record, overrides in jobs:
        write_run(root / name, record, overrides)
    return root


def test_sweeps_pair_jobs_by_identity_not_by_order(tmp_path):
    tiny, small = make_record(mode="tiny"), make_record(mode="small")
    baseline = _sweep(
        tmp_path / "base",
        [
            ("0_deepseek_ocr_tiny_tiny", tiny, ("model=deepseek_ocr_tiny", "mode=tiny", "max_new_tokens=16")),
            ("1_deepseek_ocr_tiny_tiny", tiny, ("model=deepseek_ocr_tiny", "mode=tiny", "max_new_tokens=32")),
            (
                "2_deepseek_ocr_tiny_small",
                small,
                ("model=deepseek_ocr_tiny", "mode=small", "max_new_tokens=16"),
            ),
        ],
    )
    # Launched in another order, into another sweep dir; only (small, 16 tokens) got slower.
    current = _sweep(
        tmp_path / "cur",
        [
            (
                "0_deepseek_ocr_tiny_small",
                scale_stage(small, "sam", 1.2),
                (
                    "model=deepseek_ocr_tiny",
                    "mode=small",
                    "max_new_tokens=16",
                    f"hydra.sweep.dir={tmp_path / 'cur'}",
                ),
            ),
            ("1_deepseek_ocr_tiny_tiny", tiny, ("model=deepseek_ocr_tiny", "mode=tiny", "max_new_tokens=32")),
            ("2_deepseek_ocr_tiny_tiny", tiny, ("mode=tiny", "max_new_tokens=16")),
        ],
    )
    comparison = compare(load_run_set(baseline), load_run_set(current), DEFAULT)
    verdicts = {job.label: job.verdict for job in comparison.jobs}
    assert verdicts == {
        "deepseek_ocr_tiny · tiny · max_new_tokens=16": OK,
        "deepseek_ocr_tiny · tiny · max_new_tokens=32": OK,
        "deepseek_ocr_tiny · small · max_new_tokens=16": FAIL,
    }
    pairs = [(job.baseline.path.parent.name, job.current.path.parent.name) for job in comparison.jobs]
    assert pairs == [
        ("0_deepseek_ocr_tiny_tiny", "2_deepseek_ocr_tiny_tiny"),
        ("1_deepseek_ocr_tiny_tiny", "1_deepseek_ocr_tiny_tiny"),
        ("2_deepseek_ocr_tiny_small", "0_deepseek_ocr_tiny_small"),
    ]


def test_a_job_missing_or_failed_in_current_fails(tmp_path, capsys):
    tiny, small, base = make_record(mode="tiny"), make_record(mode="small"), make_record(mode="base")
    baseline = _sweep(
        tmp_path / "base",
        [
            ("0_m_tiny", tiny, ("mode=tiny",)),
            ("1_m_small", small, ("mode=small",)),
            ("2_m_base", base, ("mode=base",)),
        ],
    )
    current = _sweep(
        tmp_path / "cur",
        [
            ("0_m_tiny", tiny, ("mode=tiny",)),
            ("1_m_small", make_record(mode="small", status="failed"), ("mode=small",)),
        ],
    )
    assert main([str(baseline), str(current)]) == 1
    out = capsys.readouterr().out
    headline = out.splitlines()[0]
    assert "small: current run failed: CUDA out of memory" in headline
    assert "base: missing in current" in headline
    assert "deepseek_ocr_tiny · tiny" not in headline


def test_a_job_dir_without_run_json_is_reported_missing(tmp_path):
    baseline = _sweep(tmp_path / "base", [("0_m_tiny", make_record(), ())])
    killed = tmp_path / "cur" / "0_m_tiny" / ".hydra"
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text("model:\n  name: deepseek_ocr_tiny\nmode:\n  name: tiny\n")
    (killed / "overrides.yaml").write_text("[]\n")
    comparison = compare(load_run_set(baseline), load_run_set(tmp_path / "cur"), DEFAULT)
    job = comparison.jobs[0]
    assert job.verdict == FAIL and "current run missing" in job.problem


def test_a_new_job_or_a_failed_baseline_is_not_a_regression(tmp_path):
    baseline = _sweep(tmp_path / "base", [("0_m_tiny", make_record(status="failed"), ("mode=tiny",))])
    current = _sweep(
        tmp_path / "cur",
        [
            ("0_m_tiny", make_record(), ("mode=tiny",)),
            ("1_m_small", make_record(mode="small"), ("mode=small",)),
        ],
    )
    comparison = compare(load_run_set(baseline), load_run_set(current), DEFAULT)
    assert [job.verdict for job in comparison.jobs] == [OK, OK]
    assert [job.problem for job in comparison.jobs] == [
        "baseline run failed: nothing to compare with",
        "new job: no baseline to compare with",
    ]


def test_a_run_json_file_can_be_given_directly(tmp_path):
    run = write_run(tmp_path / "run", make_record())
    assert main([str(run / "run.json"), str(run)]) == 0


@pytest.mark.parametrize(
    ("content", "message"), [("{not json", "not valid JSON"), ('{"rows": []}', "no status field")]
)
def test_a_bad_run_json_is_one_line(tmp_path, capsys, content, message):
    good = write_run(tmp_path / "good", make_record())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text(content)
    assert main([str(good), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_nothing_to_compare_and_bad_thresholds_are_user_errors(tmp_path, capsys):
    good = write_run(tmp_path / "good", make_record())
    (tmp_path / "empty").mkdir()
    assert main([str(good), str(tmp_path / "empty")]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert main([str(good), str(good), "--warn", "12", "--fail", "10"]) == 2
    assert "warn <= fail" in capsys.readouterr().err


def lognormal_samples(rng, n: int, median: float, sigma: float = 0.05) -> list[float]:
    return list(median * np.exp(rng.normal(0.0, sigma, n)))


def test_identical_distributions_give_no_warning_in_95_percent_of_seeds():
    """Two sides drawn from one distribution (median 100, 5 % log-normal noise, n = 5): a warning
    needs a median change above 5 % and a rank test at p <= 0.05, which chance gives rarely."""
    warned = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        verdict = judge(
            lognormal_samples(rng, 5, 100),
            lognormal_samples(rng, 5, 100),
            higher_is_better=False,
            thresholds=DEFAULT,
        )[1]
        warned += verdict in (WARN, FAIL)
    assert warned <= 10  # <= 5 % of 200


def test_a_20_percent_slowdown_with_5_repeats_is_detected():
    detected = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        verdict = judge(
            lognormal_samples(rng, 5, 100),
            lognormal_samples(rng, 5, 120),
            higher_is_better=False,
            thresholds=DEFAULT,
        )[1]
        detected += verdict in (WARN, FAIL)
    assert detected >= 190


def test_the_rank_test_decides_with_enough_repeats():
    # 5 against 5, fully apart: U = 0, exact two-sided p = 2 / C(10, 5) = 2 / 252.
    delta, verdict, p = judge(
        [99, 100, 100.5, 101, 102], [111, 112, 113, 114, 115], higher_is_better=False, thresholds=DEFAULT
    )
    assert (verdict, p) == (FAIL, pytest.approx(2 / 252))
    # Interleaved repeats: a large median change, but not a significant one.
    assert (
        judge([90, 120, 95, 125, 100], [105, 130, 110, 135, 112], higher_is_better=False, thresholds=DEFAULT)[
            1
        ]
        == NOISE
    )


def test_too_few_repeats_for_the_test_are_said(tmp_path):
    base = make_record()  # 3 repeats
    comparison = compare(
        load_run_set(write_run(tmp_path / "base", base)),
        load_run_set(write_run(tmp_path / "cur", scale_stage(base, "sam", 1.3))),
        DEFAULT,
    )
    assert any("cannot reach p <= 0.05" in note for note in comparison.jobs[0].notes)


def test_json_out_holds_every_row(tmp_path):
    base = make_record()
    out = tmp_path / "cmp.json"
    status = main(
        [
            str(write_run(tmp_path / "base", base)),
            str(write_run(tmp_path / "cur", scale_stage(base, "sam", 1.3))),
            "--json-out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert status == 1 and data["verdict"] == "FAIL"
    sam = next(r for r in data["jobs"][0]["rows"] if r["figure"] == stage_figure("sam"))
    assert sam["verdict"] == FAIL and sam["delta_pct"] == pytest.approx(30.0)
    assert len(sam["baseline"]) == len(sam["current"]) == 3


def test_shared_only_compares_the_jobs_both_sides_have(tmp_path, capsys):
    tiny, small = make_record(mode="tiny"), make_record(mode="small")
    baseline = _sweep(
        tmp_path / "base", [("0_m_tiny", tiny, ("mode=tiny",)), ("1_m_small", small, ("mode=small",))]
    )
    current = _sweep(tmp_path / "cur", [("0_m_tiny", tiny, ("mode=tiny",))])
    assert main([str(baseline), str(current)]) == 1  # small is missing: a failure by default
    capsys.readouterr()
    assert main([str(baseline), str(current), "--shared-only"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**PASS**: no regression in 1 job(s)")
    assert "--shared-only left out 1 job(s)" in out and "small" in out
    lonely = _sweep(tmp_path / "other", [("0_m_base", make_record(mode="base"), ("mode=base",))])
    with pytest.raises(UserError, match="no job in common"):
        compare(load_run_set(baseline), load_run_set(lonely), DEFAULT, shared_only=True)


# Noise floor: the between-process spread of identical code, which a change must exceed.
# Eleven runs of one code version whose process factors are exp(0.005 k), k = −5 … 5 (the first
# one exp(−0.025) = 0.9753): the pairwise distances of ln(medians) are 0.005 j, j = 1 … 10, each
# 11 − j times; the 28th of the 55 is 0.02, so the robust spread is s = 1.0483 · 0.02 / (1 + 0.5 /
# 11) = 0.020054 with 0.7 · 10 = 7 degrees of freedom, and the Hodges-Lehmann centre is exp(0):
# the base values themselves. Of the job's 0.05, end-to-end gets 0.025 alone: Student t at 0.975
# is 2.365 (t tables); each of the 9 other figures gets 0.025 / 9: t at 0.99722 is 3.947 (between
# the tables' 3.499 at 0.995 and 4.029 at 0.9975). Floors for a run against the 11 runs' centre:
# exp(2.365 · s · √(1 + (π / 3) / 11)) − 1 = 5.09 % (end-to-end) and 8.64 % (the others); for one
# run against another run: exp(2.365 · s · √2) − 1 = 6.94 % and exp(3.947 · s · √2) − 1 = 11.84 %.
PROCESS_FACTORS = tuple(float(np.exp(0.005 * k)) for k in range(-5, 6))
LOG_SD_11 = 1.0483 * 0.02 / (1 + 0.5 / 11)
LOG_SD_10 = 0.02 * (10 / 9) ** 0.5


def scaled(factor: float) -> dict:
    """A run of one process that landed ``factor`` away on every figure."""
    return make_record(factors=tuple(factor * s for s in SPREAD))


def runs_of_one_version(root: Path) -> list[Path]:
    return [
        _sweep(root / f"cal_{i}", [("0_m_tiny", scaled(f), ("max_new_tokens=8",))])
        for i, f in enumerate(PROCESS_FACTORS)
    ]


def test_floor_quantiles_match_closed_forms_and_tables():
    # 1 degree of freedom: Student t is Cauchy, quantile tan(π (q − 1/2)).
    q = 1 - 0.05 / (2 * 10)
    assert floor_pct(Spread(0.01, 1, "x"), baseline_runs=1, alpha=1 - q) == pytest.approx(
        100 * np.expm1(np.tan(np.pi * (q - 0.5)) * 0.01 * np.sqrt(2))
    )
    # 9 degrees of freedom, one-tailed 0.0025: 3.690 in t tables; against the Hodges-Lehmann centre
    # of 10 runs, whose variance is (π / 3) s² / 10: exp(3.690 · s · √(1 + π / 30)) − 1.
    assert floor_pct(Spread(LOG_SD_10, 9, "x"), baseline_runs=10, alpha=0.0025) == pytest.approx(
        8.52, abs=0.01
    )
    assert floor_pct(Spread(LOG_SD_10, 9, "x"), baseline_runs=1, alpha=0.0025) == pytest.approx(
        11.63, abs=0.01
    )
    # Many degrees of freedom, one figure: the normal quantile 1.960.
    assert floor_pct(Spread(0.01, 10**6, "x"), baseline_runs=10**9, alpha=0.025) == pytest.approx(
        100 * np.expm1(1.960 * 0.01), rel=1e-3
    )


def test_pooled_spreads_weigh_by_degrees_of_freedom():
    # Variances 0.01² (dof 9) and 0.04² (dof 1): (9 · 1e-4 + 16e-4) / 10 = 2.5e-4.
    both = pooled(Spread(0.01, 9, "file"), None, Spread(0.04, 1, "2 baseline runs"))
    assert (both.log_sd, both.dof, both.source) == (
        pytest.approx(0.025**0.5 / 10),
        10,
        "file + 2 baseline runs",
    )
    assert pooled(None) is None


def test_a_change_within_the_floor_is_noise_beyond_it_fails():
    base = [99, 99.5, 100, 100.5, 101]
    plus_7 = [107 * f for f in (0.99, 0.995, 1.0, 1.005, 1.01)]
    # Fully apart (p = 2/252): a warning on the rank test alone, noise within an 8 % floor.
    assert judge(base, plus_7, higher_is_better=False, thresholds=DEFAULT)[1:] == (
        WARN,
        pytest.approx(2 / 252),
    )
    assert judge(base, plus_7, higher_is_better=False, thresholds=DEFAULT, floor_pct=8.0)[1:] == (NOISE, None)
    plus_20 = [120 * f for f in (0.99, 0.995, 1.0, 1.005, 1.01)]
    assert judge(base, plus_20, higher_is_better=False, thresholds=DEFAULT, floor_pct=8.0)[1] == FAIL
    # The floor is symmetric in ln: −7 % (ln 0.93 = −0.073) is within ln 1.08 = 0.077.
    minus_7 = [93 * f for f in (0.99, 0.995, 1.0, 1.005, 1.01)]
    assert judge(base, minus_7, higher_is_better=False, thresholds=DEFAULT, floor_pct=8.0)[1] == NOISE
    assert judge(base, minus_7, higher_is_better=False, thresholds=DEFAULT)[1] == IMPROVED


def test_an_absolute_floor_in_ms_for_short_stages_and_the_step_time_of_tokens_per_s():
    # clip 2.5 -> 3.1 ms: +24 %, fully apart, but 0.6 ms.
    clip_base = [2.48, 2.49, 2.50, 2.51, 2.52]
    clip_cur = [3.08, 3.09, 3.10, 3.11, 3.12]
    assert judge(clip_base, clip_cur, higher_is_better=False, thresholds=DEFAULT)[1] == FAIL
    assert judge(clip_base, clip_cur, higher_is_better=False, thresholds=Thresholds(5, 10, 1.0))[1] == NOISE
    assert judge(clip_base, clip_cur, higher_is_better=False, thresholds=Thresholds(5, 10, 0.5))[1] == FAIL
    # 200 -> 185.19 tokens/s (−7.4 %) is a step time of 5 -> 5.4 ms: 0.4 ms.
    tps_base = [1e3 / ms for ms in (4.98, 4.99, 5.0, 5.01, 5.02)]
    tps_cur = [1e3 / ms for ms in (5.38, 5.39, 5.4, 5.41, 5.42)]
    assert judge(tps_base, tps_cur, higher_is_better=True, thresholds=Thresholds(5, 10, 0.5))[1] == NOISE
    assert judge(tps_base, tps_cur, higher_is_better=True, thresholds=Thresholds(5, 10, 0.3))[1] == WARN


def test_several_baseline_runs_give_the_floor(tmp_path, capsys):
    cal = runs_of_one_version(tmp_path)
    shifted = _sweep(tmp_path / "cur", [("0_m_tiny", scaled(1.07), ("max_new_tokens=8",))])
    # Against the first run alone (factor 0.975): +9.7 %, ranges apart: a warning.
    assert main([str(cal[0]), str(shifted)]) == 0
    assert capsys.readouterr().out.startswith("**WARN**")
    # Against all eleven: +7 % from their centre, within the stages' 8.64 % floor but beyond
    # end-to-end's 5.09 %, with the ranges apart: a warning on end-to-end alone.
    json_out = tmp_path / "cmp.json"
    assert main([*map(str, cal), str(shifted), "--json-out", str(json_out)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**WARN**: deepseek_ocr_tiny · tiny · max_new_tokens=8: end-to-end (ms) +7.0%\n")
    assert (
        "| sam (ms) | 100.0 [96.6, 103.6] | 107.0 [105.9, 108.1] | +7.0% | - | ±8.6% (11 baseline runs, robust) "
        "| noise (floor) |" in out
    )
    assert "repeats 3+3+3+3+3+3+3+3+3+3+3 baseline (11 runs), 3 current" in out
    figures = {r["figure"]: r for r in json.loads(json_out.read_text())["jobs"][0]["rows"]}
    sam, e2e = figures["sam (ms)"], figures["end-to-end (ms)"]
    assert (sam["floor_pct"], sam["floor_source"], sam["floor_decided"]) == (
        pytest.approx(8.64, abs=0.01),
        "11 baseline runs, robust",
        "floor",
    )
    assert (e2e["floor_pct"], e2e["verdict"]) == (pytest.approx(5.09, abs=0.01), WARN)
    assert sam["baseline_median"] == pytest.approx(100.0)
    # +20 % is beyond it.
    slow = _sweep(tmp_path / "slow", [("0_m_tiny", scaled(1.2), ("max_new_tokens=8",))])
    assert main([*map(str, cal), str(slow)]) == 1
    assert "| sam (ms) | 100.0 [96.6, 103.6] | 120.0 [118.8, 121.2] | +20.0% |" in capsys.readouterr().out


def test_a_recorded_noise_floor_judges_one_run_against_another(tmp_path, capsys):
    cal = runs_of_one_version(tmp_path)
    floor_file = tmp_path / "noise_floor.json"
    assert (
        main([*map(str, cal), str(cal[0]), "--noise-floor-out", str(floor_file)]) == 2
    )  # CURRENT is a BASELINE
    assert "also one of the BASELINEs" in capsys.readouterr().err and not floor_file.exists()
    extra = _sweep(tmp_path / "extra", [("0_m_tiny", scaled(1.0), ("max_new_tokens=8",))])
    assert main([*map(str, cal), str(extra), "--noise-floor-out", str(floor_file)]) == 0
    capsys.readouterr()
    floor = load_noise_floor(floor_file)
    (job,) = floor.jobs.values()
    assert (job.runs, job.repeats, job.fields["mode"], job.fields["batch"]) == (11, 3, "tiny", 1)
    assert job.figures["sam (ms)"].log_sd == pytest.approx(LOG_SD_11)
    assert job.figures["sam (ms)"].dof == pytest.approx(7)

    baseline = cal[0]  # factor exp(−0.025)
    shifted = _sweep(tmp_path / "cur", [("0_m_tiny", scaled(1.04), ("max_new_tokens=8",))])
    # ln 1.04 + 0.025 = 0.064 < ln 1.0694 = 0.067 (end-to-end's floor, the narrowest): noise
    # with the floor, a warning without.
    assert main([str(baseline), str(shifted)]) == 0
    assert capsys.readouterr().out.startswith("**WARN**")
    assert main([str(baseline), str(shifted), "--noise-floor", str(floor_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**PASS**") and "±11.8% (floor file, 11 runs) | noise (floor) |" in out
    assert "±6.9% (floor file, 11 runs) | noise (floor) |" in out
    assert "the noise floor is above the fail threshold (10%) on 9 of 10 figures" in out
    # ln(1.2 / 0.9753) = 0.207: beyond it.
    slow = _sweep(tmp_path / "slow", [("0_m_tiny", scaled(1.2), ("max_new_tokens=8",))])
    assert main([str(baseline), str(slow), "--noise-floor", str(floor_file)]) == 1
    assert "sam (ms) +23.0%" in capsys.readouterr().out.splitlines()[0]
    # A floor recorded for another job leaves the rows without one, and says so.
    other = _sweep(tmp_path / "other", [("0_m_tiny", scaled(1.0), ("max_new_tokens=16",))])
    assert main([str(other), str(other), "--noise-floor", str(floor_file)]) == 0
    assert "no noise floor recorded for this job" in capsys.readouterr().out


def test_a_noise_floor_of_other_hardware_or_a_bad_file_is_refused(tmp_path, capsys):
    cal = runs_of_one_version(tmp_path)
    floor_file = tmp_path / "noise_floor.json"
    assert main([*map(str, cal[:3]), str(cal[3]), "--noise-floor-out", str(floor_file)]) == 0
    capsys.readouterr()
    h200 = make_record(device="NVIDIA H200")
    base = _sweep(tmp_path / "h200a", [("0_m_tiny", h200, ("max_new_tokens=8",))])
    cur = _sweep(tmp_path / "h200b", [("0_m_tiny", h200, ("max_new_tokens=8",))])
    assert main([str(base), str(cur), "--noise-floor", str(floor_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "noise floor" in err and "device differs" in err
    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    assert main([str(base), str(cur), "--noise-floor", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a noise-floor file" in err


def test_baselines_given_twice_or_a_floor_from_one_run_are_user_errors(tmp_path, capsys):
    run = write_run(tmp_path / "run", make_record())
    other = write_run(tmp_path / "other", make_record())
    assert main([str(run), str(run), str(other)]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main([str(run), str(other), "--noise-floor-out", str(tmp_path / "f.json")]) == 2
    assert "needs 2 or more BASELINEs" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_baseline_runs_that_differ_among_themselves_are_refused(tmp_path):
    small = load_run_set(write_run(tmp_path / "a", make_record()))
    other_dtype = load_run_set(write_run(tmp_path / "b", make_record(dtype="float32")))
    current = load_run_set(write_run(tmp_path / "c", make_record()))
    with pytest.raises(UserError, match="baseline .*dtype differs"):
        compare([small, other_dtype], current, DEFAULT)


def test_a_different_batch_size_is_refused_and_a_missing_one_is_1(tmp_path):
    plain = load_run_set(write_run(tmp_path / "plain", make_record()))
    one, four = make_record(), make_record()
    one["batch"], four["batch"] = {"size": 1}, {"size": 4}
    with pytest.raises(UserError, match=r"batch differs \(baseline 1, current 4\)"):
        compare(plain, load_run_set(write_run(tmp_path / "four", four)), DEFAULT)
    assert compare(plain, load_run_set(write_run(tmp_path / "one", one)), DEFAULT).verdict == "PASS"


def _job_flagged(rng, *, between: float, shift: float, floor: bool, figures: int = 10) -> bool:
    """One job of ``figures`` independent figures, each a process's 5 repeats: median 100 ms
    times the process's log-normal factor (``between``), 1 % log-normal noise per repeat. Ten
    calibration processes give each figure's spread; a baseline process and a current one
    (``shift`` slower) are compared. Whether any figure warns or fails."""
    # Axes: figure, process (10 calibration, baseline, current), repeat.
    logs = rng.normal(0, between, (figures, 12, 1)) + rng.normal(0, 0.01, (figures, 12, 5))
    logs[:, 11] += np.log1p(shift)
    runs = 100 * np.exp(logs)
    log_sd = np.std(np.log(np.median(runs[:, :10], axis=2)), axis=1, ddof=1)
    for figure in range(figures):
        pct = floor_pct(
            Spread(float(log_sd[figure]), 9, "calibration"), baseline_runs=1, alpha=0.05 / figures
        )
        verdict = judge(
            list(runs[figure, 10]),
            list(runs[figure, 11]),
            higher_is_better=False,
            thresholds=DEFAULT,
            floor_pct=pct if floor else None,
        )[1]
        if verdict in (WARN, FAIL):
            return True
    return False


def test_between_process_noise_passes_a_whole_job_with_the_floor():
    """Identical code, 4 % between processes and 1 % within: the rank test alone warns on most
    jobs of 10 figures. The floor is a one-sided prediction bound at 0.05 / 10 per figure, so at most about
    5 % of jobs warn (binomial over 1000 jobs: 6.5 % is 2.3 standard deviations above 5 %)."""
    rng = np.random.default_rng(18)
    without = sum(_job_flagged(rng, between=0.04, shift=0.0, floor=False) for _ in range(200))
    assert without >= 150
    with_floor = sum(_job_flagged(rng, between=0.04, shift=0.0, floor=True) for _ in range(1000))
    assert with_floor <= 65


def test_a_20_percent_slowdown_beyond_a_2_percent_process_spread_is_detected():
    """Every figure 20 % slower, 2 % between processes: the floor of one run against another is
    about 3.25 · 2 % · √2 ≈ 9.6 %, so nearly every job fails."""
    rng = np.random.default_rng(20)
    detected = sum(_job_flagged(rng, between=0.02, shift=0.2, floor=True) for _ in range(200))
    assert detected >= 195


def test_the_floor_levels_give_end_to_end_half_the_job_alpha_and_sum_to_it():
    names = ["TTFT (ms)", "TPOT (ms)", "end-to-end (ms)", "sam (ms)", "clip (ms)"]
    assert row_alpha("end-to-end (ms)", names) == pytest.approx(0.025)
    assert row_alpha("sam (ms)", names) == pytest.approx(0.025 / 4)
    assert sum(row_alpha(name, names) for name in names) == pytest.approx(0.05)
    # Without an end-to-end row, the rows share 0.05 evenly.
    assert row_alpha("sam (ms)", names[3:]) == pytest.approx(0.025)
    # 5 calibration runs (dof 4): end-to-end's one-sided quantile t(0.975, 4) = 2.776 (t tables),
    # where the two-sided bound at 0.05 / 10 for each of 10 rows was t(0.9975, 4) = 5.598.
    spread = Spread(0.03, 4, "x")
    assert floor_pct(spread, baseline_runs=1, alpha=0.025) == pytest.approx(
        100 * np.expm1(2.776 * 0.03 * np.sqrt(2)), abs=0.02
    )
    assert floor_pct(spread, baseline_runs=1, alpha=0.0025) == pytest.approx(
        100 * np.expm1(5.598 * 0.03 * np.sqrt(2)), abs=0.02
    )


def test_the_spread_of_five_runs_or_more_is_robust_to_one_slow_process():
    # Below 5 runs: the sample standard deviation of ln, n − 1 degrees of freedom.
    four = log_spread([1.0, np.exp(0.01), np.exp(0.02), np.exp(0.03)], "4 runs")
    assert (four.log_sd, four.dof, four.source) == (pytest.approx(0.01 * (5 / 3) ** 0.5), 3, "4 runs")
    # ln = 0, 0.01, …, 0.04: the 10 pairwise distances are 0.01 ×4, 0.02 ×3, 0.03 ×2, 0.04; their
    # median 0.02, so s = 1.0483 · 0.02 / 1.1 with 0.7 · 4 degrees of freedom.
    even = log_spread([np.exp(0.01 * k) for k in range(5)], "5 runs")
    assert (even.log_sd, even.dof, even.source) == (
        pytest.approx(1.0483 * 0.02 / 1.1),
        pytest.approx(2.8),
        "5 runs, robust",
    )
    # One process twice as slow (ln 2 = 0.69): distances 0.01 ×3, 0.02 ×2, 0.03, then 0.67-0.70;
    # the median (0.02 + 0.03) / 2 moves the spread by a quarter, where the standard deviation
    # grows 24-fold (0.308 against 0.0129 for the four).
    slow = [1.0, np.exp(0.01), np.exp(0.02), np.exp(0.03), 2.0 * np.exp(0.01)]
    assert log_spread(slow, "x").log_sd == pytest.approx(1.0483 * 0.025 / 1.1)
    assert np.std(np.log(slow), ddof=1) > 10 * log_spread(slow, "x").log_sd


def test_the_centre_of_several_runs_is_robust_to_one_slow_process():
    # ln = 0 ×4 and ln 2: of the 15 pairwise means, 10 are 0, 4 are ln 2 / 2, one ln 2: median 0.
    assert log_centre([1.0, 1.0, 1.0, 1.0, 2.0]) == pytest.approx(1.0)
    # One run: itself; two: their geometric mean.
    assert log_centre([3.0]) == pytest.approx(3.0)
    assert log_centre([1.0, 4.0]) == pytest.approx(2.0)


def test_several_current_runs_narrow_the_floor():
    # Normal quantile 1.960 at dof → ∞; 5 runs a side, each centre with variance (π / 3) s² / 5.
    spread = Spread(0.02, 10**6, "x")
    assert floor_pct(spread, baseline_runs=5, current_runs=5, alpha=0.025) == pytest.approx(
        100 * np.expm1(1.960 * 0.02 * np.sqrt(2 * np.pi / 15)), rel=1e-3
    )
    # One current run against a single baseline run: √2.
    assert floor_pct(spread, baseline_runs=1, alpha=0.025) == pytest.approx(
        100 * np.expm1(1.960 * 0.02 * np.sqrt(2)), rel=1e-3
    )


def _runs(root: Path, name: str, factors: Sequence[float]) -> list[Path]:
    return [
        _sweep(root / f"{name}_{i}", [("0_m_tiny", scaled(f), ("max_new_tokens=8",))])
        for i, f in enumerate(factors)
    ]


def test_five_current_runs_pass_one_slow_process_and_fail_a_20_percent_slowdown(tmp_path, capsys):
    base = _runs(tmp_path, "base", [np.exp(0.005 * k) for k in range(-2, 3)])
    # Identical code, but the last process ran twice as slow as a whole: the robust centre of the
    # five is that of the other four's ln = −0.01, −0.005, 0, 0.005 (the 8th of 15 pairwise means: 0).
    current_factors = [np.exp(0.005 * k) for k in range(-2, 2)] + [2 * np.exp(0.01)]
    current = _runs(tmp_path, "cur", current_factors)
    json_out = tmp_path / "cmp.json"
    assert main([*map(str, base), "--current", *map(str, current), "--json-out", str(json_out)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**PASS**")
    assert "repeats 3+3+3+3+3 baseline (5 runs), 3+3+3+3+3 current (5 runs)" in out
    rows = {r["figure"]: r for r in json.loads(json_out.read_text())["jobs"][0]["rows"]}
    assert rows["sam (ms)"]["current_median"] == pytest.approx(100.0)
    assert rows["sam (ms)"]["floor_source"] == "5 baseline runs, robust + 5 current runs, robust"
    # The same five processes 20 % slower: beyond every floor (a few %), on every figure.
    slowed = _runs(tmp_path, "slow", [1.2 * f for f in current_factors])
    assert main([*map(str, base), "--current", *map(str, slowed), "--json-out", str(json_out)]) == 1
    rows = json.loads(json_out.read_text())["jobs"][0]["rows"]
    assert {r["verdict"] for r in rows} == {FAIL}
    assert rows[0]["delta_pct"] == pytest.approx(20.0)
    # A baseline alone, without a current run, is one line.
    with pytest.raises(SystemExit) as exit_info:
        main([str(base[0])])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: give a BASELINE and a CURRENT (or the CURRENTs with --current)\n"
    )
    # One current run among the baselines is refused as on the baseline side.
    assert main([*map(str, base), "--current", str(base[0]), str(current[0])]) == 2
    assert "also one of the BASELINEs" in capsys.readouterr().err


# Stage times of a synthetic job; end-to-end is their sum per repeat.
JOB_STAGES_MS = {
    "preprocess": 10.0,
    "sam": 100.0,
    "clip": 20.0,
    "projector": 1.0,
    "prefill": 50.0,
    "decode": 20.0,
}


def _gate(rng, *, shift: float, calibration: int = 5, split: bool = True) -> tuple[bool, bool]:
    """One job judged as compare judges it with a recorded floor: ``calibration`` processes give
    each figure's spread, then a baseline process against a current one ``shift`` slower on
    every stage. Each process lands exp(N(0, 2 %)) away as a whole and exp(N(0, 3 %)) on each
    stage, each of its 5 repeats 1 % more. ``split``: end-to-end gets half the job's alpha
    (row_alpha), else every row the same two-sided share (the rule before). Whether any row
    fails, and any warns or fails."""
    processes = calibration + 2
    logs = (
        rng.normal(0, 0.02, (processes, 1, 1))
        + rng.normal(0, 0.03, (processes, 1, len(JOB_STAGES_MS)))
        + rng.normal(0, 0.01, (processes, 5, len(JOB_STAGES_MS)))
    )
    logs[-1] += np.log1p(shift)
    stages = np.array(list(JOB_STAGES_MS.values())) * np.exp(logs)  # process, repeat, stage
    figures = {stage_figure(name): stages[:, :, i] for i, name in enumerate(JOB_STAGES_MS)}
    figures["end-to-end (ms)"] = stages.sum(axis=2)
    names = list(figures)
    failed = flagged = False
    for name, values in figures.items():
        log_sd = float(np.std(np.log(np.median(values[:calibration], axis=1)), ddof=1))
        alpha = row_alpha(name, names) if split else 0.05 / (2 * len(names))
        pct = floor_pct(Spread(log_sd, calibration - 1, "calibration"), baseline_runs=1, alpha=alpha)
        verdict = judge(
            list(values[-2]), list(values[-1]), higher_is_better=False, thresholds=DEFAULT, floor_pct=pct
        )[1]
        failed |= verdict == FAIL
        flagged |= verdict in (WARN, FAIL)
    return failed, flagged


def test_a_20_percent_slowdown_is_caught_with_5_calibration_runs():
    """Every stage 20 % slower: end-to-end spreads about 2.6 % between processes, so its floor
    from 5 runs is near 2.78 · 2.6 % · √2 ≈ 11 % and the job fails in nearly every draw (292 of
    300 with this seed). The rule before (t = 5.6 on every row) let about one in six pass."""
    rng = np.random.default_rng(30)
    caught = sum(_gate(rng, shift=0.2)[0] for _ in range(300))
    caught_before = sum(_gate(rng, shift=0.2, split=False)[0] for _ in range(300))
    assert caught >= 285, caught
    assert caught_before <= 260, caught_before


def test_identical_code_still_passes_a_whole_job_with_5_calibration_runs():
    """The levels sum to 0.05 per job: at most about 5 % of identical jobs warn (binomial over
    1000 jobs: 6.5 % is 2.2 standard deviations above 5 %)."""
    rng = np.random.default_rng(31)
    warned = sum(_gate(rng, shift=0.0)[1] for _ in range(1000))
    assert warned <= 65, warned
