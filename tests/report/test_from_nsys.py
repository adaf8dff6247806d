"""`python -m llm_perf_opt.report --from-nsys RUN_DIR`: a run's report rebuilt from Nsight Systems CSVs.

Inputs: fixtures/nsys_run/run.json, the needed fields of a real tiny-model run (mode tiny,
max_new_tokens=4, 3 timed repeats, no trace pass), and the nsys CSV fixtures of
tests/profiling/fixtures/nsys (a capture of one run; per-stage kernel time by innermost range,
as tests/profiling/test_nsys_import.py derives it):

    preprocess 0 (no kernels), sam 5.0 ms, clip 2.0 ms, projector 0.2 ms,
    prefill 0.4 own + 1.5 prefill/attn + 1.5 prefill/moe = 3.4 ms, decode (3 ranges) 1.5 ms

Timed runs of the fixture run.json (ms, per run the sum of the stage's calls):

    sam     2439.647, 2523.555, 662.011                  -> median 2439.647
    decode  559.269+563.407+555.943 = 1678.619,
            665.764+224.626+92.59   =  982.980,
            107.805+187.771+180.219 =  475.795           -> median 982.980
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.attribution import UNATTRIBUTED
from llm_perf_opt.profiling.nsys_import import load_nsys_attribution
from llm_perf_opt.report.__main__ import main
from llm_perf_opt.report.from_nsys import per_run, rebuild

HERE = Path(__file__).parent
RUN_JSON = HERE / "fixtures" / "nsys_run" / "run.json"
NSYS_CSVS = HERE.parent / "profiling" / "fixtures" / "nsys"
STAGES = ["preprocess", "sam", "clip", "projector", "prefill", "decode"]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run dir as runners/nsys_profile.sh leaves it: run.json and the nsys stats CSVs."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(RUN_JSON, out / "run.json")
    for csv in NSYS_CSVS.glob("*.csv"):
        shutil.copy(csv, out / csv.name)
    return out


def test_rebuild_takes_busy_time_and_kernels_from_nsys(run_dir):
    rebuild(run_dir)
    table = pd.read_csv(run_dir / "stages.csv").set_index("stage")
    # The nested ranges of the capture follow their stage, with their own (exclusive) kernel time.
    assert list(table.index) == [*STAGES[:5], "prefill/attn", "prefill/moe", "decode"]
    assert (
        table.loc["prefill/attn", "busy_ms"] + table.loc["prefill/moe", "busy_ms"]
        <= table.loc["prefill", "busy_ms"]
    )
    stages = table.loc[STAGES]
    busy = stages["busy_ms"].to_dict()
    assert busy == pytest.approx(
        {"preprocess": 0.0, "sam": 5.0, "clip": 2.0, "projector": 0.2, "prefill": 3.4, "decode": 1.5}
    )
    # Kernels per stage, nested ranges included: prefill 16 gemm + 3 flash + 10 add + 3 topk.
    assert stages.loc["sam":, "launches"].to_dict() == {
        "sam": 28,
        "clip": 14,
        "projector": 1,
        "prefill": 32,
        "decode": 15,
    }
    assert pd.isna(stages.loc["preprocess", "launches"])  # a range without kernels
    # time_ms still comes from the timed runs of run.json.
    assert stages.loc["sam", "time_ms"] == pytest.approx(2439.647)
    assert (stages.loc["sam", "time_ms_min"], stages.loc["sam", "time_ms_max"]) == pytest.approx(
        (662.011, 2523.555)
    )
    assert stages.loc["decode", "time_ms"] == pytest.approx(982.98)
    assert stages.loc["decode", "calls"] == 3
    # decode moves 105,627,672 bytes (analytic, run.json): over 1.5 ms busy that is
    # 105627672 / 1.5e-3 / 1e9 = 70.418 GB/s.
    assert stages.loc["decode", "achieved_gbyte_s_busy"] == pytest.approx(70.418448)
    # The split uses the new busy time: host time = time - busy for a stage far above its roof.
    assert stages.loc["sam", "host_ms"] == pytest.approx(2439.647 - 5.0)

    kernels = pd.read_csv(run_dir / "kernels.csv")
    sam = kernels[kernels["stage"] == "sam"].set_index("name")
    assert sam["calls"].sum() == 28 and sam["total_ms"].sum() == pytest.approx(5.0)
    outside = kernels[kernels["stage"] == UNATTRIBUTED]
    assert outside["total_ms"].sum() == pytest.approx(
        0.1 + 0.2
    )  # 2 x 50 µs outside, 1 x 200 µs in load_weights


def test_rebuild_records_the_nsys_basis_and_a_new_headline(run_dir):
    rebuild(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    trace = record["trace"]
    assert trace["basis"] == "device (nsys)" and trace["path"] == "dsocr_*.csv"
    # 12.4 ms of kernels in the capture, 0.3 ms of it outside every stage range.
    assert trace["total_busy_ms"] == pytest.approx(12.4) and trace["unattributed_ms"] == pytest.approx(0.3)
    # Vision = sam + clip + projector: (1,388,875,712 + 39,138,580 + 4,202,496) FLOPs over
    # 5.0 + 2.0 + 0.2 = 7.2 ms busy, against the calibrated bf16 peak of 186,847,280,234.6 FLOP/s.
    vision = record["headline"]["flop_utilisation_pct"]["vision"]["calibrated"]
    assert vision["busy"] == pytest.approx(1_432_216_788 / 7.2e-3 / 186_847_280_234.6083 * 100)
    assert record["headline"]["tpot_ms"] == pytest.approx(record["timing"]["summary"]["tpot_ms"]["median"])
    assert json.loads((run_dir / "stages.json").read_text())["headline"] == record["headline"]

    text = (run_dir / "report.md").read_text()
    assert "busy times from Nsight Systems (dsocr_*.csv)" in text
    assert "## Top kernels per stage (Nsight Systems)" in text
    assert "`sm90_xmma_gemm" in text
    # decode's runs 1,678.619 / 982.980 / 475.795 ms: the first is above 1.5 x the median (1,474.47).
    assert (
        "- **spread warning**: decode: 1 of 3 timed runs above 1.5x the median (worst 1,678.62 ms, "
        "median 982.98 ms)"
    ) in text
    assert "sam: 1 of 3" not in text  # 2,523.555 is not above 1.5 x 2,439.647
    for name in ("roofline.png", "stages.json", "kernels.csv"):
        assert (run_dir / name).stat().st_size > 0


def test_rebuilding_twice_gives_the_same_tables(run_dir):
    rebuild(run_dir)
    first = (run_dir / "stages.csv").read_text()
    rebuild(run_dir)
    assert (run_dir / "stages.csv").read_text() == first


def test_per_run_scales_a_capture_of_several_runs_to_one():
    # Read the fixture's 3 decode ranges as 3 runs of 1 decode call each: every decode figure is a third.
    capture = load_nsys_attribution(NSYS_CSVS, STAGES)
    one = per_run(capture, {"preprocess": 1, "sam": 1, "clip": 1, "projector": 1, "prefill": 1, "decode": 1})
    rows = one.stages.set_index("stage")
    assert rows.loc["decode", "busy_ms"] == pytest.approx(1.5 / 3)
    assert rows.loc["decode", "range_calls"] == pytest.approx(1.0)
    assert rows.loc["sam", "busy_ms"] == pytest.approx(5.0)  # 1 instance, 1 call per run
    assert rows.loc["prefill/attn", "range_calls"] == pytest.approx(3.0)  # nested: prefill's factor, 1
    kernels = one.kernels
    gemv = kernels[(kernels["stage"] == "decode") & kernels["name"].str.startswith("void gemv2T")]
    assert gemv[["calls", "total_ms"]].iloc[0].tolist() == pytest.approx([12 / 3, 1.2 / 3])
    # Kernels outside the stages are not per run: they keep the capture's figures.
    outside = kernels[kernels["stage"] == UNATTRIBUTED]
    pd.testing.assert_frame_equal(
        outside, capture.kernels[capture.kernels["stage"] == UNATTRIBUTED].astype({"calls": "float64"})
    )
    assert one.total_busy_ms == capture.total_busy_ms and one.coverage == capture.coverage


def test_a_stage_missing_from_the_timed_runs_scales_to_nothing():
    capture = load_nsys_attribution(NSYS_CSVS, STAGES)
    rows = per_run(capture, {"sam": 1}).stages.set_index("stage")
    assert rows.loc["sam", "busy_ms"] == pytest.approx(5.0)
    assert rows.loc["clip", "busy_ms"] == 0


def test_cli_rebuilds_and_prints_the_table(run_dir, capsys):
    assert main(["--from-nsys", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "decode" in out and f"rebuilt {run_dir}" in out


def test_reports_elsewhere_are_found_with_reports(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(RUN_JSON, run / "run.json")
    rebuild(run, NSYS_CSVS / "dsocr")
    record = json.loads((run / "run.json").read_text())
    assert record["trace"]["path"] == str(NSYS_CSVS / "dsocr_*.csv")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda record: None, "no run.json"),
        (lambda record: {**record, "status": "failed"}, "did not finish (status 'failed')"),
        (lambda record: {k: v for k, v in record.items() if k != "stage_layout"}, "lacks stage_layout"),
    ],
)
def test_unusable_run_json_is_one_line(run_dir, capsys, edit, fragment):
    record = edit(json.loads(RUN_JSON.read_text()))
    if record is None:
        (run_dir / "run.json").unlink()
    else:
        (run_dir / "run.json").write_text(json.dumps(record))
    assert main(["--from-nsys", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1


def test_missing_csvs_are_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(RUN_JSON, run / "run.json")
    with pytest.raises(UserError, match="nsys stats -f csv"):
        rebuild(run)
