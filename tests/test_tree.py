"""`python -m llm_perf_opt.tree`: the full-size model's stage totals, and the CLI in-process (tiny model)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import call_main

from llm_perf_opt import tree
from llm_perf_opt.config import load

# The official checkpoint's index (shared/deepseek_ocr_facts.md, weight listing).
TOTAL = 3_336_106_240
SAM = 95_569_152
CLIP = 303_177_728
PROJECTOR_LINEAR = 2_622_720  # model.projector.layers: 2048·1280 + 1280
NEWLINE_SEPARATOR = 2 * 1280  # model.image_newline, model.view_seperator: [1280] each

# deepseek_ocr_tiny: hidden 128, vocab 129,280; the projector maps CLIP 128 + SAM 128 channels to 128.
TINY_LM_HEAD = 129_280 * 128  # = 16,547,840
TINY_PROJECTOR_LINEAR = 256 * 128 + 128  # = 32,896
MODULE_FIELDS = {"name", "class", "stage", "leaf", "params", "params_total", "depth"}


@pytest.fixture(scope="module")
def full_tree():
    return tree.build_tree(load([]))


def test_full_size_stage_totals(full_tree):
    nodes, prefixes = full_tree
    totals = tree.ordered_totals(nodes, prefixes)
    projector = PROJECTOR_LINEAR + NEWLINE_SEPARATOR  # = 2,625,280
    assert totals == {
        "sam": SAM,
        "clip": CLIP,
        "projector": projector,
        "language_model": TOTAL - SAM - CLIP - projector,  # = 2,934,734,080
    }
    assert nodes[0].params_total == TOTAL


def test_full_size_modules(full_tree):
    nodes = {n.name: n for n in full_tree[0]}
    assert nodes["model.projector"].params_total == PROJECTOR_LINEAR
    # The newline and separator vectors are the only parameters DeepSeekOCRModel holds itself.
    assert (nodes["model"].stage, nodes["model"].params) == (None, NEWLINE_SEPARATOR)
    assert nodes["model.sam_model"].params_total == SAM
    # 12 decoder layers; 11 MoE layers of 64 experts each.
    assert [f"model.layers.{i}" in nodes for i in (0, 11, 12)] == [True, True, False]
    assert (
        sum(name.startswith("model.layers.1.mlp.experts.") and n.depth == 6 for name, n in nodes.items())
        == 64
    )


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return call_main(monkeypatch, capsys, tree.main, "llm_perf_opt.tree", *args)


def test_cli_prints_the_tree_and_writes_module_tree_json(monkeypatch, capsys, tmp_path):
    args = ("model=deepseek_ocr_tiny", f"hydra.run.dir={tmp_path}", "--depth", "2")
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    record = json.loads((tmp_path / "module_tree.json").read_text())
    modules = {m["name"]: m for m in record["modules"]}
    assert all(set(m) == MODULE_FIELDS for m in record["modules"])
    assert modules["lm_head"] == {
        "name": "lm_head",
        "class": "Linear",
        "stage": "language_model",
        "leaf": True,
        "params": TINY_LM_HEAD,
        "params_total": TINY_LM_HEAD,
        "depth": 1,
    }
    assert modules["model.projector"]["params_total"] == TINY_PROJECTOR_LINEAR
    assert record["stage_params"]["projector"] == TINY_PROJECTOR_LINEAR + 2 * 128
    assert sum(record["stage_params"].values()) == record["params_total"] == modules[""]["params_total"]

    tree_text, _, totals_text = out.partition("\n\n")
    printed = tree_text.splitlines()
    assert len(printed) == sum(m["depth"] <= 2 for m in record["modules"])
    assert printed[1].split()[:4] == [
        "model",
        "DeepSeekOCRModel",
        "-",
        f"{modules['model']['params_total']:,}",
    ]
    rows = [line.split() for line in totals_text.splitlines()[1:]]
    assert [name for name, _ in rows] == ["sam", "clip", "projector", "language_model", "total"]
    assert rows[2] == ["projector", f"{TINY_PROJECTOR_LINEAR + 2 * 128:,}"]  # = 33,152
    assert rows[-1] == ["total", f"{record['params_total']:,}"]


def test_cli_default_folder_is_outputs_trees(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "model=deepseek_ocr_tiny", "--depth=0")
    assert code == 0, err
    written = list(tmp_path.glob("outputs/trees/*_deepseek_ocr_tiny/module_tree.json"))
    assert len(written) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("model=no_such_model",),
        ("model=deepseek_ocr_tiny", "--depth", "-1"),
        ("model=deepseek_ocr_tiny", "--depth"),
    ],
)
def test_cli_user_errors_are_one_line(monkeypatch, capsys, tmp_path, args):
    code, out, err = run_cli(monkeypatch, capsys, f"hydra.run.dir={tmp_path}", *args)
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("error: ")
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
    assert not (tmp_path / "module_tree.json").exists()


def test_cli_missing_checkpoint_is_a_user_error(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no-checkpoint"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "model=deepseek_ocr_tiny",
        f"model.weights={missing}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: checkpoint: {missing}")
    assert not (tmp_path / "out" / "module_tree.json").exists()
