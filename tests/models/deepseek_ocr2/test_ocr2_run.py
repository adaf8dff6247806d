"""`python -m llm_perf_opt.run model=deepseek_ocr2_tiny` end to end, through the harness's
unchanged measurement, report and sweep code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import call_main
from omegaconf import OmegaConf

import llm_perf_opt
from llm_perf_opt import run as run_module
from llm_perf_opt.config import compose, validate

TINY = ("model=deepseek_ocr2_tiny", "device=cpu", "profiling=quick", "dtype=float32")
STAGES = ["preprocess", "sam", "vision", "projector", "prefill", "decode"]
ARTIFACTS = [
    "report.md",
    "roofline.png",
    "stages.csv",
    "stages.json",
    "kernels.csv",
    "run.json",
    "trace.pt.trace.json",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ocr2-run") / "run"
    cfg = compose([*TINY, "max_new_tokens=4"])
    run_module.run_job(validate(cfg), OmegaConf.to_container(cfg, resolve=True), out)
    return out, json.loads((out / "run.json").read_text())


def test_every_artifact_is_written(tiny_run):
    out, record = tiny_run
    assert all((out / name).is_file() for name in ARTIFACTS)
    assert record["status"] == "ok" and record["generated_tokens"] == 4
    assert record["stage_layout"]["order"] == STAGES
    assert record["stage_layout"]["per_step"] == ["decode"]


def test_the_stage_table_has_roofline_rows_for_every_model_stage(tiny_run):
    out, _ = tiny_run
    table = pd.read_csv(out / "stages.csv")
    assert table["stage"].tolist() == STAGES
    model = table[table["stage"] != "preprocess"].set_index("stage")
    assert (model["flops"] > 0).all() and (model["bytes"] > 0).all()
    assert model["calibrated_pct_roof_wall"].notna().all()
    assert model["verdict"].str.len().gt(0).all()
    assert model.loc["decode", "calls"] == 3  # 4 tokens: the first from prefill, 3 decode steps
    assert "## Stages against the roofline" in (out / "report.md").read_text()


def test_routing_and_analytic_tables_are_recorded(tiny_run):
    _, record = tiny_run
    assert sorted(record["routing"]) == ["decode", "prefill"]
    assert record["routing"]["decode"]["calls"] == 3
    assert {row["stage"] for row in record["analytic"]["stages"]} == set(STAGES[1:])
    assert record["execution"]["impl"] == "reference" and record["execution"]["library"] == "transformers"
    assert record["tokens"]["image"] == 257


def test_a_pickle_only_checkpoint_is_one_error_line(monkeypatch, capsys, tmp_path, tiny_session):
    from llm_perf_opt.models.deepseek_ocr2.checkpoint import save_checkpoint

    folder = tmp_path / "pickled"
    save_checkpoint(tiny_session.model, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    code, _, err = call_main(
        monkeypatch,
        capsys,
        run_module.main,
        "llm_perf_opt.run",
        *TINY,
        f"model.weights={folder}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "only pickled weights" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "stages.csv").exists()


def _env(entry_point: Path | None) -> dict:
    """The child runs this package (the tree under test, first on its path) and sees the
    model's entry point, with one intra-op thread."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    source = str(Path(llm_perf_opt.__file__).resolve().parents[1])
    paths = (source, None if entry_point is None else str(entry_point), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def test_one_sweep_over_both_models(tmp_path, entry_point):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_perf_opt.run",
            "-m",
            "model=deepseek_ocr_tiny,deepseek_ocr2_tiny",
            "mode=base",
            "device=cpu",
            "profiling=quick",
            "profiling.trace=false",
            "dtype=float32",
            "max_new_tokens=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(entry_point),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = pd.read_csv(sweep / "sweep_summary.csv")
    assert sorted(summary["model"]) == ["deepseek_ocr2_tiny", "deepseek_ocr_tiny"]
    assert (summary["mode"] == "base").all() and (summary["status"] == "ok").all()
    assert Path(sweep / "sweep_summary.md").is_file()


def test_compare_reads_its_runs(tiny_run, capsys):
    from llm_perf_opt.compare import main as compare_main

    out, _ = tiny_run
    assert compare_main([str(out), str(out)]) == 0
    assert "decode" in capsys.readouterr().out


def test_the_module_tree_tags_stages(monkeypatch, capsys, tmp_path):
    from llm_perf_opt import tree

    code, out, err = call_main(
        monkeypatch,
        capsys,
        tree.main,
        "llm_perf_opt.tree",
        "model=deepseek_ocr2_tiny",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 0, err
    for stage in ("sam", "vision", "projector", "language_model"):
        assert stage in out
