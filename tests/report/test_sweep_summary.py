"""The sweep summary: rows, columns, failed and missing jobs, Markdown, the PNG, atomic writes,
the Hydra callback and the summarize CLI, on job dirs written by hand (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from llm_perf_opt.config import compose
from llm_perf_opt.errors import UserError
from llm_perf_opt.report.sweep_callback import SweepSummary
from llm_perf_opt.report.sweep_summary import (
    job_labels,
    load_sweep,
    merge_order,
    summarize,
    summary_markdown,
    write_summary,
)
from llm_perf_opt.summarize import main

COMMON = ["model=toy", "device=cpu", "hydra.run.dir=/elsewhere", "hydra/launcher=basic"]
# Stage names of a made-up model, in an order that is not alphabetical: the summary must take
# both from stages.csv.
STAGES = ["load", "encode", "decode"]


def ok_record(mode: str, image_tokens: int, ttft: float, tpot: float) -> dict:
    return {
        "schema_version": 1,
        "status": "ok",
        "error": None,
        "config": {"model": {"name": "toy"}, "mode": {"name": mode}},
        "dtype": "bfloat16",
        "tokens": {"image": image_tokens, "text": 10, "prompt": image_tokens + 10},
        # decode tokens/s = 1000 / TPOT; end-to-end = TTFT + 3 decode steps · TPOT
        "headline": {
            "ttft_ms": ttft,
            "tpot_ms": tpot,
            "decode_tokens_per_s": 1000 / tpot,
            "e2e_ms": ttft + 3 * tpot,
        },
    }


def stages_csv(times: dict[str, float], pct: dict[str, tuple[float, float]]) -> str:
    """stages.csv with the columns the summary reads, plus one it does not."""
    lines = ["stage,calls,time_ms,calibrated_pct_roof_wall,datasheet_pct_roof_wall,verdict"]
    for stage, ms in times.items():
        cal, sheet = pct.get(stage, ("", ""))
        lines.append(f'{stage},1,{ms},{cal},{sheet},"{stage}: fine, really"')
    return "\n".join(lines) + "\n"


def write_job(
    root: Path, name: str, overrides: list[str], record: dict | None, stages: str | None = None
) -> Path:
    """A job dir as Hydra and run.py leave it: .hydra/ always, run.json and stages.csv if given."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    mode = next(o.partition("=")[2] for o in overrides if o.startswith("mode="))
    (job / ".hydra" / "config.yaml").write_text(f"model:\n  name: toy\nmode:\n  name: {mode}\n")
    if record is not None:
        (job / "run.json").write_text(json.dumps(record))
    if stages is not None:
        (job / "stages.csv").write_text(stages)
    return job


def make_sweep(root: Path) -> Path:
    """Four jobs: two finished, one failed, one killed after its stages.csv but before run.json."""
    write_job(
        root,
        "0_toy_tiny",
        ["mode=tiny", *COMMON],
        ok_record("tiny", 64, 120.0, 20.0),
        stages_csv(
            {"load": 10.0, "encode": 60.5, "decode": 50.0}, {"encode": (12.5, 5.0), "decode": (40.0, 20.0)}
        ),
    )
    write_job(
        root,
        "1_toy_base",
        ["mode=base", *COMMON],
        ok_record("base", 256, 480.0, 25.0),
        stages_csv(
            {"load": 20.0, "encode": 1234.5, "decode": 75.0}, {"encode": (30.0, 15.0), "decode": (35.0, 17.5)}
        ),
    )
    failed = {
        "schema_version": 1,
        "status": "failed",
        "error": "ValueError: bad shape\n  in layer 3 | head 2",
        "config": {"model": {"name": "toy"}, "mode": {"name": "large"}},
    }
    write_job(root, "2_toy_large", ["mode=large", *COMMON], failed)
    write_job(
        root, "3_toy_gundam", ["mode=gundam", *COMMON], None, stages_csv({"load": 1.0, "encode": 2.0}, {})
    )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def rows_by_job(root: Path) -> dict[str, dict]:
    return summarize(load_sweep(root)).table.set_index("job").to_dict("index")


def test_one_row_per_job_with_headline_stage_and_roof_columns(tmp_path):
    summary = summarize(load_sweep(make_sweep(tmp_path)))
    assert summary.stages == ("load", "encode", "decode")
    assert summary.roofs == ("calibrated", "datasheet")
    assert list(summary.table.columns) == [
        "job",
        "overrides",
        "model",
        "mode",
        "batch_size",
        "image_tokens",
        "dtype",
        "ttft_ms",
        "tpot_ms",
        "decode_tokens_per_s",
        "e2e_ms",
        "tokens_per_s",
        "pages_per_s",
        "load_ms",
        "encode_ms",
        "decode_ms",
        "load_pct_calibrated_roof",
        "encode_pct_calibrated_roof",
        "decode_pct_calibrated_roof",
        "load_pct_datasheet_roof",
        "encode_pct_datasheet_roof",
        "decode_pct_datasheet_roof",
        "status",
        "error",
    ]
    assert list(summary.table["job"]) == ["0_toy_tiny", "1_toy_base", "2_toy_large", "3_toy_gundam"]
    base = summary.table.set_index("job").loc["1_toy_base"]
    # Hydra's own overrides are left out, the others kept in launch order.
    assert base["overrides"] == "mode=base model=toy device=cpu"
    assert (base["model"], base["mode"], base["image_tokens"], base["dtype"]) == (
        "toy",
        "base",
        256,
        "bfloat16",
    )
    # 1000 / 25 ms = 40 tokens/s; 480 + 3 · 25 = 555 ms
    assert (base["ttft_ms"], base["tpot_ms"], base["decode_tokens_per_s"], base["e2e_ms"]) == (
        480.0,
        25.0,
        40.0,
        555.0,
    )
    assert (base["load_ms"], base["encode_ms"], base["decode_ms"]) == (20.0, 1234.5, 75.0)
    assert (base["encode_pct_calibrated_roof"], base["encode_pct_datasheet_roof"]) == (30.0, 15.0)
    assert np.isnan(base["load_pct_calibrated_roof"])  # no analytic work for "load"
    assert base["status"] == "ok" and pd.isna(base["error"])


def test_failed_and_missing_jobs_have_a_row_with_their_status_and_one_line_error(tmp_path):
    rows = rows_by_job(make_sweep(tmp_path))
    failed, missing = rows["2_toy_large"], rows["3_toy_gundam"]
    assert (failed["status"], failed["mode"]) == ("failed", "large")
    assert failed["error"] == "ValueError: bad shape in layer 3 | head 2"
    assert np.isnan(failed["encode_ms"]) and np.isnan(failed["ttft_ms"])
    assert (missing["status"], missing["mode"]) == ("missing", "gundam")
    assert "no run.json" in missing["error"]
    # It was killed after writing stages.csv: times of a run that never completed are not shown.
    assert np.isnan(missing["load_ms"]) and np.isnan(missing["encode_ms"])


def summary(median: float) -> dict:
    """A figure's timing summary, as profiling.timing.summarize writes it, of one run."""
    return {"n": 1, "median": median, "mean": median, "min": median, "max": median, "stdev": 0.0, "cv": 0.0}


def test_headline_falls_back_to_the_timing_summary(tmp_path):
    record = ok_record("tiny", 64, 0.0, 1.0)
    del record["headline"]
    record["timing"] = {
        "summary": {
            "ttft_ms": summary(111.0),
            "tpot_ms": summary(8.0),
            "decode_tokens_per_s": summary(125.0),
            "e2e_ms": None,
        }
    }
    write_job(tmp_path, "0_toy_tiny", ["mode=tiny"], record, stages_csv({"load": 1.0}, {}))
    row = rows_by_job(tmp_path)["0_toy_tiny"]
    assert (row["ttft_ms"], row["tpot_ms"], row["decode_tokens_per_s"]) == (111.0, 8.0, 125.0)
    assert np.isnan(row["e2e_ms"])


def test_stage_order_comes_from_the_data_and_nested_rows_are_left_out(tmp_path):
    write_job(
        tmp_path,
        "0_a",
        ["mode=a"],
        ok_record("a", 1, 1.0, 1.0),
        stages_csv({"zeta": 5.0, "zeta/attn": 4.0, "alpha": 2.0}, {}),
    )
    write_job(
        tmp_path,
        "1_b",
        ["mode=b"],
        ok_record("b", 1, 1.0, 1.0),
        stages_csv({"zeta": 6.0, "mid": 1.0, "alpha": 3.0}, {}),
    )
    summary = summarize(load_sweep(tmp_path))
    assert summary.stages == ("zeta", "mid", "alpha")
    assert "zeta/attn_ms" not in summary.table.columns
    assert list(summary.table["zeta_ms"]) == [5.0, 6.0]  # the nested 4 ms is not added to zeta


def test_merge_order_keeps_each_sequence_order():
    assert merge_order([["a", "b", "c"], ["a", "x", "c"]]) == ["a", "b", "x", "c"]
    assert merge_order([["b", "c"], ["a", "b"]]) == ["a", "b", "c"]
    assert merge_order([]) == []


def test_job_labels_name_the_number_and_what_differs(tmp_path):
    assert job_labels(summarize(load_sweep(make_sweep(tmp_path)))) == [
        "0 tiny",
        "1 base",
        "2 large",
        "3 gundam",
    ]


def test_markdown_lists_jobs_problems_stage_times_and_roofs(tmp_path):
    summary = summarize(load_sweep(make_sweep(tmp_path)))
    md = summary_markdown(summary, "nightly")
    assert md.startswith("# Sweep summary: nightly\n")
    assert "4 jobs; 2 ok, 1 failed, 1 missing." in md
    # Overrides every job shares are listed once; the table keeps the one that differs.
    assert "Overrides of every job: `model=toy` `device=cpu`." in md
    # Batch 1 where run.json names none (a record from before batches); no throughput recorded: "-".
    assert (
        "| 1_toy_base | `mode=base` | toy | base | 1 | 256 | bfloat16 | 480.00 | 25.00 | 40.00 | 555.00 | - | - | ok |"
        in md
    )
    # A list item, not a table cell: the error's line break is gone, its "|" stays as it is.
    assert "- **2_toy_large** (failed): ValueError: bad shape in layer 3 | head 2" in md
    assert "| job | load | encode | decode |" in md
    assert "| 1_toy_base | 20.00 | 1,234.50 | 75.00 |" in md
    assert "| 2_toy_large | - | - | - |" in md
    assert "## % of the calibrated roof" in md and "## % of the datasheet roof" in md
    assert "| 0_toy_tiny | - | 12.5 | 40.0 |" in md  # calibrated
    assert "| 0_toy_tiny | - | 5.0 | 20.0 |" in md  # datasheet
    assert "![stage time per job](sweep.png)" in md
    assert "hydra" not in md


def test_markdown_cells_escape_the_pipe(tmp_path):
    write_job(
        tmp_path, "0_a", ["mode=a", "prompt='x | y'"], ok_record("a", 1, 1.0, 1.0), stages_csv({"s": 1.0}, {})
    )
    write_job(
        tmp_path, "1_b", ["mode=b", "prompt='x | y'"], ok_record("b", 1, 1.0, 1.0), stages_csv({"s": 1.0}, {})
    )
    md = summary_markdown(summarize(load_sweep(tmp_path)), "t")
    assert "Overrides of every job: `prompt='x | y'`." in md  # outside the table, as it is
    write_job(
        tmp_path, "2_c", ["mode=c", "prompt='a|b'"], ok_record("c", 1, 1.0, 1.0), stages_csv({"s": 1.0}, {})
    )
    md = summary_markdown(summarize(load_sweep(tmp_path)), "t")
    assert "`prompt='a\\|b'`" in md  # inside a table cell


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        # 10 in wide; 1.9 in + 0.45 in per job = 3.7 in tall for 4 jobs; at 110 dpi
        assert img.size == (1100, 407)
        return np.asarray(img.convert("RGB")).astype(int)


def test_write_summary_writes_three_files_atomically_and_a_readable_png(tmp_path):
    written = write_summary(make_sweep(tmp_path))
    assert written == {
        "csv": tmp_path / "sweep_summary.csv",
        "png": tmp_path / "sweep.png",
        "md": tmp_path / "sweep_summary.md",
    }
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    csv = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert list(csv["status"]) == ["ok", "ok", "failed", "missing"]
    assert list(csv["encode_ms"].iloc[:2]) == [60.5, 1234.5]
    assert (
        (tmp_path / "sweep_summary.csv")
        .read_text()
        .splitlines()[1]
        .startswith(
            "0_toy_tiny,mode=tiny model=toy device=cpu,toy,tiny,1,64,bfloat16,120.0,20.0,50.0,180.0,,,10.0,60.5,50.0,"
        )
    )
    px = _png(tmp_path / "sweep.png")
    ink = (px < 235).any(axis=2).mean()
    assert 0.03 < ink < 0.6
    # The first stage is drawn in tab10's first colour (31, 119, 180), the second in its second.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(px - np.array(rgb)).max(axis=2) <= 12).sum() > 100
    assert (tmp_path / "sweep_summary.md").read_text().startswith(f"# Sweep summary: {tmp_path.name}\n")


def test_rewriting_replaces_the_files_and_ignores_them_as_jobs(tmp_path):
    make_sweep(tmp_path)
    write_summary(tmp_path)
    write_summary(tmp_path)
    assert len(pd.read_csv(tmp_path / "sweep_summary.csv")) == 4


def test_a_sweep_where_every_job_failed_still_gets_its_summary(tmp_path):
    failed = {
        "schema_version": 1,
        "status": "interrupted",
        "error": "interrupted by the user",
        "config": {"model": {"name": "toy"}},
    }
    write_job(tmp_path, "0_toy_tiny", ["mode=tiny"], failed)
    write_job(tmp_path, "1_toy_base", ["mode=base"], None)
    write_summary(tmp_path)
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "2 jobs; 1 interrupted, 1 missing." in md
    assert "- **0_toy_tiny** (interrupted): interrupted by the user" in md
    assert "Stage time" not in md
    with Image.open(tmp_path / "sweep.png") as img:
        # 1.9 in + 2 · 0.45 in = 2.8 in is under the 3.2 in minimum; 3.2 · 110 = 352 px
        assert img.size == (1100, 352)


def test_a_broken_stages_csv_is_one_line_user_error(tmp_path):
    write_job(tmp_path, "0_a", ["mode=a"], ok_record("a", 1, 1.0, 1.0), "stage,calls\nload,1\n")
    with pytest.raises(UserError, match=r"0_a/stages.csv: no time_ms column"):
        load_sweep(tmp_path)


def test_the_callback_writes_the_summary_into_the_sweep_dir(tmp_path, capsys):
    make_sweep(tmp_path)
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert {"sweep_summary.md", "sweep_summary.csv", "sweep.png"} <= {p.name for p in tmp_path.iterdir()}
    assert str(tmp_path / "sweep_summary.md") in capsys.readouterr().out


def test_the_callback_reports_an_empty_sweep_dir_in_one_line(tmp_path, capsys):
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    err = capsys.readouterr().err
    assert err.startswith("error: no sweep summary: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_config_registers_the_callback():
    callbacks = compose(["model=deepseek_ocr_tiny"], return_hydra_config=True).hydra.callbacks
    assert [type(instantiate(c)) for c in callbacks.values()] == [SweepSummary]


def test_cli_rebuilds_the_summary_and_prints_it(tmp_path, capsys):
    make_sweep(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "sweep_summary.md").read_text()
    assert (tmp_path / "sweep.png").is_file()


@pytest.mark.parametrize("what", ["nothing", "empty", "run dir"])
def test_cli_refuses_what_is_no_sweep_dir_in_one_line(tmp_path, capsys, what):
    target = tmp_path / "sweep"
    if what == "empty":
        target.mkdir()
    elif what == "run dir":
        target.mkdir()
        (target / "run.json").write_text(json.dumps(ok_record("tiny", 1, 1.0, 1.0)))
    assert main([str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {target}") and err.count("\n") == 1
    assert not (target / "sweep_summary.md").exists()
