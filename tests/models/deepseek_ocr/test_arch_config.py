"""The architecture dataclasses, their composition from the packaged configs, and the
checkpoint config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.config import (
    VISION_KEY,
    ClipConfig,
    DeepSeekOCRConfig,
    LMConfig,
    SamConfig,
    from_official_json,
    to_official_json,
)

# The folder beside the checkout (<repo>/../shared/official); a user's clone has none.
OFFICIAL = Path(__file__).resolve().parents[3] / ".." / "shared" / "official"


def test_defaults_are_the_official_architecture():
    cfg = DeepSeekOCRConfig()
    lm = cfg.lm
    assert (lm.vocab_size, lm.hidden_size, lm.intermediate_size, lm.moe_intermediate_size) == (
        129280,
        1280,
        6848,
        896,
    )
    assert (lm.num_hidden_layers, lm.num_attention_heads, lm.head_dim) == (12, 10, 128)
    assert (lm.n_routed_experts, lm.n_shared_experts, lm.num_experts_per_tok) == (64, 2, 6)
    assert lm.shared_intermediate_size == 1792
    assert [lm.is_moe_layer(i) for i in range(12)] == [False] + [True] * 11
    assert (lm.rope_theta, lm.rms_norm_eps, lm.max_position_embeddings) == (10000.0, 1e-6, 8192)
    sam = cfg.sam
    assert (sam.width, sam.depth, sam.global_attn_indexes, sam.out_channels) == (768, 12, (2, 5, 8, 11), 1024)
    assert (cfg.clip.width, cfg.clip.layers, cfg.clip.ffn, cfg.clip.num_positions) == (1024, 24, 4096, 257)
    assert cfg.projector_in == 2048 and cfg.image_token_id == 128815


def test_official_config_json_gives_the_official_lm():
    path = OFFICIAL / "config.json"
    if not path.is_file():
        pytest.skip(f"official config.json not available at {path}")
    cfg = from_official_json(path)
    assert cfg.lm == LMConfig()
    assert (cfg.lm.vocab_size, cfg.lm.hidden_size, cfg.lm.num_hidden_layers) == (129280, 1280, 12)
    assert (cfg.lm.n_routed_experts, cfg.lm.num_experts_per_tok, cfg.lm.first_k_dense_replace) == (64, 6, 1)
    assert (cfg.lm.bos_token_id, cfg.lm.eos_token_id) == (0, 1)
    # The official file has no usable vision block: the towers are the hard-coded ones.
    assert cfg.sam == SamConfig() and cfg.clip == ClipConfig()
    # Top level and language_config agree, so reading the top level (as HF does) is safe.
    raw = json.loads(path.read_text())
    for key, value in raw["language_config"].items():
        if key in {f.name for f in dataclasses.fields(LMConfig)}:
            assert raw[key] == value, key


def test_official_json_round_trip_keeps_the_vision_block(tiny_arch, tmp_path):
    data = to_official_json(tiny_arch)
    assert data["use_mla"] is False
    assert data["language_config"]["hidden_size"] == data["hidden_size"] == tiny_arch.lm.hidden_size
    assert data["projector_config"] == {
        "input_dim": tiny_arch.projector_in,
        "n_embed": tiny_arch.lm.hidden_size,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    back = from_official_json(path)
    # Equal field by field, tuples included (JSON gives lists), so the reduced towers survive.
    assert back == tiny_arch
    assert back.sam != SamConfig() and back.clip != ClipConfig()


def test_official_json_without_vision_block_uses_the_official_towers(tiny_arch, tmp_path):
    data = to_official_json(tiny_arch)
    del data[VISION_KEY]
    (tmp_path / "config.json").write_text(json.dumps(data))
    # The tiny LM with full-size vision: consistent, since SAM out = CLIP width = 1024.
    cfg = from_official_json(tmp_path / "config.json")
    assert cfg.lm == tiny_arch.lm and cfg.sam == SamConfig() and cfg.clip == ClipConfig()


def arch_with(**sections: dict) -> DeepSeekOCRConfig:
    """The official architecture with the given fields of its sam / clip / lm sections replaced."""
    base = DeepSeekOCRConfig()
    return DeepSeekOCRConfig(
        **{
            name: dataclasses.replace(getattr(base, name), **sections.get(name, {}))
            for name in ("sam", "clip", "lm")
        }
    )


def test_packaged_model_configs_compose_to_typed_architectures(tiny_arch):
    assert load([]).model.arch == DeepSeekOCRConfig()
    # YAML lists arrive as the tuples the architecture holds.
    assert (
        type(tiny_arch.sam.global_attn_indexes) is tuple and type(tiny_arch.sam.downsample_channels) is tuple
    )
    # The reduced model keeps the official structure: SAM's output feeds CLIP, top-k within the experts.
    assert tiny_arch.sam.out_channels == tiny_arch.clip.width
    assert tiny_arch.lm.num_experts_per_tok <= tiny_arch.lm.n_routed_experts
    # What the reduced config leaves out comes from the official defaults.
    assert tiny_arch.lm.vocab_size == 129280 and tiny_arch.image_token_id == 128815


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"sam": {"downsample_channels": [512, 512]}}, "SAM output channels"),
        ({"clip": {"width": 768, "heads": 12}}, "SAM output channels"),
        ({"lm": {"hidden_size": 1001}}, "multiple of lm.num_attention_heads"),
        ({"lm": {"num_key_value_heads": 2}}, "multi-head attention"),
        ({"lm": {"num_experts_per_tok": 65}}, "num_experts_per_tok"),
        ({"sam": {"heads": 7}}, "multiples of their head counts"),
        ({"sam": {"global_attn_indexes": [2, 12]}}, "global_attn_indexes"),
        ({"sam": {"global_attn_indexes": [-1]}}, "global_attn_indexes"),
        ({"lm": {"num_attention_heads": 0}}, "num_attention_heads"),
        ({"lm": {"num_hidden_layers": 2.5}}, "num_hidden_layers"),
        ({"lm": {"vocab_size": "129280"}}, "vocab_size"),
        ({"lm": {"rope_theta": -1.0}}, "rope_theta"),
    ],
    ids=[
        "sam-out-vs-clip",
        "clip-width",
        "heads-divide",
        "kv-heads",
        "top-k",
        "vision-heads",
        "global-index",
        "negative-index",
        "zero-heads",
        "float-layers",
        "string-vocab",
        "negative-theta",
    ],
)
def test_bad_arch_values_raise_user_error(sections, match):
    with pytest.raises(UserError, match=match) as info:
        arch_with(**sections)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.arch.lm.num_experts_per_tok=65", "num_experts_per_tok"),  # the architecture's own check
        ("model.arch.lm.num_hidden_layers=2.5", "num_hidden_layers"),  # the schema's type
        ("model.arch.lm.no_such_field=1", "no_such_field"),
        ("model.arch.decoder.layers=1", "decoder"),
    ],
    ids=["arch-check", "type", "unknown-field", "unknown-section"],
)
def test_bad_arch_overrides_raise_one_line_user_error(override, match):
    with pytest.raises(UserError, match=match) as info:
        load(["model=deepseek_ocr_tiny", override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "cannot read"),
        ('"a string"', "not a JSON object"),
        ('{"use_mla": true}', "MLA"),
        ('{"hidden_size": 1001}', "multiple of"),
        ('{"llm_perf_opt_vision": {"sam": {"depth": "4"}}}', "sam.depth"),
        ('{"llm_perf_opt_vision": {"clip": [1]}}', VISION_KEY),
    ],
)
def test_bad_config_json_raises_user_error(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as info:
        from_official_json(path)
    assert "\n" not in str(info.value)


def test_missing_config_json_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        from_official_json(tmp_path / "config.json")
