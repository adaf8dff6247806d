"""`python -m llm_perf_opt.compare`: verdicts, refusals and sweep pairing on hand-built run.json files.

Every run built here has three repeats whose figures are a base value times 0.99, 1.00 and
1.01 (so each side spans ±1% around its median) unless a test says otherwise. Base values:
stages preprocess 10, sam 100, clip 20, projector 1, prefill 50 ms; decode 4 steps of 5 ms
(20 ms per run, TPOT 5 ms, 200 tokens/s); TTFT 181, end-to-end 201 ms.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from llm_perf_opt.compare import main
from llm_perf_opt.errors import UserError
from llm_perf_opt.report.compare import (
    DECODE_TPS,
    FAIL,
    IMPROVED,
    NOISE,
    OK,
    WARN,
    Thresholds,
    compare,
    judge,
    stage_figure,
)
from llm_perf_opt.report.run_dirs import load_run_set

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
        samples.append({
            "stages": stages,
            "ttft_ms": 181.0 * f,
            "tpot_ms": DECODE_STEP_MS * f,
            "e2e_ms": 201.0 * f,
        })
    return {
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
        pytest.approx(12.0), NOISE
    )
    # Same medians with tight spreads (99..101 vs 111..113): no overlap, a failure.
    assert judge([99, 100, 101], [111, 112, 113], higher_is_better=False, thresholds=DEFAULT)[1] == FAIL


def test_noise_in_a_whole_run(tmp_path):
    wide = make_record(factors=(0.9, 1.0, 1.1))
    current = copy.deepcopy(wide)
    for sample, new in zip(current["timing"]["samples"], (52.5, 56.0, 59.0)):
        sample["stages"]["prefill"] = [new]
    comparison = compare(
        load_run_set(write_run(tmp_path / "base", wide)), load_run_set(write_run(tmp_path / "cur", current)), DEFAULT
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
        load_run_set(write_run(tmp_path / "base", base)), load_run_set(write_run(tmp_path / "cur", slow)), DEFAULT
    )
    # TPOT 5 ms -> 6.25 ms: 1000/5 = 200 -> 1000/6.25 = 160 tokens/s, delta -20%.
    row = rows(comparison)[DECODE_TPS]
    assert row.delta_pct == pytest.approx(-20.0)
    assert row.verdict == FAIL
    # The other direction is an improvement, not a regression.
    assert judge([99, 100, 101], [119, 120, 121], higher_is_better=True, thresholds=DEFAULT)[:2] == (
        pytest.approx(20.0), IMPROVED
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
    baseline = _sweep(tmp_path / "base", [
        ("0_deepseek_ocr_tiny_tiny", tiny, ("model=deepseek_ocr_tiny", "mode=tiny", "max_new_tokens=16")),
        ("1_deepseek_ocr_tiny_tiny", tiny, ("model=deepseek_ocr_tiny", "mode=tiny", "max_new_tokens=32")),
        ("2_deepseek_ocr_tiny_small", small, ("model=deepseek_ocr_tiny", "mode=small", "max_new_tokens=16")),
    ])
    # Launched in another order, into another sweep dir; only (small, 16 tokens) got slower.
    current = _sweep(tmp_path / "cur", [
        ("0_deepseek_ocr_tiny_small", scale_stage(small, "sam", 1.2),
         ("model=deepseek_ocr_tiny", "mode=small", "max_new_tokens=16", f"hydra.sweep.dir={tmp_path / 'cur'}")),
        ("1_deepseek_ocr_tiny_tiny", tiny, ("model=deepseek_ocr_tiny", "mode=tiny", "max_new_tokens=32")),
        ("2_deepseek_ocr_tiny_tiny", tiny, ("mode=tiny", "max_new_tokens=16")),
    ])
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
    baseline = _sweep(tmp_path / "base", [
        ("0_m_tiny", tiny, ("mode=tiny",)), ("1_m_small", small, ("mode=small",)), ("2_m_base", base, ("mode=base",)),
    ])
    current = _sweep(tmp_path / "cur", [
        ("0_m_tiny", tiny, ("mode=tiny",)), ("1_m_small", make_record(mode="small", status="failed"), ("mode=small",)),
    ])
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
    current = _sweep(tmp_path / "cur", [
        ("0_m_tiny", make_record(), ("mode=tiny",)), ("1_m_small", make_record(mode="small"), ("mode=small",)),
    ])
    comparison = compare(load_run_set(baseline), load_run_set(current), DEFAULT)
    assert [job.verdict for job in comparison.jobs] == [OK, OK]
    assert [job.problem for job in comparison.jobs] == [
        "baseline run failed: nothing to compare with", "new job: no baseline to compare with",
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
        verdict = judge(lognormal_samples(rng, 5, 100), lognormal_samples(rng, 5, 100),
                        higher_is_better=False, thresholds=DEFAULT)[1]  # fmt: skip
        warned += verdict in (WARN, FAIL)
    assert warned <= 10  # <= 5 % of 200


def test_a_20_percent_slowdown_with_5_repeats_is_detected():
    detected = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        verdict = judge(lognormal_samples(rng, 5, 100), lognormal_samples(rng, 5, 120),
                        higher_is_better=False, thresholds=DEFAULT)[1]  # fmt: skip
        detected += verdict in (WARN, FAIL)
    assert detected >= 190


def test_the_rank_test_decides_with_enough_repeats():
    # 5 against 5, fully apart: U = 0, exact two-sided p = 2 / C(10, 5) = 2 / 252.
    delta, verdict, p = judge([99, 100, 100.5, 101, 102], [111, 112, 113, 114, 115],
                              higher_is_better=False, thresholds=DEFAULT)  # fmt: skip
    assert (verdict, p) == (FAIL, pytest.approx(2 / 252))
    # Interleaved repeats: a large median change, but not a significant one.
    assert judge([90, 120, 95, 125, 100], [105, 130, 110, 135, 112], higher_is_better=False,
                 thresholds=DEFAULT)[1] == NOISE  # fmt: skip


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
    status = main([str(write_run(tmp_path / "base", base)),
                       str(write_run(tmp_path / "cur", scale_stage(base, "sam", 1.3))), "--json-out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert status == 1 and data["verdict"] == "FAIL"
    sam = next(r for r in data["jobs"][0]["rows"] if r["figure"] == stage_figure("sam"))
    assert sam["verdict"] == FAIL and sam["delta_pct"] == pytest.approx(30.0)
    assert len(sam["baseline"]) == len(sam["current"]) == 3


def test_shared_only_compares_the_jobs_both_sides_have(tmp_path, capsys):
    tiny, small = make_record(mode="tiny"), make_record(mode="small")
    baseline = _sweep(tmp_path / "base", [("0_m_tiny", tiny, ("mode=tiny",)), ("1_m_small", small, ("mode=small",))])
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
