"""hydra/callbacks=mlflow: a tiny job logged into a local MLflow file store, read back with MLflow's client."""

from __future__ import annotations

import json
import statistics
import sys

import pandas as pd
import pytest
from cli_helpers import call_main

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from llm_perf_opt import run as run_module  # noqa: E402

TINY = (
    "model=deepseek_ocr_tiny",
    "mode=tiny",
    "device=cpu",
    "profiling=quick",
    "dtype=float32",
    "max_new_tokens=2",
)


def run_logged(monkeypatch, capsys, tmp_path, *args: str) -> tuple[int, str, str]:
    # The callback allows MLflow's file store for its own folder; the variable is put back after the test.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    return call_main(
        monkeypatch,
        capsys,
        run_module.main,
        "llm_perf_opt.run",
        *args,
        "hydra/callbacks=mlflow",
        f"hydra.callbacks.mlflow.tracking_uri={tmp_path / 'mlruns'}",
        "hydra.callbacks.mlflow.experiment=tests",
    )


def logged_runs(tmp_path) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=str(tmp_path / "mlruns"))
    experiment = client.get_experiment_by_name("tests")
    return client, client.search_runs([experiment.experiment_id])


def test_a_tiny_run_logs_params_metrics_and_artifacts(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = run_logged(monkeypatch, capsys, tmp_path, *TINY, f"hydra.run.dir={out}")
    assert code == 0, stderr
    record = json.loads((out / "run.json").read_text())
    client, runs = logged_runs(tmp_path)
    (run,) = runs
    assert (run.info.status, run.info.run_name) == ("FINISHED", "run")

    params = run.data.params
    assert params["model.name"] == "deepseek_ocr_tiny" and params["model.mode.name"] == "tiny"
    assert (
        params["max_new_tokens"] == "2" and params["profiling.repeats"] == "1" and params["image"] == "null"
    )

    metrics = run.data.metrics
    (sample,) = record["timing"]["samples"]  # one timed run: its figures are the medians
    assert metrics["ttft_ms"] == pytest.approx(sample["ttft_ms"])
    assert metrics["e2e_ms"] == pytest.approx(sample["e2e_ms"])
    assert metrics["tpot_ms"] == pytest.approx(sample["e2e_ms"] - sample["ttft_ms"])  # one decode step
    stages = pd.read_csv(out / "stages.csv").set_index("stage")
    for stage, row in stages.iterrows():
        assert metrics[f"stage.{stage}.time_ms"] == pytest.approx(
            statistics.median([sum(sample["stages"][stage])])
        )
        assert metrics[f"stage.{stage}.busy_ms"] == pytest.approx(row["busy_ms"])
    assert "stage.preprocess.flops" not in metrics  # host work has no FLOPs: nothing is logged for it

    tags = run.data.tags
    assert tags["status"] == "ok" and tags["model"] == "deepseek_ocr_tiny" and tags["mode"] == "tiny"
    assert tags["git_commit"] == record["versions"]["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "report.md", "stages.csv", "run.log", "trace.pt.trace.json", ".hydra"} <= artifacts


def test_a_failed_job_is_a_failed_run_with_its_reason(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, _ = run_logged(
        monkeypatch, capsys, tmp_path, *TINY, f"image={tmp_path / 'nope.png'}", f"hydra.run.dir={out}"
    )
    assert code == 1
    client, (run,) = logged_runs(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert run.data.metrics == {}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"run.json", "run.log"}


def test_a_store_that_cannot_be_written_is_one_line_and_the_job_stands(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = tmp_path / "run"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, _, stderr = call_main(
        monkeypatch,
        capsys,
        run_module.main,
        "llm_perf_opt.run",
        *TINY,
        "hydra/callbacks=mlflow",
        f"hydra.callbacks.mlflow.tracking_uri={blocker / 'mlruns'}",
        f"hydra.run.dir={out}",
    )
    assert code == 0
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: mlflow: run not logged to ")
    assert "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "ok"


def test_without_mlflow_the_callback_is_one_line_before_anything_runs(monkeypatch, capsys, tmp_path):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without the extra sees
    monkeypatch.delitem(sys.modules, "llm_perf_opt.report.mlflow_callback", raising=False)
    code, _, stderr = run_logged(monkeypatch, capsys, tmp_path, *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert stderr == (
        "error: hydra.callbacks.mlflow needs the package mlflow, which is not installed: "
        'pip install "llm-perf-opt[mlflow]"\n'
    )
    assert not (tmp_path / "run").exists()
