"""The roofline join, the time split, verdicts and headline utilisation, on hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from llm_perf_opt.hardware.ceilings import Roof
from llm_perf_opt.report.roofline import headline, roof_prefix, roofline_table, time_split, verdict

NAN = float("nan")


def make_roof(label: str, flop_s: dict, byte_s: float) -> Roof:
    return Roof(label, flop_s, byte_s, source="test figures")


DATASHEET = make_roof("datasheet", {"bf16": 1e15, "fp32": 5e13}, 2e12)
CALIBRATED = make_roof("calibrated", {"bf16": 5e14, "fp32": 4e13}, 1e12)


def _work(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def _row(stage: str, wall: float, busy: float, flops: float, nbytes: float, **extra) -> dict:
    return {"stage": stage, "time_ms": wall, "busy_ms": busy, "flops": flops, "bytes": nbytes, **extra}


def _numeric(table: pd.DataFrame) -> np.ndarray:
    return table.select_dtypes("number").to_numpy(dtype=float)


def test_join_arithmetic_compute_and_memory_bound():
    table = roofline_table(
        _work(
            _row("prefill", 10.0, 8.0, 2e12, 1e9, launches=300),
            _row("decode", 20.0, 10.0, 1e9, 1e10),
        ),
        [DATASHEET, CALIBRATED],
        "bf16",
    )
    pre, dec = table.iloc[0], table.iloc[1]
    # prefill: 2e12 FLOP over 1e9 bytes = 2000 FLOP/byte.
    assert pre["intensity"] == pytest.approx(2000.0)
    # 2e12 FLOP in 10 ms = 2e14 FLOP/s = 200 TFLOP/s; in 8 ms = 250 TFLOP/s.
    assert pre["achieved_tflop_s_wall"] == pytest.approx(200.0)
    assert pre["achieved_tflop_s_busy"] == pytest.approx(250.0)
    # 1e9 bytes in 10 ms = 1e11 B/s = 100 GB/s; in 8 ms = 125 GB/s.
    assert pre["achieved_gbyte_s_wall"] == pytest.approx(100.0)
    assert pre["achieved_gbyte_s_busy"] == pytest.approx(125.0)
    # datasheet: ridge 1e15 / 2e12 = 500; attainable min(1e15, 2000 · 2e12 = 4e15) = 1000 TFLOP/s;
    # roofline max(2e12 / 1e15 = 2 ms, 1e9 / 2e12 = 0.5 ms) = 2 ms: 20% of 10 ms, 25% of 8 ms.
    assert pre["datasheet_ridge"] == pytest.approx(500.0)
    assert pre["datasheet_attainable_tflop_s"] == pytest.approx(1000.0)
    assert pre["datasheet_roofline_ms"] == pytest.approx(2.0)
    assert pre["datasheet_pct_roof_wall"] == pytest.approx(20.0)
    assert pre["datasheet_pct_roof_busy"] == pytest.approx(25.0)
    assert pre["datasheet_bound"] == "compute"
    # calibrated: ridge 5e14 / 1e12 = 500; roofline max(4 ms, 1 ms) = 4 ms: 40% and 50%.
    assert pre["calibrated_ridge"] == pytest.approx(500.0)
    assert pre["calibrated_attainable_tflop_s"] == pytest.approx(500.0)
    assert pre["calibrated_roofline_ms"] == pytest.approx(4.0)
    assert pre["calibrated_pct_roof_wall"] == pytest.approx(40.0)
    assert pre["calibrated_pct_roof_busy"] == pytest.approx(50.0)
    # decode: 1e9 / 1e10 = 0.1 FLOP/byte; attainable 0.1 · 2e12 = 2e11 = 0.2 TFLOP/s;
    # roofline max(1e9 / 1e15 = 0.001 ms, 1e10 / 2e12 = 5 ms) = 5 ms: 25% of 20 ms, 50% of 10 ms.
    assert dec["intensity"] == pytest.approx(0.1)
    assert dec["datasheet_attainable_tflop_s"] == pytest.approx(0.2)
    assert dec["datasheet_roofline_ms"] == pytest.approx(5.0)
    assert dec["datasheet_pct_roof_wall"] == pytest.approx(25.0)
    assert dec["datasheet_pct_roof_busy"] == pytest.approx(50.0)
    assert dec["datasheet_bound"] == "memory"
    # Extra columns pass through.
    assert table["launches"].iloc[0] == 300 and math.isnan(table["launches"].iloc[1])


def test_dtype_selects_the_peak():
    table = roofline_table(_work(_row("sam", 10.0, 10.0, 1e12, 1e9)), [DATASHEET], "fp32")
    # fp32 peak 5e13: ridge 5e13 / 2e12 = 25; roofline max(1e12 / 5e13 = 20 ms, 0.5 ms) = 20 ms.
    assert table.loc[0, "datasheet_ridge"] == pytest.approx(25.0)
    assert table.loc[0, "datasheet_roofline_ms"] == pytest.approx(20.0)
    assert table.loc[0, "datasheet_pct_roof_wall"] == pytest.approx(200.0)


def test_degenerate_rows_give_nan_or_zero_never_inf():
    table = roofline_table(
        _work(
            _row("zero_time", 0.0, 0.0, 2e12, 1e9),
            _row("zero_bytes", 4.0, 2.0, 1e12, 0.0),
            _row("no_flops", 4.0, 2.0, 0.0, 4e9),
            _row("no_work", 3.0, 0.5, 0.0, 0.0),
            _row("no_trace", 10.0, NAN, 2e12, 1e9),
            _row("no_cost", 10.0, 8.0, NAN, NAN),
        ),
        [DATASHEET],
        "bf16",
    ).set_index("stage")
    assert not np.isinf(_numeric(table)).any()

    zt = table.loc["zero_time"]
    for col in (
        "achieved_tflop_s_wall",
        "achieved_tflop_s_busy",
        "achieved_gbyte_s_wall",
        "achieved_gbyte_s_busy",
        "datasheet_pct_roof_wall",
        "datasheet_pct_roof_busy",
    ):
        assert math.isnan(zt[col]), col
    assert zt["datasheet_roofline_ms"] == pytest.approx(2.0)

    # 1e12 FLOP, no bytes: unbounded intensity, so NaN; attainable is the 1000 TFLOP/s peak;
    # roofline 1e12 / 1e15 = 1 ms of compute: 25% of 4 ms; achieved 0 GB/s.
    zb = table.loc["zero_bytes"]
    assert math.isnan(zb["intensity"])
    assert zb["datasheet_attainable_tflop_s"] == pytest.approx(1000.0)
    assert zb["datasheet_roofline_ms"] == pytest.approx(1.0)
    assert zb["datasheet_pct_roof_wall"] == pytest.approx(25.0)
    assert zb["datasheet_bound"] == "compute"
    assert zb["achieved_gbyte_s_busy"] == 0.0

    # 4e9 bytes, no FLOPs: intensity 0, attainable 0; roofline 4e9 / 2e12 = 2 ms: 50% of 4 ms.
    nf = table.loc["no_flops"]
    assert nf["intensity"] == 0.0
    assert nf["datasheet_attainable_tflop_s"] == 0.0
    assert nf["datasheet_roofline_ms"] == pytest.approx(2.0)
    assert nf["datasheet_pct_roof_wall"] == pytest.approx(50.0)
    assert nf["datasheet_bound"] == "memory"

    nw = table.loc["no_work"]
    assert math.isnan(nw["intensity"]) and math.isnan(nw["datasheet_attainable_tflop_s"])
    assert nw["datasheet_roofline_ms"] == 0.0
    assert nw["datasheet_pct_roof_wall"] == 0.0
    assert nw["datasheet_bound"] == "none"

    nt = table.loc["no_trace"]
    assert math.isnan(nt["achieved_tflop_s_busy"]) and math.isnan(nt["datasheet_pct_roof_busy"])
    assert nt["datasheet_pct_roof_wall"] == pytest.approx(20.0)

    nc = table.loc["no_cost"]
    assert math.isnan(nc["datasheet_roofline_ms"]) and math.isnan(nc["datasheet_attainable_tflop_s"])
    assert nc["datasheet_bound"] == "unknown"


def test_input_order_index_and_columns_are_kept():
    work = _work(
        _row("b", 2.0, 1.0, 1e9, 1e6, weight_bytes=5e5), _row("a", 2.0, 1.0, 1e9, 1e6, weight_bytes=1e5)
    )
    work.index = [7, 3]
    table = roofline_table(work, [DATASHEET], "bf16")
    assert table.index.tolist() == [7, 3]
    assert table["stage"].tolist() == ["b", "a"]
    assert table["weight_bytes"].tolist() == [5e5, 1e5]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="lacks columns"):
        roofline_table(pd.DataFrame({"stage": ["x"], "time_ms": [1.0]}), [DATASHEET], "bf16")
    with pytest.raises(ValueError, match="negative"):
        roofline_table(_work(_row("x", -1.0, 1.0, 1.0, 1.0)), [DATASHEET], "bf16")
    with pytest.raises(ValueError, match="same column prefix"):
        roofline_table(
            _work(_row("x", 1.0, 1.0, 1.0, 1.0)),
            [DATASHEET, make_roof("Datasheet!", {"bf16": 1.0}, 1.0)],
            "bf16",
        )
    with pytest.raises(ValueError, match="must be positive"):
        roofline_table(_work(_row("x", 1.0, 1.0, 1.0, 1.0)), [make_roof("zero", {"bf16": 0.0}, 1.0)], "bf16")


def test_roof_prefix():
    assert roof_prefix("datasheet") == "datasheet_"
    assert roof_prefix("Calibrated (H100 SXM)") == "calibrated_h100_sxm_"
    with pytest.raises(ValueError):
        roof_prefix("--")


def _split_case() -> pd.DataFrame:
    # datasheet roofline times, worked out as max(F / 1e15, B / 2e12):
    return roofline_table(
        _work(
            _row("normal", 10.0, 8.0, 2e12, 1e9),  # 2 ms
            _row("no_trace", 10.0, NAN, 2e12, 1e9),  # 2 ms
            _row("overlap", 10.0, 12.0, 2e12, 1e9),  # 2 ms
            _row("faster", 10.0, 1.0, 2e12, 1e9),  # 2 ms > busy 1 ms
            _row("no_cost", 10.0, 2.0, NAN, NAN),  # unknown
            _row("no_wall", NAN, 2.0, 2e12, 1e9),
            _row("zero", 0.0, 0.0, 2e12, 1e9),
            _row("untraced_uncosted", 10.0, NAN, NAN, NAN),
        ),
        [DATASHEET],
        "bf16",
    )


def test_time_split_parts():
    split = time_split(_split_case(), "datasheet").set_index("stage")
    cols = ["roofline_ms", "above_roof_ms", "host_ms", "unsplit_ms", "overlap_ms"]

    def parts(stage):
        return split.loc[stage, cols].tolist()

    # normal: roofline 2, above 8 − 2 = 6, host 10 − 8 = 2.
    assert parts("normal") == pytest.approx([2.0, 6.0, 2.0, 0.0, 0.0])
    # no trace: host and above-roof unknown, the rest of the wall, 10 − 2 = 8, unsplit.
    assert parts("no_trace") == pytest.approx([2.0, NAN, NAN, 8.0, NAN], nan_ok=True)
    # busy 12 > wall 10: device time capped at 10, no host time, 2 ms overlap the next stage.
    assert parts("overlap") == pytest.approx([2.0, 8.0, 0.0, 0.0, 2.0])
    # roofline 2 ms > busy 1 ms: the roofline part is capped at the busy time.
    assert parts("faster") == pytest.approx([1.0, 0.0, 9.0, 0.0, 0.0])
    # no analytic cost: host 10 − 2 = 8, the busy 2 ms unsplit.
    assert parts("no_cost") == pytest.approx([NAN, NAN, 8.0, 2.0, 0.0], nan_ok=True)
    assert all(math.isnan(v) for v in parts("no_wall")[:4])
    assert parts("zero") == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0])
    assert parts("untraced_uncosted") == pytest.approx([NAN, NAN, NAN, 10.0, NAN], nan_ok=True)


def test_time_split_adds_up_to_wall_in_every_case():
    split = time_split(_split_case(), "datasheet")
    measured = split[split["time_ms"].notna()]
    total = measured[["roofline_ms", "above_roof_ms", "host_ms", "unsplit_ms"]].sum(axis=1, skipna=True)
    assert total.to_numpy() == pytest.approx(measured["time_ms"].to_numpy(), abs=1e-12)
    assert (measured[["roofline_ms", "above_roof_ms", "host_ms", "unsplit_ms"]].fillna(0) >= 0).all().all()


def test_time_split_keeps_the_index_and_rejects_an_unknown_roof():
    table = _split_case()
    table.index = range(10, 10 + len(table))
    assert time_split(table, "datasheet").index.tolist() == table.index.tolist()
    with pytest.raises(ValueError, match="no roof"):
        time_split(table, "calibrated")


def _one(row: dict, roof: Roof, dtype: str = "bf16") -> tuple[pd.Series, pd.Series]:
    table = roofline_table(_work(row), [roof], dtype)
    return table.iloc[0], time_split(table, roof.label).iloc[0]


H100_CALIBRATED = make_roof("calibrated", {"bf16": 8e14}, 3e12)


def test_verdict_host_bound_decode():
    # 31 steps of 1.177 GB and 1.166 GFLOP: bytes 36.487e9 / 3e12 = 12.162 ms, FLOPs
    # 36.146e9 / 8e14 = 0.045 ms: memory; per step 12.162 / 31 = 0.392 ms. Busy 93.5 of 545 ms
    # = 17%: host 451.5 ms > half the wall. 12,710 launches / 31 = 410 per step.
    row, split = _one(_row("decode", 545.0, 93.5, 31 * 1.166e9, 31 * 1.177e9), H100_CALIBRATED)
    text = verdict(row, split, "calibrated", "bf16", launches=12_710, steps=31)
    assert text == (
        "decode: host-bound: the GPU is busy 17% of the step; 410 kernel launches per step; "
        "at the calibrated bandwidth roof a step would take 0.392 ms"
    )


def test_verdict_compute_bound_with_top_op():
    # 4e12 / 8e14 = 5 ms > 2e9 / 3e12 = 0.67 ms: compute; 5 / 11 = 45% of the roof over wall.
    # Intensity 4e12 / 2e9 = 2,000 FLOP/B, ridge 8e14 / 3e12 = 267. Host 1 ms of 11: not
    # host-bound. Busy 10 ms, 5 at the roof: 50% above it. aten::mm 6.5 of 10 ms = 65% holds
    # more than half the op time on its own, so it is the only op named.
    row, split = _one(_row("sam", 11.0, 10.0, 4e12, 2e9), H100_CALIBRATED)
    text = verdict(row, split, "calibrated", "bf16", top_ops=[("aten::add", 3.0), ("aten::mm", 6.5)])
    assert text == (
        "sam: compute-bound (2,000 FLOP/B, ridge 267): 45% of the calibrated bf16 compute roof "
        "(5 ms at the roof); 50% of its kernel time is above the roof; "
        "longest kernels: aten::mm 65% of 10 ms kernel time"
    )


def test_verdict_memory_bound_on_cpu():
    # CPU roof 1e12 FLOP/s, 30 GB/s: 1e9 / 1e12 = 1 ms < 6e7 / 3e10 = 2 ms: memory; 2 / 4 = 50%.
    cpu = make_roof("calibrated", {"fp32": 1e12}, 3e10)
    row, split = _one(_row("clip", 4.0, 3.5, 1e9, 6e7), cpu, "fp32")
    # Intensity 1e9 / 6e7 = 17 FLOP/B, ridge 1e12 / 3e10 = 33; busy 3.5 ms, 2 at the roof: 43% above.
    text = verdict(
        row, split, "calibrated", "fp32", launches=120, top_ops=[("aten::copy_", 1.4)], device_kind="cpu"
    )
    assert text == (
        "clip: memory-bound (17 FLOP/B, ridge 33): 50% of the calibrated bandwidth roof (2 ms at the "
        "roof); 120 op calls; 43% of its op time is above the roof; longest ops: aten::copy_ 40% of "
        "3.5 ms op time"
    )


def test_verdict_above_the_roof_says_the_roof_is_too_low():
    # CPU roof 30 GB/s: 6e7 B / 3e10 = 2 ms at the roof, measured in 1.6 ms: 125% of the roof,
    # which no timing noise explains. At 2.05 ms (98%) nothing is added.
    cpu = make_roof("calibrated", {"fp32": 1e12}, 3e10)
    row, split = _one(_row("decode", 1.6, 1.5, 1e6, 6e7), cpu, "fp32")
    text = verdict(row, split, "calibrated", "fp32", device_kind="cpu")
    assert text.startswith(
        "decode: memory-bound (0.017 FLOP/B, ridge 33): 125% of the calibrated bandwidth roof "
        "(2 ms at the roof); "
    )
    assert "above the roof: the ceiling is too low" in text and "calibrate --refresh" in text
    row, split = _one(_row("decode", 2.05, 2.0, 1e6, 6e7), cpu, "fp32")
    assert "above the roof" not in verdict(row, split, "calibrated", "fp32", device_kind="cpu")


def test_verdict_other_cases():
    row, split = _one(_row("prefill", 10.0, 2.0, 1e9, 6e7), H100_CALIBRATED, "bf16")
    assert verdict(row, split, "calibrated", "bf16", device_kind="cpu").startswith(
        "prefill: host-bound: op time is 20% of the stage;"
    )
    row, split = _one(_row("preprocess", 3.0, 0.6, 0.0, 0.0), H100_CALIBRATED)
    assert verdict(row, split, "calibrated", "bf16") == (
        "preprocess: no modelled work; 3 ms; the GPU is busy 20% of the stage"
    )
    row, split = _one(_row("sam", 11.0, NAN, 4e12, 2e9), H100_CALIBRATED)
    assert verdict(row, split, "calibrated", "bf16").endswith("; no trace, so GPU idle time unknown")
    row, split = _one(_row("clip", NAN, NAN, 4e12, 2e9), H100_CALIBRATED)
    assert verdict(row, split, "calibrated", "bf16") == "clip: not measured"
    row, split = _one(_row("sam", 11.0, 10.0, 4e12, 2e9), H100_CALIBRATED)
    long_name = "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>"
    text = verdict(row, split, "calibrated", "bf16", top_ops=[(long_name, 6.0)])
    # Cut to 60 characters, the last an ellipsis.
    shown = "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616…"
    assert len(shown) == 60
    assert text.endswith(f"; longest kernels: {shown} 60% of 10 ms kernel time")
    with pytest.raises(ValueError):
        verdict(row, split, "calibrated", "bf16", device_kind="tpu")


def test_headline_utilisation():
    table = roofline_table(
        _work(
            _row("sam", 4.0, 3.0, 1e12, 1e9),
            _row("clip", 6.0, 5.0, 1e12, 1e9),
            _row("prefill", 10.0, 8.0, 2e12, 1e9),
            _row("prefill/moe", 5.0, 4.0, 9e12, 1e9),
            _row("decode", 5.0, 1.0, 1e9, 1e9),
        ),
        [DATASHEET, CALIBRATED],
        "bf16",
    )
    h = headline(
        table,
        [DATASHEET, CALIBRATED],
        "bf16",
        compute_stages={"prefill": ["prefill"], "vision": ["sam", "clip"]},
        bandwidth_stages={"decode": ["decode"]},
    )
    flop, bw = h["flop_utilisation_pct"], h["bandwidth_utilisation_pct"]
    # prefill (the prefill/moe row is not a stage): 2e12 / 10 ms = 2e14 FLOP/s = 20% of 1e15,
    # over 8 ms 25%; of the calibrated 5e14: 40% and 50%.
    assert flop["prefill"]["datasheet"] == pytest.approx({"wall": 20.0, "busy": 25.0})
    assert flop["prefill"]["calibrated"] == pytest.approx({"wall": 40.0, "busy": 50.0})
    # vision: (1e12 + 1e12) / (4 + 6 ms) = 2e14 = 20%; over (3 + 5 ms) 25%.
    assert flop["vision"]["datasheet"] == pytest.approx({"wall": 20.0, "busy": 25.0})
    # decode: 1e9 bytes / 5 ms = 2e11 B/s = 10% of 2e12; over 1 ms 50%.
    assert bw["decode"]["datasheet"] == pytest.approx({"wall": 10.0, "busy": 50.0})


def test_headline_absent_and_partial_groups():
    table = roofline_table(_work(_row("decode", 5.0, NAN, 1e9, 1e9)), [DATASHEET], "bf16")
    h = headline(
        table,
        [DATASHEET],
        "bf16",
        compute_stages={"vision": ["sam", "clip"]},
        bandwidth_stages={"decode": ["decode"]},
    )
    assert all(math.isnan(v) for v in h["flop_utilisation_pct"]["vision"]["datasheet"].values())
    assert math.isnan(h["bandwidth_utilisation_pct"]["decode"]["datasheet"]["busy"])
    assert h["bandwidth_utilisation_pct"]["decode"]["datasheet"]["wall"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="not"):
        headline(
            table, [DATASHEET], "bf16", compute_stages={}, bandwidth_stages={"lm": ["decode", "prefill"]}
        )


def test_a_stage_within_fifteen_percent_of_the_ridge_is_balanced():
    # H100-like calibrated roof: ridge 8e14 / 3e12 = 266.7 FLOP/B; 15 % of it is 40.0.
    work = _work(
        *(
            _row(name, 10.0, 9.0, intensity * 1e9, 1e9)
            for name, intensity in (("above", 310.0), ("high", 300.0), ("low", 230.0), ("below", 225.0))
        )
    )
    bound = roofline_table(work, [H100_CALIBRATED], "bf16").set_index("stage")["calibrated_bound"]
    # 310 is 43.3 above the ridge, 300 is 33.3 above, 230 is 36.7 below, 225 is 41.7 below.
    assert bound.to_dict() == {"above": "compute", "high": "balanced", "low": "balanced", "below": "memory"}


def test_verdict_of_a_balanced_stage():
    row, split = _one(_row("sam", 11.0, 10.0, 300e9, 1e9), H100_CALIBRATED)
    # 300e9 / 8e14 = 0.375 ms compute, 1e9 / 3e12 = 0.333 ms memory: 0.375 / 11 = 3.4 %.
    assert verdict(row, split, "calibrated", "bf16").startswith(
        "sam: balanced (300 FLOP/B, within 15% of the ridge 267: compute and bandwidth bind alike): 3.4% of the "
        "calibrated roofline (0.375 ms at the roof)"
    )


def test_verdict_quotes_the_models_note_on_the_ops_that_hold_the_time():
    # Busy 10 ms: copy_ 4.9 (49 %) is not half of it on its own, copy_ + add 7.1 (71 %) is.
    row, split = _one(_row("sam", 11.0, 10.0, 4e12, 2e9), H100_CALIBRATED)
    ops = [("aten::mm", 2.0), ("aten::copy_", 4.9), ("aten::add", 2.2)]
    note = (("aten::copy_", "aten::add"), "the materialised bias; model.impl=fast avoids it")
    text = verdict(row, split, "calibrated", "bf16", top_ops=ops, op_notes=[note], device_kind="cpu")
    assert text.endswith(
        "; longest ops: aten::copy_ 49%, aten::add 22% of 10 ms op time; "
        "aten::copy_ and aten::add (71%): the materialised bias; model.impl=fast avoids it"
    )
    # A note on ops that are not among the longest is not quoted.
    other = (("aten::cat",), "the projector's concatenation")
    assert "concatenation" not in verdict(row, split, "calibrated", "bf16", top_ops=ops, op_notes=[other])


def test_headline_names_the_roof_that_binds_each_group():
    # ridge 8e14 / 3e12 = 266.7. prefill: 1e12 FLOP / 1e10 B = 100 FLOP/B: memory-bound; its
    # bytes take 1e10 / 3e12 = 3.333 ms, over 10 ms wall 33.3 %, over 8 ms busy 41.7 %; its FLOP
    # utilisation is only 1e12 / 10 ms / 8e14 = 12.5 %. vision: 4e12 / 2e9 = 2,000: compute-bound,
    # 4e12 / 8e14 = 5 ms over 10 ms = 50 %. decode: 280e9 / 1e9 = 280, within 15 %: balanced,
    # max(0.35, 0.333) = 0.35 ms over 1 ms = 35 %.
    table = roofline_table(
        _work(
            _row("prefill", 10.0, 8.0, 1e12, 1e10),
            _row("sam", 4.0, 3.0, 2e12, 1e9),
            _row("clip", 6.0, 5.0, 2e12, 1e9),
            _row("decode", 1.0, 0.5, 280e9, 1e9),
        ),
        [H100_CALIBRATED],
        "bf16",
    )
    h = headline(
        table,
        [H100_CALIBRATED],
        "bf16",
        compute_stages={"vision": ["sam", "clip"], "prefill": ["prefill"]},
        bandwidth_stages={"decode": ["decode"]},
    )
    binding = {group: roofs["calibrated"] for group, roofs in h["roof_utilisation_pct"].items()}
    assert binding["prefill"]["bound"] == "memory"
    assert (binding["prefill"]["wall"], binding["prefill"]["busy"]) == pytest.approx(
        (33.333, 41.667), abs=1e-3
    )
    assert h["flop_utilisation_pct"]["prefill"]["calibrated"]["wall"] == pytest.approx(12.5)
    assert binding["vision"]["bound"] == "compute" and binding["vision"]["wall"] == pytest.approx(50.0)
    assert binding["decode"]["bound"] == "balanced" and binding["decode"]["wall"] == pytest.approx(35.0)
    assert binding["decode"]["intensity"] == pytest.approx(280.0)
