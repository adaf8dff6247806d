"""Local checkpoints: a safetensors round trip, per-expert tensors, remote code never run, pickles refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr2.checkpoint import WEIGHTS_FILE, save_checkpoint
from llm_perf_opt.models.deepseek_ocr2.session import DeepSeekOCR2Session

PROMPT = "<image>\nFree OCR."


def tokens(folder: Path, options, n: int = 4) -> list[int]:
    cfg = load(["model=deepseek_ocr2_tiny", f"model.weights={folder}"]).model
    session = DeepSeekOCR2Session(cfg, options)
    session.load()
    return session.generate(session.prepare(None, PROMPT), n).tokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_session) -> tuple[Path, list[int]]:
    folder = tmp_path_factory.mktemp("ocr2-ckpt") / "ckpt"
    save_checkpoint(tiny_session.model, folder)
    return folder, tiny_session.generate(tiny_session.prepare(None, PROMPT), 4).tokens


def test_round_trip_gives_the_same_tokens(saved, options):
    folder, expected = saved
    assert tokens(folder, options) == expected


def test_per_expert_tensors_are_stacked(saved, options, tmp_path):
    folder, expected = saved
    split = tmp_path / "split"
    shutil.copytree(folder, split)
    tensors = load_file(str(split / WEIGHTS_FILE))
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        prefix = key.removesuffix(".gate_up_proj")
        gate_up, down = tensors.pop(key), tensors.pop(f"{prefix}.down_proj")
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(gate_up.shape[0]):
            tensors[f"{prefix}.{e}.gate_proj.weight"] = gate[e].contiguous()
            tensors[f"{prefix}.{e}.up_proj.weight"] = up[e].contiguous()
            tensors[f"{prefix}.{e}.down_proj.weight"] = down[e].contiguous()
    save_file(tensors, str(split / WEIGHTS_FILE))
    assert tokens(split, options) == expected


def test_remote_code_and_auto_map_are_not_executed(saved, options, tmp_path):
    folder, expected = saved
    remote = tmp_path / "remote"
    shutil.copytree(folder, remote)
    marker = tmp_path / "executed"
    (remote / "modeling_deepseek_ocr2.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('remote code was executed')\n"
    )
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_deepseek_ocr2.Config",
        "AutoModel": "modeling_deepseek_ocr2.Model",
    }
    (remote / "config.json").write_text(json.dumps(config))
    assert tokens(remote, options) == expected
    assert not marker.exists()


def test_pickle_only_checkpoint_is_refused_in_one_line(saved, options, tmp_path):
    folder, _ = saved
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    cfg = load(["model=deepseek_ocr2_tiny", f"model.weights={pickled}"]).model
    session = DeepSeekOCR2Session(cfg, options)
    with pytest.raises(UserError, match="only pickled weights") as info:
        session.load()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_file_is_one_line_naming_it(saved, options, tmp_path, damage):
    folder, _ = saved
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\xff" * 4096)
    cfg = load(["model=deepseek_ocr2_tiny", f"model.weights={broken}"]).model
    session = DeepSeekOCR2Session(cfg, options)
    with pytest.raises(UserError, match="not a readable safetensors file") as info:
        session.load()
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_of_another_model_type_is_refused(saved, tmp_path, options):
    folder, _ = saved
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "deepseek_vl_v2"
    (other / "config.json").write_text(json.dumps(config))
    cfg = load(["model=deepseek_ocr2_tiny", f"model.weights={other}"]).model
    with pytest.raises(UserError, match="model_type"):
        DeepSeekOCR2Session(cfg, options)
