"""Dummy weights and safetensors checkpoints in the official file layout."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig, to_official_json

OFFICIAL_FILES = {"config.json", "model-00001-of-000001.safetensors", "model.safetensors.index.json"}


# --- dummy weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bf16(tiny_arch):
    return weights.dummy_model(tiny_arch, "cpu", torch.bfloat16, seed=0)


def test_dummy_weights_are_seeded(tiny_arch, tiny_bf16):
    again = weights.dummy_model(tiny_arch, "cpu", torch.bfloat16, seed=0).state_dict()
    other = weights.dummy_model(tiny_arch, "cpu", torch.bfloat16, seed=1).state_dict()
    state = tiny_bf16.state_dict()
    assert set(state) == set(again) == set(other)
    for key, tensor in state.items():
        assert torch.equal(tensor, again[key]), key
    random_keys = [k for k, t in state.items() if t.abs().max() > 0 and not torch.all(t == 1)]
    assert random_keys
    for key in random_keys:
        assert not torch.equal(state[key], other[key]), key


def test_dummy_weights_are_finite_normal_and_small(tiny_bf16):
    tiny = torch.finfo(torch.bfloat16).tiny
    for key, tensor in tiny_bf16.state_dict().items():
        assert tensor.dtype == torch.bfloat16, key
        x = tensor.float()
        assert torch.isfinite(x).all(), key
        assert not ((x != 0) & (x.abs() < tiny)).any(), f"{key} has denormals"
        assert x.abs().max() <= 1.0, key


def test_dummy_weight_scales(tiny_bf16):
    """Norms are identity, biases zero, matrices N(0, 1/fan_in) clamped at 4σ, tables N(0, 0.02²)."""
    checked = 0
    for name, module in tiny_bf16.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            key = f"{name}.{leaf}"
            x = param.float()
            if isinstance(module, weights.NORMS):
                assert torch.all(x == (1.0 if leaf == "weight" else 0.0)), key
                checked += 1
            elif leaf == "bias":
                assert torch.all(x == 0), key
                checked += 1
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                std = 1 / math.sqrt(param[0].numel())
                assert x.abs().max() <= 4 * std * 1.01, key
                if x.numel() >= 4096:
                    assert 0.8 * std < x.std() < 1.2 * std, key
                checked += 1
    assert checked > 50
    newline = tiny_bf16.model.image_newline.float()
    assert 0.01 < newline.std() < 0.04 and newline.abs().max() <= 0.08 * 1.01
    # RMSNorm weights too (RMSNorm has no bias).
    assert torch.all(tiny_bf16.model.norm.weight == 1)


# --- checkpoints: round trips --------------------------------------------------------------


def lm_logits(model, arch: DeepSeekOCRConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0] + [arch.image_token_id] * 4 + [11, 22, 33, 44]])
    embeds = torch.randn(4, arch.lm.hidden_size, generator=gen)
    with torch.no_grad():
        return model.prefill(ids, embeds, model.new_cache(ids.shape[1]))


def vision_out(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sam = model.sam(torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1)
        return model.project(sam, model.clip(sam))


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_save_load_round_trip_in_official_layout(tiny_arch, tiny_bf16, tmp_path):
    folder = weights.save_checkpoint(tiny_bf16, tmp_path / "ckpt")
    assert {p.name for p in folder.iterdir()} == OFFICIAL_FILES
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_bf16.state_dict())
    assert set(index["weight_map"].values()) == {"model-00001-of-000001.safetensors"}
    assert index["metadata"]["total_size"] == 2 * sum(p.numel() for p in tiny_bf16.parameters())

    loaded = weights.load_checkpoint(folder, "cpu", torch.bfloat16)
    assert loaded.cfg == tiny_arch
    assert_same_model(loaded, tiny_bf16)
    assert torch.equal(lm_logits(loaded, tiny_arch), lm_logits(tiny_bf16, tiny_arch))
    assert torch.equal(vision_out(loaded), vision_out(tiny_bf16))


def test_two_shard_checkpoint_with_index_loads(tiny_arch, tiny_bf16, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_bf16.state_dict().items()}
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (tmp_path / "config.json").write_text(json.dumps(to_official_json(tiny_arch)))

    loaded = weights.load_checkpoint(tmp_path, "cpu", torch.bfloat16)
    assert_same_model(loaded, tiny_bf16)
    assert torch.equal(lm_logits(loaded, tiny_arch), lm_logits(tiny_bf16, tiny_arch))


def test_load_converts_dtype(tiny_arch, tiny_bf16, tmp_path):
    weights.save_checkpoint(tiny_bf16, tmp_path)
    loaded = weights.load_checkpoint(tmp_path, "cpu", torch.float32)
    assert loaded.dtype == torch.float32
    for key, tensor in tiny_bf16.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor.float()), key


# --- checkpoints: what is refused ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_arch(tiny_arch) -> DeepSeekOCRConfig:
    """The tiny model with a small vocabulary, so broken checkpoints are cheap to write."""
    return dataclasses.replace(tiny_arch, lm=dataclasses.replace(tiny_arch.lm, vocab_size=256))


@pytest.fixture(scope="module")
def small_state(small_arch) -> dict[str, torch.Tensor]:
    model = weights.build_model(small_arch, torch.device("cpu"), torch.bfloat16, "sdpa")
    return {k: torch.zeros_like(v) for k, v in model.state_dict().items()}


def write_checkpoint(folder: Path, arch: DeepSeekOCRConfig, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_official_json(arch)))
    save_file(state, str(folder / "model-00001-of-000001.safetensors"))
    return folder


def refused(path) -> str:
    with pytest.raises(UserError) as info:
        weights.load_checkpoint(path, "cpu", torch.bfloat16)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_small_checkpoint_loads(small_arch, small_state, tmp_path):
    """The baseline the broken variants below start from."""
    model = weights.load_checkpoint(
        write_checkpoint(tmp_path, small_arch, small_state), "cpu", torch.bfloat16
    )
    assert model.cfg == small_arch


def test_missing_folder(tmp_path):
    assert "not a folder" in refused(tmp_path / "absent")


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    assert "not a folder" in refused(file)


def test_no_config_json(small_state, tmp_path):
    save_file(small_state, str(tmp_path / "model.safetensors"))
    assert "config.json" in refused(tmp_path)


def test_config_but_no_weights(small_arch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_official_json(small_arch)))
    assert "no *.safetensors" in refused(tmp_path)


def test_pickled_weights_are_refused(small_arch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_official_json(small_arch)))
    # Not a real pickle: it must never be opened anyway.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-pickle")
    message = refused(tmp_path)
    assert "pickle" in message and "pytorch_model.bin" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_one_line_naming_it(small_arch, small_state, tmp_path, damage):
    folder = write_checkpoint(tmp_path, small_arch, small_state)
    shard = folder / "model-00001-of-000001.safetensors"
    data = shard.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 64, "empty": b""}
    shard.write_bytes(damaged[damage])
    message = refused(folder)
    assert str(shard) in message and "not a readable safetensors file" in message


def test_wrong_shape_names_the_key(small_arch, small_state, tmp_path):
    key = "model.layers.1.mlp.gate.weight"
    state = dict(small_state)
    state[key] = torch.zeros(
        small_arch.lm.n_routed_experts + 1, small_arch.lm.hidden_size, dtype=torch.bfloat16
    )
    message = refused(write_checkpoint(tmp_path, small_arch, state))
    assert "wrong shape" in message and key in message
    assert "missing" not in message  # a wrongly shaped key is reported once, not also as missing


def test_missing_keys_are_named(small_arch, small_state, tmp_path):
    state = dict(small_state)
    del state["lm_head.weight"]
    message = refused(write_checkpoint(tmp_path, small_arch, state))
    assert "1 missing" in message and "lm_head.weight" in message


def test_unexpected_keys_are_named(small_arch, small_state, tmp_path):
    state = dict(small_state, **{"model.extra_head.weight": torch.zeros(3, dtype=torch.bfloat16)})
    message = refused(write_checkpoint(tmp_path, small_arch, state))
    assert "unexpected" in message and "model.extra_head.weight" in message


def test_many_problems_fit_on_one_line(small_arch, small_state, tmp_path):
    state = {k: v for k, v in small_state.items() if ".experts." not in k}
    message = refused(write_checkpoint(tmp_path, small_arch, state))
    assert "missing" in message and "(+" in message


def test_index_naming_an_absent_shard(small_arch, small_state, tmp_path):
    write_checkpoint(tmp_path, small_arch, small_state)
    weight_map = {k: "model-00001-of-000001.safetensors" for k in small_state}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert "model-00002-of-00002.safetensors" in refused(tmp_path)


def test_malformed_index(small_arch, small_state, tmp_path):
    write_checkpoint(tmp_path, small_arch, small_state)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "model.safetensors.index.json" in refused(tmp_path)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"hidden_size": 128,', "config.json"),
        ("[1, 2, 3]", "not a JSON object"),
        ('{"hidden_size": 128, "use_mla": true}', "MLA"),
        ('{"num_hidden_layers": 2.5}', "num_hidden_layers"),
        ('{"vocab_size": "129280"}', "vocab_size"),
        ('{"num_attention_heads": 0}', "num_attention_heads"),
        ('{"llm_perf_opt_vision": [1, 2]}', "llm_perf_opt_vision"),
        ('{"llm_perf_opt_vision": {"sam": {"global_attn_indexes": "1,3"}}}', "global_attn_indexes"),
    ],
    ids=[
        "truncated",
        "not-an-object",
        "mla",
        "float-layers",
        "string-vocab",
        "zero-heads",
        "vision-list",
        "bad-tuple",
    ],
)
def test_malformed_config_json(small_arch, small_state, tmp_path, text, named):
    write_checkpoint(tmp_path, small_arch, small_state)
    (tmp_path / "config.json").write_text(text)
    assert named in refused(tmp_path)


def test_bad_arch_in_config_json(small_arch, small_state, tmp_path):
    write_checkpoint(tmp_path, small_arch, small_state)
    config = to_official_json(small_arch)
    config["num_experts_per_tok"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "num_experts_per_tok" in refused(tmp_path)


def test_loading_never_executes_checkpoint_code(small_arch, small_state, tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", small_arch, small_state)
    marker = tmp_path / "remote_code_ran"
    (folder / "modeling_deepseekocr.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nraise SystemExit('remote code ran')\n"
    )
    (folder / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = to_official_json(small_arch)
    config["auto_map"] = {
        "AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
        "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))

    model = weights.load_checkpoint(folder, "cpu", torch.bfloat16)
    assert model.cfg == small_arch
    assert not marker.exists()
