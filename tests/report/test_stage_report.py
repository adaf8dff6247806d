"""The per-stage table: spread of the timed runs, counts as whole numbers, nested ranges over
their op time, the model's op notes in the verdicts. Inputs are the Nsight Systems fixtures of
tests/profiling/fixtures/nsys (per-stage kernel time by innermost range: sam 5.0 ms, prefill
0.4 own + 1.5 prefill/attn + 1.5 prefill/moe) and hand-written timed runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from llm_perf_opt.hardware.ceilings import Roof
from llm_perf_opt.models.interface import OpNote
from llm_perf_opt.profiling.nsys_import import load_nsys_attribution
from llm_perf_opt.report.stage_report import measured_table, stage_table_from

NSYS_CSVS = Path(__file__).parent.parent / "profiling" / "fixtures" / "nsys"
STAGES = ["preprocess", "sam", "clip", "projector", "prefill", "decode"]
ROOF = Roof("calibrated", {"bfloat16": 1e14}, 1e12, source="test figures")


def _runs(sam: list[float]) -> list[dict[str, list[float]]]:
    return [
        {
            "preprocess": [1.0],
            "sam": [ms],
            "clip": [2.0],
            "projector": [0.5],
            "prefill": [4.0],
            "decode": [1.0, 1.0, 1.0],
        }
        for ms in sam
    ]


def test_spread_of_the_timed_runs_and_the_outlier_rule():
    # The tiny gundam SAM: 2,854 / 368 / 449 ms. Median 449; 2,854 > 1.5 x 449.
    table = measured_table(STAGES, _runs([2854.0, 368.0, 449.0]), None).set_index("stage")
    sam = table.loc["sam"]
    assert (sam["time_ms"], sam["time_ms_min"], sam["time_ms_max"]) == (449.0, 368.0, 2854.0)
    assert sam["repeats"] == 3 and sam["outlier_runs"] == 1
    # Sample stdev of (2854, 368, 449): mean 1223.67, squared deviations 2,657,987 + 732,171 +
    # 600,113 = 3,990,271, over n - 1 = 2: 1,995,135, whose root is 1412.49; 115.4 % of the mean.
    assert sam["time_ms_stdev"] == pytest.approx(1412.49, abs=0.01)
    assert sam["time_ms_cv_pct"] == pytest.approx(115.43, abs=0.01)
    assert pd.isna(sam["time_ms_p90"])  # 3 runs
    assert table.loc["decode", "calls"] == 3 and table.loc["decode", "outlier_runs"] == 0


def test_counts_are_whole_numbers():
    attribution = load_nsys_attribution(NSYS_CSVS, STAGES)
    table = measured_table(STAGES, _runs([10.0, 10.0, 10.0]), attribution)
    for column in ("calls", "repeats", "outlier_runs", "launches"):
        assert str(table[column].dtype) == "Int64", column
    # Written as CSV, a count is written as one: sam's 28 kernels, not 28.0.
    sam_line = next(line for line in table.to_csv(index=False).splitlines() if line.startswith("sam,"))
    assert sam_line.split(",")[list(table.columns).index("launches")] == "28"
    # A share of the trace's kernel time is a percentage, as every other share in the table: sam's
    # 5.0 ms of 12.4 ms (12.1 ms in stages and 0.3 ms outside them) is 40.3 %.
    assert table.set_index("stage").loc["sam", "busy_share_pct"] == pytest.approx(5.0 / 12.4 * 100)


def _work() -> pd.DataFrame:
    # prefill/attn: 3e11 FLOP and 1e8 B: 3 ms at 1e14 FLOP/s, 0.1 ms at 1e12 B/s; busy 1.5 ms.
    rows = [
        ("sam", 5e11, 1e9),
        ("clip", 1e11, 1e8),
        ("projector", 1e9, 1e7),
        ("prefill", 4e11, 1e9),
        ("prefill/attn", 1e11, 1e8),
        ("prefill/moe", 1e10, 1e9),
        ("decode", 1e9, 3e9),
    ]
    return pd.DataFrame(
        {
            "stage": [r[0] for r in rows],
            "flops": [r[1] for r in rows],
            "bytes": [r[2] for r in rows],
            "weight_bytes": 0.0,
            "act_bytes": 0.0,
            "kv_bytes": 0.0,
        }
    )


def test_nested_ranges_get_a_split_and_a_verdict_over_their_op_time():
    attribution = load_nsys_attribution(NSYS_CSVS, STAGES)
    table = stage_table_from(
        measured_table(STAGES, _runs([10.0] * 3), attribution),
        _work(),
        attribution,
        [ROOF],
        "bfloat16",
        "cuda",
        {"decode": 3},
    ).set_index("stage")
    attn = table.loc["prefill/attn"]
    # 1e11 / 1e14 = 1 ms at the roof (compute: 1e8 / 1e12 = 0.1 ms), busy 1.5 ms: 0.5 ms above it.
    assert pd.isna(attn["time_ms"]) and attn["busy_ms"] == pytest.approx(1.5)
    assert attn["split_roofline_ms"] == pytest.approx(1.0) and attn["above_roof_ms"] == pytest.approx(0.5)
    assert pd.isna(attn["host_ms"])
    assert attn["verdict"].startswith(
        "prefill/attn: compute-bound (1,000 FLOP/B, ridge 100): 67% of the "
        "calibrated bfloat16 compute roof (1 ms at the roof)"
    )
    assert attn["verdict"].endswith("(over op time: a nested range is timed by the trace pass only)")


def test_the_verdict_quotes_the_models_op_notes_for_its_stage():
    attribution = load_nsys_attribution(NSYS_CSVS, STAGES)
    top = attribution.kernels[attribution.kernels["stage"] == "sam"].sort_values("total_ms").iloc[-1]["name"]
    notes = [OpNote("sam", (top,), "what the model says"), OpNote("clip", (top,), "said of another stage")]
    table = stage_table_from(
        measured_table(STAGES, _runs([10.0] * 3), attribution),
        _work(),
        attribution,
        [ROOF],
        "bfloat16",
        "cuda",
        {"decode": 3},
        notes,
    ).set_index("stage")
    assert "what the model says" in table.loc["sam", "verdict"]
    assert "said of another stage" not in table.loc["sam", "verdict"]
