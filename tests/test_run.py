"""`python -m llm_perf_opt.run` end to end (tiny model, CPU).

Jobs run in-process on composed configs (`run_job`, or the CLI's `main` with its argv);
a subprocess is used only where it is the point: a real multirun and Ctrl-C.
Every run writes into tmp_path, so nothing is written into the repository.
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import call_main
from omegaconf import OmegaConf
from PIL import Image

from llm_perf_opt import allocator
from llm_perf_opt import run as run_module
from llm_perf_opt.config import compose, validate
from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.host import IN_PROCESS
from llm_perf_opt.models.deepseek_ocr.session import DeepSeekOCRSession
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS
from llm_perf_opt.profiling.os_counters import COUNTERS

TINY = ("model=deepseek_ocr_tiny", "device=cpu", "profiling=quick", "dtype=float32")
STAGES = ["preprocess", "sam", "clip", "projector", "prefill", "decode"]
MEASURED = [
    "stage",
    "calls",
    "repeats",
    "time_ms",
    "time_ms_min",
    "time_ms_max",
    "time_ms_stdev",
    "time_ms_cv_pct",
    "time_ms_p90",
    "outlier_runs",
    "busy_ms",
    "busy_share_pct",
    "launches",
]
OS = [f"{c}{suffix}" for c in COUNTERS for suffix in ("", "_min", "_max")] + ["sys_share_pct"]
ANALYTIC = ["flops", "bytes", "weight_bytes", "act_bytes", "kv_bytes"]
RATES = [
    "intensity",
    "achieved_tflop_s_wall",
    "achieved_gbyte_s_wall",
    "achieved_tflop_s_busy",
    "achieved_gbyte_s_busy",
]
ROOF = ["ridge", "attainable_tflop_s", "roofline_ms", "pct_roof_wall", "pct_roof_busy", "bound"]
SPLIT = ["split_roofline_ms", "above_roof_ms", "host_ms", "unsplit_ms", "overlap_ms"]
CPU_SPLIT = ["split_user_ms", "split_sys_ms", "split_idle_ms"]
DOCUMENTED_KERNEL_COLUMNS = ["stage", "name", "calls", "total_ms"]


def main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return call_main(monkeypatch, capsys, run_module.main, "llm_perf_opt.run", *args)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def small_page(tmp_path_factory) -> Path:
    """A small page: decoding it is cheap, so runs that only test the CLI stay fast."""
    path = tmp_path_factory.mktemp("pages") / "page.png"
    Image.new("RGB", (320, 400), "white").save(path)
    return path


# -- one full job, in-process --------------------------------------------------------------------
ARTIFACTS = (
    "run.json",
    "stages.csv",
    "stages.json",
    "kernels.csv",
    "trace.pt.trace.json",
    "report.md",
    "roofline.png",
)


def run_in(out: Path, *overrides: str) -> tuple[Path, dict]:
    """One job run in-process into `out`: the folder and its run.json."""
    cfg = compose([*TINY, *overrides])
    run_module.run_job(validate(cfg), OmegaConf.to_container(cfg, resolve=True), out)
    return out, json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def gundam_run(tmp_path_factory):
    return run_in(tmp_path_factory.mktemp("gundam") / "run", "mode=gundam", "max_new_tokens=4")


def test_job_writes_every_artifact(gundam_run):
    out, _ = gundam_run
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    assert temp_files(out) == []


def test_stages_csv_joins_measured_time_with_the_analytic_work(gundam_run):
    out, record = gundam_run
    stages = pd.read_csv(out / "stages.csv")
    expected = (
        MEASURED
        + OS
        + ANALYTIC
        + RATES
        + [f"calibrated_{c}" for c in ROOF]
        + ["verdict"]
        + SPLIT
        + CPU_SPLIT
        + ["batch_size"]
    )
    assert list(stages.columns) == expected  # a CPU run has calibrated ceilings only
    assert list(stages["stage"]) == STAGES and set(stages["batch_size"]) == {1}
    calls = dict(zip(stages["stage"], stages["calls"]))
    assert calls == {"preprocess": 1, "sam": 1, "clip": 1, "projector": 1, "prefill": 1, "decode": 3}
    assert (stages["time_ms"] > 0).all() and (stages["busy_ms"] > 0).all() and (stages["launches"] > 0).all()
    assert (stages["time_ms_min"] <= stages["time_ms"]).all() and (
        stages["time_ms"] <= stages["time_ms_max"]
    ).all()
    assert stages["busy_share_pct"].between(0, 100).all()
    assert stages["busy_share_pct"].sum() == pytest.approx(100 * record["trace"]["coverage"], abs=1e-4)
    assert (stages["repeats"] == 1).all() and (stages["outlier_runs"] == 0).all()  # profiling=quick: one run
    assert str(stages["launches"].dtype) == "int64"  # counts written as whole numbers
    rows = stages.set_index("stage")
    assert rows.loc["preprocess", ANALYTIC + RATES].isna().all()  # host work: no model FLOPs
    assert rows.loc["preprocess", "calibrated_bound"] == "unknown"
    analytic = {r["stage"]: r for r in record["analytic"]["stages"] if r["scope"] == "run"}
    for stage in STAGES[1:]:
        row = rows.loc[stage]
        # The join carries the analytic figures of this very run (run.json) into the table.
        assert row["flops"] == pytest.approx(analytic[stage]["useful_flops"])
        assert row["bytes"] == pytest.approx(row["weight_bytes"] + row["act_bytes"] + row["kv_bytes"])
        assert row["bytes"] == pytest.approx(analytic[stage]["bytes"])
        for column in RATES + ["calibrated_pct_roof_wall", "calibrated_roofline_ms"]:
            assert math.isfinite(row[column]) and row[column] > 0, (stage, column)
        assert row["calibrated_bound"] in ("compute", "memory", "balanced")
        # Same work over a shorter time is a higher rate.
        assert (row["achieved_tflop_s_busy"] > row["achieved_tflop_s_wall"]) == (
            row["busy_ms"] < row["time_ms"]
        )
        # The split adds up to the stage's time.
        parts = row["split_roofline_ms"] + row["above_roof_ms"] + row["host_ms"]
        assert parts == pytest.approx(row["time_ms"])
        assert row["verdict"].startswith(f"{stage}: ")
    assert rows.loc["decode", "kv_bytes"] > 0 and rows.loc["sam", "kv_bytes"] == 0


def test_stages_csv_has_each_stages_os_counters_and_their_split(gundam_run):
    out, record = gundam_run
    rows = pd.read_csv(out / "stages.csv").set_index("stage")
    (sample,) = record["timing"]["samples"]
    for stage in STAGES:
        row = rows.loc[stage]
        # One timed run: its median is that run's total over the stage's calls, as run.json keeps them.
        for counter in COUNTERS:
            assert row[counter] == pytest.approx(sum(sample["os"][stage][counter])), (stage, counter)
            assert row[f"{counter}_min"] == row[counter] == row[f"{counter}_max"]
            assert record["timing"]["os_stages"][stage][counter]["median"] == pytest.approx(row[counter])
        assert row["user_ms"] >= 0 and row["sys_ms"] >= 0 and row["minor_faults"] >= 0
        parts = row["split_user_ms"] + row["split_sys_ms"] + row["split_idle_ms"]
        assert parts == pytest.approx(row["time_ms"])
    # SAM computes for tens of ms on the CPU: its CPU time is there, and is about its time or more.
    assert rows.loc["sam", "user_ms"] + rows.loc["sam", "sys_ms"] > 0.3 * rows.loc["sam", "time_ms"]
    assert rows.loc["sam", "voluntary_switches"] + rows.loc["sam", "involuntary_switches"] >= 0
    text = (out / "report.md").read_text()
    assert "## What the OS did in each stage" in text and "| sys % of CPU |" in text


def test_stages_json_and_the_headline(gundam_run):
    out, record = gundam_run
    data = json.loads((out / "stages.json").read_text())
    assert [s["stage"] for s in data["stages"]] == STAGES
    assert [r["label"] for r in data["roofs"]] == ["calibrated"]
    headline = record["headline"]
    assert headline == data["headline"]
    assert headline["tpot_ms"] == pytest.approx(record["timing"]["summary"]["tpot_ms"]["median"])
    assert set(headline["flop_utilisation_pct"]) == {"vision", "prefill"}
    assert set(headline["bandwidth_utilisation_pct"]) == {"decode"}
    for group in headline["flop_utilisation_pct"].values():
        assert 0 < group["calibrated"]["wall"] < 100
    # Every group is judged against the roof that binds it, named, as in report.md.
    assert set(headline["roof_utilisation_pct"]) == {"vision", "prefill", "decode"}
    report = (out / "report.md").read_text()
    for roofs in headline["roof_utilisation_pct"].values():
        binding = roofs["calibrated"]
        assert binding["bound"] in ("compute", "memory", "balanced")
        roof = {"compute": "FLOP/s roof", "memory": "bandwidth roof", "balanced": "roofline"}[
            binding["bound"]
        ]
        assert f"{binding['bound']}" in report and f"{binding['wall']:.1f}%" in report and roof in report
    hardware = record["hardware"]
    assert hardware["datasheet"] is None and hardware["matched"] == "cpu"
    assert hardware["calibration"]["flop_s"]["float32"] > 0


def test_roofline_png(gundam_run):
    out, _ = gundam_run
    with Image.open(out / "roofline.png") as png:
        assert png.format == "PNG"
        width, height = png.size
        assert 800 <= width <= 2000 and 500 <= height <= 1500
        assert len(png.convert("L").getcolors(maxcolors=1 << 16) or []) > 10  # not a blank picture


def test_module_granularity_adds_a_row_per_module_range(tmp_path):
    out = tmp_path / "run"
    cfg = compose([*TINY, "mode=tiny", "max_new_tokens=2", "profiling.granularity=module"])
    run_module.run_job(validate(cfg), OmegaConf.to_container(cfg, resolve=True), out)
    stages = pd.read_csv(out / "stages.csv").set_index("stage")
    families = [name for name in stages.index if "/" in name]
    assert {"sam/attn", "sam/mlp", "clip/attn", "prefill/moe", "decode/lm_head"} <= set(families)
    for name in families:  # measured by the trace only: busy time, analytic work, no stage time
        row = stages.loc[name]
        assert row["busy_ms"] > 0 and pd.isna(row["time_ms"]) and row["bytes"] > 0
        assert row["busy_ms"] <= stages.loc[name.split("/")[0], "busy_ms"]
    # Each family row follows its stage.
    order = list(stages.index)
    assert all(order.index(name) > order.index(name.split("/")[0]) for name in families)


def test_kernels_csv(gundam_run):
    out, _ = gundam_run
    kernels = pd.read_csv(out / "kernels.csv")
    assert list(kernels.columns) == DOCUMENTED_KERNEL_COLUMNS == list(KERNEL_COLUMNS)
    assert set(kernels["stage"]) >= set(STAGES)  # every stage ran some op
    assert (kernels["calls"] > 0).all() and (kernels["total_ms"] >= 0).all()


def test_run_json(gundam_run):
    _, record = gundam_run
    assert record["status"] == "ok" and record["error"] is None
    assert record["mode"]["name"] == "gundam"
    assert record["config"]["max_new_tokens"] == 4
    assert record["device"]["type"] == "cpu"
    assert (record["dtype"], record["dtype_reason"]) == ("float32", "requested")
    assert record["weights"] == "dummy"
    # Sample page 1191×1684 in gundam mode: 2×3 tiles of 640 plus a 1024 global view:
    # global 16×(16+1)+1 = 273, tiles (3·10)×(2·10+1) = 630, together 903 image tokens.
    assert record["image"]["size"] == [1191, 1684]
    assert record["tiles"] == {"cols": 2, "rows": 3, "count": 6}
    tokens = record["tokens"]
    assert tokens["image"] == 903
    assert tokens["prompt"] == tokens["image"] + tokens["text"] and tokens["text"] > 0
    assert record["generated_tokens"] == 4
    assert record["schema_version"] == 1
    # Run in-process: the test process's own allocator, recorded as such, and its threads.
    cpu = record["cpu"]
    assert (cpu["allocator"], cpu["applied"]) == ("tuned", IN_PROCESS)
    assert cpu["in_force"] == allocator.in_force(os.environ)
    assert cpu["threads"] == record["device"]["threads"] >= 1


def test_run_json_names_the_commit_of_the_code_that_ran(gundam_run):
    _, record = gundam_run
    repo = Path(run_module.__file__).parent
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        pytest.skip("the package is not in a git checkout here")
    assert record["versions"]["git_commit"] == head.stdout.strip()
    assert isinstance(record["versions"]["git_dirty"], bool)


def test_run_json_keeps_raw_samples_memory_routing_and_trace(gundam_run):
    out, record = gundam_run
    (sample,) = record["timing"]["samples"]
    assert set(sample["stages"]) == set(STAGES)
    assert len(sample["stages"]["decode"]) == 3
    assert sample["e2e_ms"] >= sample["ttft_ms"] > 0
    assert sample["tpot_ms"] == pytest.approx((sample["e2e_ms"] - sample["ttft_ms"]) / 3)
    assert record["timing"]["summary"]["e2e_ms"]["median"] == pytest.approx(sample["e2e_ms"])

    measured = record["memory"]["measured"]
    # Two sources (getrusage, /proc/self/statm) that count resident pages a little differently.
    assert measured["timed_rss_peak_bytes"] > 0
    assert measured["peak_rss_bytes"] >= 0.95 * measured["timed_rss_peak_bytes"]
    assert set(measured["sources"]) == {"peak_rss_bytes", "timed_rss_peak_bytes"}
    analytic = record["memory"]["analytic"]
    # The tiny model's KV cache: 3 layers × K and V × 128 wide × 4 bytes (fp32) per position,
    # for the S + max_new_tokens positions the session allocates.
    assert analytic["kv_bytes_per_token"] == 3 * 2 * 128 * 4
    assert analytic["kv_cache_bytes"] == analytic["kv_bytes_per_token"] * (record["tokens"]["prompt"] + 4)

    routing = record["routing"]
    k = record["config"]["model"]["arch"]["lm"]["num_experts_per_tok"]
    assert routing["prefill"]["calls"] == 1 and routing["decode"]["calls"] == 3
    assert all(
        sum(layer) == record["tokens"]["prompt"] * k for layer in routing["prefill"]["tokens_per_expert"]
    )
    assert all(sum(layer) == 3 * k for layer in routing["decode"]["tokens_per_expert"])

    trace = record["trace"]
    assert trace["path"] == "trace.pt.trace.json" and trace["basis"] == "cpu"
    assert trace["coverage"] >= 0.99
    events = json.loads((out / "trace.pt.trace.json").read_text())["traceEvents"]
    ranges = [e["name"] for e in events if e.get("cat") == "user_annotation"]
    assert ranges.count("decode") == 3 and ranges.count("prefill") == 1


def test_run_json_analytic_uses_the_observed_routing(gundam_run):
    _, record = gundam_run
    analytic = record["analytic"]
    assert "useful FLOPs" in analytic["note"]
    assert {f["stage"] for f in analytic["families"]} >= set(STAGES[1:])
    experts = analytic["experts"]
    assert {e["scope"] for e in experts} == {"prefill", "decode_step", "decode_run"}
    observed = {(e["layer"], e["scope"]): e["observed_distinct"] for e in experts}
    layers = sorted({e["layer"] for e in experts})
    for slot, counts in enumerate(record["routing"]["prefill"]["tokens_per_expert"]):
        assert observed[(layers[slot], "prefill")] == sum(c > 0 for c in counts)


def test_report_md(gundam_run):
    out, _ = gundam_run
    text = (out / "report.md").read_text()
    assert text.startswith("# deepseek_ocr_tiny · ")
    assert "mode gundam" in text and "903 image" in text and "generated 4 tokens" in text
    assert "dtype float32 (requested)" in text
    assert "memory, measured: peak rss" in text and "KV cache" in text
    assert "calibrated ceilings: " in text and "datasheet: none (cpu)" in text
    for section in (
        "## Headline",
        "## Stages against the roofline",
        "## Where each stage's time goes",
        "## Verdicts",
        "## Top ops per stage",
    ):
        assert section in text
    assert "![roofline](roofline.png)" in text
    assert "`achieved_*_busy`" in text  # the time bases are explained
    verdicts = text.split("## Verdicts")[1].split("##")[0]
    assert [line.split(":")[0] for line in verdicts.split("\n") if line.startswith("- ")] == [
        f"- {s}" for s in STAGES
    ]


def test_a_fast_job_records_its_paths_and_reports_their_bytes(tmp_path, gundam_run):
    """model.impl=fast: run.json and report.md say which paths ran, and the analytic SAM bytes
    are those of the blocked attention (no copy of the bias), not the reference's."""
    _, reference = gundam_run
    out = tmp_path / "fast"
    cfg = compose([*TINY, "mode=gundam", "max_new_tokens=4", "model.impl=fast", "profiling.trace=false"])
    run_module.run_job(validate(cfg), OmegaConf.to_container(cfg, resolve=True), out)
    record = json.loads((out / "run.json").read_text())
    assert reference["execution"]["impl"] == "reference" and reference["execution"]["paths"] is None
    execution = record["execution"]
    assert execution["impl"] == "fast" and execution["paths"]["sam_attention"] == "blocked"
    assert execution["kv_cache_positions"] == record["tokens"]["prompt"] + 4
    assert "implementation: model.impl=fast: SAM attention blocked" in (out / "report.md").read_text()

    def analytic(rec: dict, stage: str) -> dict:
        return next(
            row for row in rec["analytic"]["stages"] if row["stage"] == stage and row["scope"] == "run"
        )

    # Same page, same work: the FLOPs agree and the bias copy is gone from SAM's bytes.
    fast_sam, ref_sam = analytic(record, "sam"), analytic(reference, "sam")
    assert fast_sam["matmul_flops"] == ref_sam["matmul_flops"]
    assert fast_sam["act_write_bytes"] < ref_sam["act_write_bytes"]
    memory = record["memory"]["analytic"]["stages"]
    assert "tile" in next(row["transient"] for row in memory if row["stage"] == "sam")


# -- the CLI, in-process -------------------------------------------------------------------------
def test_cli_runs_a_job_and_prints_where(monkeypatch, capsys, tmp_path, small_page):
    out = tmp_path / "run"
    code, stdout, stderr = main(
        monkeypatch,
        capsys,
        *TINY,
        "mode=tiny",
        "max_new_tokens=2",
        "profiling.trace=false",
        f"image={small_page}",
        f"hydra.run.dir={out}",
    )
    assert code == 0, stderr
    assert str(out) in stdout and "TPOT ms" in stdout
    assert "dtype float32 (requested)" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "ok"
    # run.log keeps what the console showed, stdout's and stderr's lines alike, each with its level.
    log = (out / "run.log").read_text()
    assert "][INFO] [deepseek_ocr_tiny] cpu · dtype float32 (requested)" in log
    assert f"][INFO] [deepseek_ocr_tiny] {out}\n" in log and "TPOT ms" in log


def test_profiler_options_reach_the_trace(monkeypatch, capsys, tmp_path, small_page):
    out = tmp_path / "run"
    code, _, stderr = main(
        monkeypatch,
        capsys,
        *TINY,
        "mode=tiny",
        "max_new_tokens=2",
        f"image={small_page}",
        "profiling.record_shapes=true",
        "profiling.with_stack=true",
        f"hydra.run.dir={out}",
    )
    assert code == 0, stderr
    events = json.loads((out / "trace.pt.trace.json").read_text())["traceEvents"]
    assert any("Input Dims" in e.get("args", {}) for e in events if e.get("cat") == "cpu_op")
    assert any(e.get("cat") == "python_function" for e in events)
    assert not any(e.get("name") == "[memory]" for e in events)  # profile_memory stayed off
    # The stack events are no ops: every stage still gets its op time.
    stages = pd.read_csv(out / "stages.csv").set_index("stage")
    assert (stages["busy_ms"] > 0).all()


def test_image_paths_with_spaces_and_non_ascii_work_as_typed(monkeypatch, capsys, tmp_path, small_page):
    page = tmp_path / "página 1 文档.png"
    page.write_bytes(small_page.read_bytes())
    for n, image in enumerate((f"image={page}", f"image='{page}'")):  # as typed, and quoted for Hydra
        out = tmp_path / f"run{n}"
        code, _, stderr = main(
            monkeypatch,
            capsys,
            *TINY,
            "mode=tiny",
            "max_new_tokens=1",
            "profiling.trace=false",
            image,
            f"hydra.run.dir={out}",
        )
        assert code == 0, stderr
        assert json.loads((out / "run.json").read_text())["image"]["path"] == str(page)


def one_error(code: int, stderr: str) -> str:
    assert code != 0
    assert "Traceback" not in stderr, stderr
    (line,) = error_lines(stderr)
    return line


def test_missing_image_is_one_line_and_recorded(monkeypatch, capsys, tmp_path):
    out, missing = tmp_path / "run", tmp_path / "nope.png"
    line = one_error(*main(monkeypatch, capsys, *TINY, f"image={missing}", f"hydra.run.dir={out}")[::2])
    assert str(missing) in line and "not found" in line
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == line.removeprefix("error: ")
    assert not (out / "stages.csv").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["mode=huge"], ["mode/huge", "gundam"]),
        (["-m", "mode=tiny,huge"], ["mode/huge", "gundam"]),
        (["model=gpt5"], ["model/gpt5", "deepseek_ocr_tiny"]),
        (["max_new_tokens=abc"], ["max_new_tokens"]),
        (["-m", "max_new_tokens=2,0"], ["max_new_tokens must be >= 1"]),
        (["cpu.allocator=glibc"], ["cpu.allocator='glibc' is not one of tuned, system"]),
        (["cpu.threads=0"], ["cpu.threads must be >= 1"]),
    ],
)
def test_config_mistakes_are_one_line_before_anything_runs(monkeypatch, capsys, tmp_path, args, fragments):
    flags, overrides = [a for a in args if a == "-m"], [a for a in args if a != "-m"]
    code, _, stderr = main(
        monkeypatch,
        capsys,
        *flags,
        *TINY,
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    )
    line = one_error(code, stderr)
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "multi").exists()


def test_an_output_folder_under_a_file_is_one_line(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, stderr = main(monkeypatch, capsys, *TINY, f"hydra.run.dir={blocker / 'run'}")
    assert "is a file" in one_error(code, stderr)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_cannot_be_made_is_one_line(monkeypatch, capsys):
    code, _, stderr = main(monkeypatch, capsys, *TINY, "hydra.run.dir=/proc/nope")
    assert "output folder /proc/nope cannot be created in /proc" in one_error(code, stderr)


def test_too_many_new_tokens_is_one_line_before_the_model_is_built(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = main(
        monkeypatch, capsys, *TINY, "mode=tiny", "max_new_tokens=9000", f"hydra.run.dir={out}"
    )
    line = one_error(code, stderr)
    # tiny mode: 73 image tokens + the prompt's text tokens; 8192 positions in all.
    assert "context window of 8192" in line and "max_new_tokens <= " in line
    assert "dtype" not in stderr.split("error:")[0]  # failed before the header that precedes the build
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_not_enough_memory_is_one_line_naming_the_figures(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(run_module, "available_memory_bytes", lambda device: 2 * 10**9)
    code, _, stderr = main(
        monkeypatch,
        capsys,
        "device=cpu",
        "dtype=float32",
        "profiling=quick",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    line = one_error(code, stderr)
    # The full model in fp32: 3,336,106,240 parameters × 4 bytes = 13.3 GB of weights.
    assert "not enough memory for deepseek_ocr in float32" in line
    assert "13.3 GB weights" in line and "2.0 GB available" in line and "dtype=bfloat16" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, stderr = main(
        monkeypatch,
        capsys,
        "model=deepseek_ocr_tiny",
        "profiling=quick",
        "device=cuda",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "no CUDA GPU" in one_error(code, stderr)


# -- real processes: a multirun, and Ctrl-C ---------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)  # it would turn the one-line errors into tracebacks
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread: these runs test behaviour, not speed, and on a machine whose cores
    # are shared with other work, multi-threaded CPU ops stall at every barrier.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_multirun_over_modes_records_a_failed_job_and_runs_the_others(tmp_path, small_page):
    sweep, missing = tmp_path / "multi", tmp_path / "missing.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_perf_opt.run",
            "-m",
            *TINY,
            "mode=tiny,base",
            "max_new_tokens=2",
            "profiling.trace=false",
            f"image={small_page},{missing}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    assert [p.name for p in jobs] == [
        "0_deepseek_ocr_tiny_tiny",
        "1_deepseek_ocr_tiny_tiny",
        "2_deepseek_ocr_tiny_base",
        "3_deepseek_ocr_tiny_base",
    ]
    records = [json.loads((job / "run.json").read_text()) for job in jobs]
    assert [r["status"] for r in records] == ["ok", "failed", "ok", "failed"]
    assert [r["mode"]["name"] for r in records[::2]] == ["tiny", "base"]
    assert records[0]["tokens"]["image"] < records[2]["tokens"]["image"]
    for failed, job in zip(records[1::2], jobs[1::2]):
        assert str(missing) in failed["error"] and "\n" not in failed["error"]
        assert not (job / "stages.csv").exists()
    assert error_lines(proc.stderr) == [f"error: {r['error']}" for r in records[1::2]]
    assert not (tmp_path / "outputs").exists()


def _default_sigint() -> None:
    # A parent started in the background may ignore SIGINT, and an ignored signal stays
    # ignored across exec: give the CLI the default, so Python turns it into KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended early (rc {proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out after {timeout} s")
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("signum", "code", "cause"),
    [(signal.SIGINT, 130, "interrupted by the user"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupt_records_the_job_and_leaves_no_partial_artifacts(tmp_path, small_page, signum, code, cause):
    # SIGTERM is what SLURM, CI runners and `timeout` send: handled as Ctrl-C is.
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm_perf_opt.run",
            *TINY,
            "mode=tiny",
            "max_new_tokens=2",
            "profiling.repeats=1000",
            f"image={small_page}",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
        start_new_session=True,  # its own process group, to see that no child outlives it
    )
    try:
        # Hydra writes .hydra/ and opens run.log just before it calls the job; give the job
        # time to reach the timed repeats (model built, routing recorded), then press Ctrl-C.
        _wait_for(
            lambda: (out / ".hydra" / "overrides.yaml").is_file() and (out / "run.log").is_file(),
            proc,
            timeout=180,
        )
        time.sleep(3)
        assert proc.poll() is None, "1000 repeats should still be running"
        sent = time.monotonic()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code
    assert took < 60, f"{took:.0f} s to stop"  # a bound on a hang, not a timing figure
    with pytest.raises(ProcessLookupError):  # nothing of the group is left running
        os.killpg(proc.pid, 0)
    assert "Traceback" not in stderr, stderr
    assert "interrupted" in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["error"] == cause
    for name in (
        "stages.csv",
        "stages.json",
        "kernels.csv",
        "trace.pt.trace.json",
        "report.md",
        "roofline.png",
    ):
        assert not (out / name).exists(), name
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_while_hydra_composes_is_one_line(tmp_path, small_page, signum, code):
    # The signal is sent by the process to itself from inside Hydra's compose, so it lands
    # there at once, whatever the machine's speed.
    script = (
        "import os, sys\n"
        "import hydra._internal.config_loader_impl as loader\n"
        "from llm_perf_opt import run\n"
        "compose = loader.ConfigLoaderImpl.load_configuration\n"
        "def signalled(*args, **kwargs):\n"
        f"    os.kill(os.getpid(), {int(signum)})\n"
        "    return compose(*args, **kwargs)\n"
        "loader.ConfigLoaderImpl.load_configuration = signalled\n"
        "run.main()\n"
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", script, *TINY, f"image={small_page}", f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_default_sigint,
    )
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines() == [
        ("interrupted by the user" if signum == signal.SIGINT else "terminated (SIGTERM)")
        + ": no job started"
    ], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_command_imports_is_one_line(tmp_path, signum, code):
    # `python -m llm_perf_opt.run`, signalled by an import hook the moment it imports torch: the
    # seconds before main() runs, where Python's own handler would print a traceback.
    script = (
        "import importlib.abc, os, runpy, sys\n"
        "class Signal(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == 'torch': os.kill(os.getpid(), {int(signum)})\n"
        "sys.meta_path.insert(0, Signal())\n"
        "runpy.run_module('llm_perf_opt.run', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_default_sigint,
    )
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines() == [
        ("interrupted by the user" if signum == signal.SIGINT else "terminated (SIGTERM)")
        + ": no job started"
    ], proc.stderr
    assert not (tmp_path / "run").exists()


def _file_size_limit() -> None:
    # 512 KiB: Hydra's own files (a few KiB) and run.json fit, the trace (about 1 MB) does not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))


def test_the_file_size_limit_is_one_line_and_run_json_records_it(tmp_path, small_page):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_perf_opt.run", *TINY, "mode=tiny", "max_new_tokens=2"]
        + ["profiling.repeats=1", "profiling.trace=true", f"image={small_page}", f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    message = f"the file-size limit (ulimit -f: {512 << 10} bytes) was reached writing {out / 'trace.pt.trace.json'}"
    assert error_lines(proc.stderr) == [f"error: {message}"]
    record = json.loads((out / "run.json").read_text())
    assert (record["status"], record["error"]) == ("failed", message)
    assert temp_files(tmp_path) == []


def test_a_run_json_the_full_disk_cannot_take_is_one_more_line(tmp_path, monkeypatch, caplog):
    def full(out_dir, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "run.json"))

    monkeypatch.setattr(run_module, "write_failure", full)
    with caplog.at_level("ERROR"):
        run_module._fail(tmp_path, {}, "failed", "why")
    assert [r.getMessage() for r in caplog.records] == [
        "error: run.json could not record it either: the disk is full writing "
        f"{tmp_path / 'run.json'} (No space left on device)"
    ]


def test_the_models_op_notes_name_ops_that_ran(gundam_run):
    # DeepSeek-OCR's reference says what SAM's copy_ and add are; both ops ran in SAM's range.
    out, record = gundam_run
    notes = record["op_notes"]
    assert [note["stage"] for note in notes] == ["sam"]
    kernels = pd.read_csv(out / "kernels.csv")
    sam_ops = set(kernels.loc[kernels["stage"].str.split("/").str[0] == "sam", "name"])
    assert set(notes[0]["ops"]) <= sam_ops


# -- batches ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page_dir(tmp_path_factory) -> Path:
    """Four pages whose gundam tilings differ, so their prompts differ in length."""
    folder = tmp_path_factory.mktemp("batch_pages")
    for i, size in enumerate(((800, 1000), (1400, 600), (640, 640), (1000, 1800))):
        Image.new("RGB", size, (255, 255 - 30 * i, 230)).save(folder / f"page{i}.png")
    return folder


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, page_dir):
    out = tmp_path_factory.mktemp("batch") / "run"
    return run_in(out, "mode=gundam", "batch_size=4", f"images={page_dir}", "max_new_tokens=3")


def test_a_batch_job_writes_every_artifact_with_per_page_tokens(batch_run):
    out, record = batch_run
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    pages = record["pages"]
    assert [Path(p["image"]["path"]).name for p in pages] == [f"page{i}.png" for i in range(4)]
    image = [p["tokens"]["image"] for p in pages]
    assert len(set(image)) == 4 and record["tokens"]["image_per_page"] == image
    longest = max(p["tokens"]["prompt"] for p in pages)
    assert record["batch"] == {
        "size": 4,
        "padding": "left",
        "pads": [longest - p["tokens"]["prompt"] for p in pages],
        "padded_prompt_tokens": longest,
    }
    assert record["generated_tokens"] == 4 * 3  # dummy weights: no sequence stops early


def test_a_batch_job_reports_its_throughput(batch_run):
    out, record = batch_run
    sample = record["timing"]["samples"][0]
    assert sample["pages"] == 4 and sample["generated_tokens"] == 12 and sample["decode_tokens"] == 8
    head = record["headline"]
    assert head["pages_per_s"] == pytest.approx(4e3 / head["e2e_ms"])
    assert head["tokens_per_s"] == pytest.approx(12e3 / head["e2e_ms"])
    # Two decode steps of four sequences: 8 tokens in the decode time.
    assert head["decode_tokens_per_s"] == pytest.approx(8e3 / (head["e2e_ms"] - head["ttft_ms"]))
    assert set(pd.read_csv(out / "stages.csv")["batch_size"]) == {4}
    report = (out / "report.md").read_text()
    assert (
        "batch of 4 pages" in report
        and "pages/s" in report
        and "FLOP/B against the calibrated ridge" in report
    )


def test_a_batch_job_counts_every_sequence_but_reads_weights_once(batch_run, gundam_run):
    _, batch = batch_run
    _, single = gundam_run

    def lm_head(record):
        return next(
            f
            for f in record["analytic"]["families"]
            if (f["stage"], f["scope"], f["family"]) == ("prefill", "run", "lm_head")
        )

    # One lm_head row per sequence's last position; its weights read once.
    assert lm_head(batch)["matmul_flops"] == 4 * lm_head(single)["matmul_flops"]
    assert lm_head(batch)["weight_bytes"] == lm_head(single)["weight_bytes"]
    # Prefill writes the KV cache of four padded prompts.
    prefill = next(r for r in batch["analytic"]["stages"] if (r["stage"], r["scope"]) == ("prefill", "run"))
    per_token = batch["memory"]["analytic"]["kv_bytes_per_token"]
    assert prefill["kv_write_bytes"] == 4 * batch["batch"]["padded_prompt_tokens"] * per_token


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["batch_size=0"], "batch_size must be >= 1, got 0"),
        (["batch_size=-1"], "batch_size must be >= 1, got -1"),
        (["images={empty}"], "the directory holds no image"),
        (["images={mixed}"], "notes.txt is not an image file"),
        (["images={pages}", "image={pages}/page0.png"], "not both"),
        (["images={pages}/*.jpg"], "no file matches"),
    ],
)
def test_bad_batch_input_is_one_line_and_leaves_nothing(
    monkeypatch, capsys, tmp_path, page_dir, args, fragment
):
    empty, mixed = tmp_path / "empty", tmp_path / "mixed"
    empty.mkdir(), mixed.mkdir()
    (mixed / "page.png").write_bytes((page_dir / "page0.png").read_bytes())
    (mixed / "notes.txt").write_text("not a page")
    args = [a.format(empty=empty, mixed=mixed, pages=page_dir) for a in args]
    out = tmp_path / "run"
    code, _, stderr = main(monkeypatch, capsys, *TINY, *args, f"hydra.run.dir={out}")
    assert fragment in one_error(code, stderr)
    assert not out.exists()


def test_a_batch_that_cannot_fit_names_the_largest_that_would(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(run_module, "available_memory_bytes", lambda device: 10**9)
    code, _, stderr = main(
        monkeypatch, capsys, *TINY, "mode=gundam", "batch_size=64", f"hydra.run.dir={tmp_path / 'r'}"
    )
    line = one_error(code, stderr)
    assert "not enough memory for deepseek_ocr_tiny at batch 64" in line and "KV cache" in line
    largest = int(line.split("batch_size<=")[1].split()[0])
    assert 1 <= largest < 64


def test_a_huge_batch_is_refused_before_its_pages_are_prepared(monkeypatch, capsys, tmp_path):
    # Preparing the batch would allocate every page's pixels: the refusal must come first.
    monkeypatch.setattr(run_module, "available_memory_bytes", lambda device: 8 * 10**9)

    def prepared(self, images, prompt):
        raise UserError("the batch was prepared")

    monkeypatch.setattr(DeepSeekOCRSession, "prepare_batch", prepared)

    def refusal(batch: int) -> str:
        out = f"hydra.run.dir={tmp_path / str(batch)}"
        return one_error(*main(monkeypatch, capsys, *TINY, "mode=base", f"batch_size={batch}", out)[::2])

    line = refusal(100_000)
    assert "not enough memory for deepseek_ocr_tiny at batch 100000" in line
    # base mode: one 3 x 1024 x 1024 float32 global view a page, held twice (the page's, the
    # stacked batch's): 2516.6 GB at 100000 pages, plus under 1 GB of token ids.
    pixels = float(line.split(" GB the pages' pixels and ids")[0].rsplit(" ", 1)[1])
    assert 2 * 3 * 1024 * 1024 * 4 * 100_000 / 1e9 <= pixels < 2517.6
    largest = int(line.split("batch_size<=")[1].split()[0])
    assert 1 < largest < 100_000
    assert refusal(largest) == "error: the batch was prepared"  # the batch it names passes
    assert "not enough memory" in refusal(largest + 1)


def test_largest_batch_fits_and_one_more_does_not():
    weights, per_page, available = 10_000, 1_234, 50_000
    n = run_module.largest_batch(64, weights, 64 * per_page, available)
    assert weights + n * per_page <= available < weights + (n + 1) * per_page
    assert run_module.largest_batch(8, weights, 8 * per_page, 10**9) == 8
    assert run_module.largest_batch(8, 60_000, 8 * per_page, available) == 0


def test_a_batch_sweep_plots_throughput_against_latency(tmp_path):
    sweep = tmp_path / "multi"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_perf_opt.run",
            "-m",
            *TINY,
            "mode=tiny",
            "batch_size=1,2",
            "max_new_tokens=3",
            "profiling.trace=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = (sweep / "sweep_summary.md").read_text()
    assert "## Batch: throughput against latency" in summary and "![throughput against latency]" in summary
    assert "- predicted: decode step at batch 2" in summary and "- measured: TPOT" in summary
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert list(table["batch_size"]) == [1, 2]
    with Image.open(sweep / "throughput.png") as png:
        assert png.size[0] > 1000
