"""The report, run.json and the memory check read a model's analytic costs through the typed
contract of models/interface.py, whatever the model: here a dense model of two stages, one per
step, with no nested ranges, families or routing figures."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt import run as run_module
from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.precision import choose_dtype
from llm_perf_opt.models.interface import Footprint, StageCosts, StageMemory, Work
from llm_perf_opt.report.run_record import analytic_record, footprint_record
from llm_perf_opt.report.stage_report import work_of

ENCODE = Work(
    matmul_flops=100,
    useful_matmul_flops=100,
    other_flops=10,
    useful_other_flops=10,
    weight_bytes=1000,
    act_read_bytes=200,
    act_write_bytes=300,
)
STEP = Work(matmul_flops=8, useful_matmul_flops=8, weight_bytes=50, kv_read_bytes=20, kv_write_bytes=4)
COSTS = StageCosts(stages={"encode": ENCODE, "step": STEP}, steps={"step": STEP})
FOOTPRINT = Footprint(
    stages=(StageMemory("encode", 500, 1000, "activations", 7e9), StageMemory("step", 25, 50, "logits", 4e3)),
    total_weight_bytes=2e9,
    kv_cache_bytes=1e6,
)


def test_the_stage_table_reads_useful_flops_and_bytes_by_category():
    work = work_of(COSTS).set_index("stage")
    assert list(work.index) == ["encode", "step"]
    assert work.loc["encode", "flops"] == 110 and work.loc["encode", "bytes"] == 1500
    assert work.loc["encode", "act_bytes"] == 500 and work.loc["encode", "kv_bytes"] == 0
    assert work.loc["step", "kv_bytes"] == 24 and work.loc["step", "weight_bytes"] == 50


def test_run_json_keeps_its_analytic_keys_and_routing_is_optional():
    record = analytic_record(COSTS)
    assert [(row["stage"], row["scope"]) for row in record["stages"]] == [
        ("encode", "run"),
        ("step", "run"),
        ("step", "step"),
    ]
    assert record["stages"][0]["useful_flops"] == 110 and record["stages"][0]["bytes"] == 1500
    assert record["families"] == [] and record["ranges"] == [] and record["experts"] == []
    assert record["note"] is None
    memory = footprint_record(FOOTPRINT)
    assert memory["stages"][0] == {
        "stage": "encode",
        "weight_params": 500,
        "weight_bytes": 1000,
        "transient": "activations",
        "transient_bytes": 7e9,
    }
    assert memory["kv_cache_bytes"] == 1e6 and memory["logits_bytes"] == 0


def test_the_memory_check_reads_the_weights_the_kv_cache_and_the_largest_transient(monkeypatch):
    assert FOOTPRINT.largest_transient.stage == "encode"
    monkeypatch.setattr(run_module, "available_memory_bytes", lambda device: 8e9)
    run = load(["model=deepseek_ocr_tiny"])
    device = torch.device("cpu")
    with pytest.raises(
        UserError, match=r"2\.0 GB weights \+ 0\.001 GB KV cache \+ 7\.0 GB largest transient \(encode\)"
    ):
        run_module.check_memory(run, FOOTPRINT, choose_dtype("float32", device), device)
