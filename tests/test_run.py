"""`python -m llm_perf_opt.run` end to end, as a user runs it (tiny model, CPU).

Every run overrides hydra.run.dir / hydra.sweep.dir into tmp_path and runs with
cwd=tmp_path, so nothing is written into the repository.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from llm_perf_opt.config import CONF_DIR
from llm_perf_opt.models.deepseek_ocr.tokenizer import build_input_ids, load_tokenizer
from llm_perf_opt.profiling.attribution import KERNEL_COLUMNS
from llm_perf_opt.profiling.ranges import STAGES
from llm_perf_opt.report.run_report import STAGE_COLUMNS

TINY = ("model=deepseek_ocr_tiny", "device=cpu", "profiling=quick")
TIMEOUT_S = 600
DOCUMENTED_STAGE_COLUMNS = [
    "stage", "calls", "time_ms", "time_ms_min", "time_ms_max", "busy_ms", "share",
    "gflop", "gbyte", "achieved_tflop_s", "achieved_gbyte_s",
]
DOCUMENTED_KERNEL_COLUMNS = ["stage", "name", "calls", "total_ms"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)  # it would turn the one-line errors into tracebacks
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread: these runs test behaviour, not speed, and on a machine whose cores
    # are shared with other work, multi-threaded CPU ops stall at every barrier (runs ~10x slower).
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _default_sigint() -> None:
    # A parent started in the background may ignore SIGINT, and an ignored signal stays
    # ignored across exec: give the CLI the default, so Python turns it into KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*overrides: str, cwd: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_perf_opt.run", *overrides],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def small_page(tmp_path_factory) -> Path:
    """A small page: decoding it is cheap, so runs that only test the CLI stay fast."""
    path = tmp_path_factory.mktemp("pages") / "page.png"
    Image.new("RGB", (320, 400), "white").save(path)
    return path


# -- one full job ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gundam_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gundam")
    out = tmp / "run"
    proc = cli(*TINY, "mode=gundam", "max_new_tokens=4", f"hydra.run.dir={out}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return proc, out, json.loads((out / "run.json").read_text())


def test_job_writes_every_artifact(gundam_run):
    proc, out, _ = gundam_run
    for name in ("run.json", "stages.csv", "kernels.csv", "trace.json", "report.md"):
        assert (out / name).is_file(), name
    assert temp_files(out) == []
    assert not (out.parent / "outputs").exists()  # the overridden run dir is the only output
    no_traceback(proc)
    assert str(out) in proc.stdout  # the compact table names the run dir


def test_stages_csv(gundam_run):
    _, out, record = gundam_run
    stages = pd.read_csv(out / "stages.csv")
    assert list(stages.columns) == DOCUMENTED_STAGE_COLUMNS == STAGE_COLUMNS
    assert list(stages["stage"]) == list(STAGES)
    calls = dict(zip(stages["stage"], stages["calls"]))
    assert calls == {"preprocess": 1, "sam": 1, "clip": 1, "projector": 1, "prefill": 1, "decode": 3}
    assert (stages["time_ms"] > 0).all()
    assert (stages["time_ms_min"] <= stages["time_ms"]).all()
    assert (stages["time_ms"] <= stages["time_ms_max"]).all()
    assert (stages["busy_ms"] > 0).all()
    assert stages["share"].between(0, 1).all()
    assert stages["share"].sum() == pytest.approx(record["trace"]["coverage"], abs=1e-6)
    # The analytic join: preprocessing has no model FLOPs; every model stage has its run's
    # useful FLOPs from run.json, and throughput = work / busy time.
    rows = stages.set_index("stage")
    assert rows.loc["preprocess", ["gflop", "achieved_tflop_s"]].isna().all()
    analytic = {r["stage"]: r for r in record["analytic"]["stages"] if r["scope"] == "run"}
    for stage in ("sam", "clip", "projector", "prefill", "decode"):
        assert rows.loc[stage, "gflop"] == pytest.approx(analytic[stage]["useful_flops"] / 1e9)
        assert rows.loc[stage, "gbyte"] == pytest.approx(analytic[stage]["bytes"] / 1e9)
        assert rows.loc[stage, "achieved_tflop_s"] == pytest.approx(
            rows.loc[stage, "gflop"] / rows.loc[stage, "busy_ms"]
        )


def test_kernels_csv(gundam_run):
    _, out, _ = gundam_run
    kernels = pd.read_csv(out / "kernels.csv")
    assert list(kernels.columns) == DOCUMENTED_KERNEL_COLUMNS == list(KERNEL_COLUMNS)
    assert len(kernels) > 0
    assert set(kernels["stage"]) >= set(STAGES)  # every stage ran some op
    assert (kernels["calls"] > 0).all() and (kernels["total_ms"] >= 0).all()


def test_run_json(gundam_run):
    _, out, record = gundam_run
    assert record["status"] == "ok" and record["error"] is None
    assert record["mode"]["name"] == "gundam"
    assert record["config"]["max_new_tokens"] == 4
    assert record["device"]["type"] == "cpu"
    assert record["weights"] == "dummy"
    # Sample page 1191×1684 in gundam mode: 2×3 tiles of 640 plus a 1024 global view.
    assert record["image"]["size"] == [1191, 1684]
    assert record["tiles"] == {"cols": 2, "rows": 3, "count": 6}
    tokens = record["tokens"]
    assert tokens["image"] == 903
    prompt = OmegaConf.load(CONF_DIR / "config.yaml").prompt
    text_tokens = len(build_input_ids(load_tokenizer(None), prompt, 1)) - 1
    assert text_tokens > 0
    assert tokens["prompt"] == tokens["image"] + text_tokens
    assert tokens["generated"] == 4


def test_run_json_keeps_raw_samples_routing_and_trace(gundam_run):
    _, out, record = gundam_run
    samples = record["timing"]["samples"]
    assert len(samples) == record["config"]["profiling"]["repeats"] == 1
    (sample,) = samples
    assert set(sample["stages"]) == set(STAGES)
    assert len(sample["stages"]["decode"]) == 3
    assert sample["e2e_ms"] >= sample["ttft_ms"] > 0
    assert record["timing"]["summary"]["e2e_ms"]["median"] == pytest.approx(sample["e2e_ms"])

    routing = record["routing"]
    k = record["config"]["model"]["arch"]["lm"]["num_experts_per_tok"]
    assert routing["decode_steps"] == 3
    assert len(routing["prefill"]) == len(routing["decode_sum"]) >= 1
    assert all(sum(layer) == record["tokens"]["prompt"] * k for layer in routing["prefill"])
    assert all(sum(layer) == 3 * k for layer in routing["decode_sum"])

    trace = record["trace"]
    assert trace["path"] == "trace.json"
    assert trace["coverage"] >= 0.99
    assert trace["basis"] == "cpu"
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    ranges = [e["name"] for e in events if e.get("cat") == "user_annotation"]
    assert ranges.count("decode") == 3 and ranges.count("prefill") == 1


def test_report_md(gundam_run):
    _, out, _ = gundam_run
    text = (out / "report.md").read_text()
    assert "deepseek_ocr_tiny" in text and "gundam" in text
    assert "image 903" in text and "generated 4" in text


# -- multirun -------------------------------------------------------------------------------
def test_multirun_over_modes(tmp_path):
    sweep = tmp_path / "multi"
    proc = cli("-m", *TINY, "mode=tiny,base", "max_new_tokens=2", "profiling.trace=false",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_deepseek_ocr_tiny_tiny", "1_deepseek_ocr_tiny_base"]
    records = [json.loads((job / "run.json").read_text()) for job in jobs]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert [r["mode"]["name"] for r in records] == ["tiny", "base"]
    assert [r["tokens"]["generated"] for r in records] == [2, 2]
    assert records[0]["tokens"]["image"] < records[1]["tokens"]["image"]
    for job in jobs:
        assert (job / "stages.csv").is_file() and (job / "kernels.csv").is_file()
    assert not (tmp_path / "outputs").exists()


def test_multirun_records_a_failed_job_and_runs_the_others(tmp_path, small_page):
    sweep = tmp_path / "multi"
    missing = tmp_path / "missing.png"
    proc = cli("-m", *TINY, "mode=tiny", "max_new_tokens=2", "profiling.trace=false",
               f"image={small_page},{missing}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0
    no_traceback(proc)
    ok, failed = (json.loads((sweep / name / "run.json").read_text())
                  for name in ("0_deepseek_ocr_tiny_tiny", "1_deepseek_ocr_tiny_tiny"))
    assert ok["status"] == "ok" and ok["image"]["path"] == str(small_page)
    assert failed["status"] == "failed"
    assert str(missing) in failed["error"] and "\n" not in failed["error"]
    assert not (sweep / "1_deepseek_ocr_tiny_tiny" / "stages.csv").exists()
    assert error_lines(proc) == [f"error: {failed['error']}"]


# -- user errors ----------------------------------------------------------------------------
def test_missing_image_is_one_line(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nope.png"
    proc = cli(*TINY, f"image={missing}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode != 0
    no_traceback(proc)
    (line,) = error_lines(proc)
    assert str(missing) in line and "not found" in line
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == line.removeprefix("error: ")


@pytest.mark.parametrize("override", ["mode=huge", "mode=tiny,huge"])
def test_unknown_mode_is_one_line_listing_the_modes(tmp_path, override):
    proc = cli(*TINY, *(["-m"] if "," in override else []), override, f"hydra.run.dir={tmp_path / 'run'}",
               f"hydra.sweep.dir={tmp_path / 'multi'}", cwd=tmp_path)
    assert proc.returncode != 0
    no_traceback(proc)
    (line,) = error_lines(proc)
    assert "unknown mode 'huge'" in line and "gundam" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "multi").exists()


def test_unknown_model_is_one_line(tmp_path):
    proc = cli("model=gpt5", "profiling=quick", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    (line,) = error_lines(proc)
    assert "unknown model 'gpt5'" in line and "deepseek_ocr_tiny" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    proc = cli("model=deepseek_ocr_tiny", "profiling=quick", "device=cuda", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode != 0
    no_traceback(proc)
    (line,) = error_lines(proc)
    assert "no CUDA GPU" in line


def test_wrong_type_is_rejected_before_running(tmp_path):
    proc = cli(*TINY, "max_new_tokens=abc", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    no_traceback(proc)
    assert "max_new_tokens" in proc.stderr
    assert not (tmp_path / "run").exists()


# -- Ctrl-C -----------------------------------------------------------------------------------
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


def test_interrupt_records_the_job_and_leaves_no_partial_artifacts(tmp_path, small_page):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_perf_opt.run", *TINY, "mode=tiny", "max_new_tokens=2",
         "profiling.repeats=1000", f"image={small_page}", f"hydra.run.dir={out}"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint,
    )
    try:
        # Hydra writes .hydra/ and opens run.log just before it calls the job; give the job
        # time to reach the timed repeats (model built, routing recorded), then press Ctrl-C.
        _wait_for(lambda: (out / ".hydra" / "overrides.yaml").is_file() and (out / "run.log").is_file(),
                  proc, timeout=180)
        time.sleep(3)
        assert proc.poll() is None, "1000 repeats should still be running"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert "interrupted" in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert "\n" not in record["error"]
    for name in ("stages.csv", "kernels.csv", "trace.json", "report.md"):
        assert not (out / name).exists(), name
    assert temp_files(tmp_path) == []


def test_run_json_analytic_uses_the_observed_routing(gundam_run):
    _, _, record = gundam_run
    analytic = record["analytic"]
    assert "useful FLOPs" in analytic["note"]
    experts = analytic["experts"]
    assert {e["scope"] for e in experts} == {"prefill", "decode_step", "decode_run"}
    observed = {(e["layer"], e["scope"]): e["observed_distinct"] for e in experts}
    prefill_counts = record["routing"]["prefill"]
    for layer_slot, counts in enumerate(prefill_counts):
        layer = sorted({e["layer"] for e in experts})[layer_slot]
        assert observed[(layer, "prefill")] == sum(c > 0 for c in counts)
