"""report.record: run.json read back as a typed RunRecord and written again unchanged; a file that
is no run record, or of another schema, is one line."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llm_perf_opt import run as run_module
from llm_perf_opt.config import compose, validate
from llm_perf_opt.errors import UserError
from llm_perf_opt.report.record import RunRecord, read_record
from llm_perf_opt.report.run_report import write_failure

BASELINES = Path(__file__).parents[2] / "benchmarks" / "baselines"
TINY = (
    "model=deepseek_ocr_tiny",
    "mode=tiny",
    "device=cpu",
    "profiling=quick",
    # Timed runs until every figure varies by at most 0.01 % of its mean, 3 at most: never reached.
    "profiling.repeats=2",
    "profiling.until_cv=0.0001",
    "profiling.max_repeats=3",
    "dtype=float32",
    "max_new_tokens=3",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The run dir of a tiny job run in-process."""
    out = tmp_path_factory.mktemp("record") / "run"
    cfg = compose(list(TINY))
    run_module.run_job(validate(cfg), OmegaConf.to_container(cfg, resolve=True), out)
    return out


@pytest.fixture(scope="module")
def tiny_run(tiny_dir) -> dict:
    """Its run.json, as parsed JSON."""
    return json.loads((tiny_dir / "run.json").read_text())


def test_a_run_json_reads_back_and_writes_again_unchanged(tiny_run):
    record = RunRecord.from_dict(tiny_run)
    assert record.to_dict() == tiny_run
    assert list(record.to_dict()) == list(tiny_run)  # the writer's field order too


def test_the_typed_record_holds_what_the_file_says(tiny_run):
    record = RunRecord.from_dict(tiny_run)
    assert (record.status, record.model_name, record.mode_name) == ("ok", "deepseek_ocr_tiny", "tiny")
    assert (record.device.type, record.dtype, record.batch_size) == ("cpu", "float32", 1)
    # 3 timed runs (until_cv) of 2 decode steps each (max_new_tokens=3: prefill gives the first token).
    assert len(record.samples) == 3
    assert [len(s.stages["decode"]) for s in record.samples] == [2, 2, 2]
    decode = [sum(sample["stages"]["decode"]) for sample in tiny_run["timing"]["samples"]]
    assert record.timing.stages["decode"].median == statistics.median(decode)
    assert record.median("ttft_ms") == record.headline.ttft_ms == record.timing.summary["ttft_ms"].median
    # The model's own facts about the request are kept whole.
    assert record.request_facts["tokens"] == tiny_run["tokens"]
    assert record.hardware.roofs[0].label == "calibrated"
    step = {row.stage for row in record.analytic.stage_rows("step")}
    assert step == set(record.stage_layout.per_step) == {"decode"}
    until_cv = record.timing.until_cv
    assert (until_cv.target, until_cv.runs, until_cv.max_repeats, until_cv.reached) == (0.0001, 3, 3, False)


def test_report_md_reads_the_typed_record(tiny_dir):
    report = (tiny_dir / "report.md").read_text()
    assert report.startswith("# deepseek_ocr_tiny · ")
    assert "3 timed runs (until every figure's stdev ≤ 0.01% of its mean: not reached by 3)" in report
    assert "profiling.until_cv=0.0001 not reached in 3 timed runs (profiling.max_repeats)" in report
    # A group of one stage is named once, a group of several with its stages.
    assert "\n- prefill: " in report and "\n- vision (sam, clip, projector): " in report


def test_a_failed_job_reads_back_as_written(tmp_path):
    write_failure(tmp_path, {"model": {"name": "toy"}}, "failed", "ValueError: bad shape")
    written = json.loads((tmp_path / "run.json").read_text())
    record = read_record(tmp_path / "run.json")
    assert (record.status, record.error, record.model_name) == ("failed", "ValueError: bad shape", "toy")
    assert record.timing is None and record.samples == () and record.batch_size == 1
    assert record.to_dict() == written


@pytest.mark.parametrize(
    "run_json", sorted(BASELINES.rglob("run.json")), ids=lambda p: str(p.parent.relative_to(BASELINES))
)
def test_the_committed_baselines_read_back_unchanged(run_json):
    data = json.loads(run_json.read_text())
    assert read_record(run_json).to_dict() == data


@pytest.mark.parametrize(
    "data, fragment",
    [
        ([1, 2], "not a run.json of llm_perf_opt (no status field)"),
        ({"schema_version": 1}, "not a run.json of llm_perf_opt (no status field)"),
        ({"status": "ok"}, "schema_version None, this llm_perf_opt reads 1"),
        ({"schema_version": 2, "status": "ok"}, "schema_version 2, this llm_perf_opt reads 1"),
        ({"schema_version": "1", "status": "ok"}, "schema_version '1'"),
        ({"schema_version": True, "status": "ok"}, "schema_version True"),
        ({"schema_version": 1, "status": "ok", "timing": {"samples": 3}}, "malformed run.json (TypeError"),
        (
            {"schema_version": 1, "status": "ok", "device": {"name": "x"}},
            "malformed run.json (KeyError: 'type')",
        ),
    ],
)
def test_what_is_no_run_record_of_this_schema_is_one_line(tmp_path, data, fragment):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as caught:
        read_record(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


def test_a_file_that_is_not_json_is_one_line(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"run.json: not valid JSON \(.* at line 1\)"):
        read_record(path)
