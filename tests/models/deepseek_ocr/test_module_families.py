"""DeepSeek-OCR's module families: which modules get nested `stage/family` ranges.

tiny_arch comes from tests/conftest.py."""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from llm_perf_opt.models.deepseek_ocr.decoder import MoE, SwiGLU
from llm_perf_opt.models.deepseek_ocr.families import module_families
from llm_perf_opt.models.deepseek_ocr.model import DeepSeekOCR


def meta_model(arch) -> DeepSeekOCR:
    with torch.device("meta"):
        return DeepSeekOCR(arch)


def test_families_of_the_tiny_model(tiny_arch):
    m = meta_model(tiny_arch)
    families = module_families(m)
    sam, clip, lm = tiny_arch.sam, tiny_arch.clip, tiny_arch.lm
    moe = sum(lm.is_moe_layer(i) for i in range(lm.num_hidden_layers))
    dense = lm.num_hidden_layers - moe
    assert Counter(families.values()) == {
        "attn": sam.depth + clip.layers + lm.num_hidden_layers,
        "mlp": sam.depth + clip.layers + dense,
        "moe": moe,
        "norm": 2 * lm.num_hidden_layers + 1,
        "neck": 3,
        "patch_embed": 1,
        "embed": 1,
        "linear": 1,
        "lm_head": 1,
    }
    assert families["lm_head"] == "lm_head"
    assert families["model.embed_tokens"] == "embed"
    assert families["model.layers.0.mlp"] == "mlp"
    assert families["model.layers.1.mlp"] == "moe"
    modules = dict(m.named_modules())
    assert all(name in modules for name in families)


def test_only_the_outermost_module_of_a_family_is_tagged(tiny_arch):
    m = meta_model(tiny_arch)
    families = module_families(m)
    for name in families:
        for other in families:
            assert not other.startswith(name + "."), f"{other} is tagged inside {name}"
    # MoE experts (routed and shared) run inside their `moe` range, never as `mlp` of their own.
    for name, _module in m.named_modules():
        if ".experts." in name or name.endswith(".shared_experts") or name.endswith(".gate"):
            assert name not in families, name


def test_every_dense_lm_mlp_is_tagged(tiny_arch):
    # With more dense layers up front, each dense SwiGLU is an `mlp`; the MoE layers stay `moe`.
    arch = dataclasses.replace(tiny_arch, lm=dataclasses.replace(tiny_arch.lm, first_k_dense_replace=2))
    m = meta_model(arch)
    families = module_families(m)
    for i, layer in enumerate(m.model.layers):
        expected = "moe" if isinstance(layer.mlp, MoE) else "mlp"
        assert isinstance(layer.mlp, (MoE, SwiGLU))
        assert families[f"model.layers.{i}.mlp"] == expected
