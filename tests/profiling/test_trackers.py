"""Module-family ranges: which modules are tagged, and attaching/detaching the hooks.

tiny_arch and tiny_model come from tests/conftest.py."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.models.deepseek_ocr.decoder import MoE, SwiGLU
from llm_perf_opt.models.deepseek_ocr.model import DeepSeekOCR
from llm_perf_opt.profiling import module_ranges
from llm_perf_opt.profiling.module_ranges import attach_module_ranges, module_families


def meta_model(arch) -> DeepSeekOCR:
    with torch.device("meta"):
        return DeepSeekOCR(arch)


@pytest.fixture(scope="module")
def model(tiny_model):
    return copy.deepcopy(tiny_model)  # hooks are attached to it; the shared model stays untouched


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
    for name, module in m.named_modules():
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


class Recorder:
    """Stands in for module_range: logs every range opened and closed."""

    def __init__(self):
        self.log: list[tuple[str, str]] = []
        self.depth = 0

    def __call__(self, stage, family):
        rec = self

        class Range:
            def __enter__(self):
                rec.log.append(("enter", f"{stage}/{family}"))
                rec.depth += 1
                return self

            def __exit__(self, *exc):
                rec.log.append(("exit", f"{stage}/{family}"))
                rec.depth -= 1

        return Range()


def hook_count(m: torch.nn.Module) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def test_attach_and_detach(model, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(module_ranges, "module_range", recorder)
    assert hook_count(model) == 0
    handles = attach_module_ranges(model, lambda: "decode")
    assert len(handles) == 2 * len(module_families(model))
    assert hook_count(model) == len(handles)

    moe = model.model.layers[1].mlp
    x = torch.randn(1, 3, model.cfg.lm.hidden_size)
    with torch.inference_mode():
        moe(x)
        model.lm_head(x[:, -1])
    assert recorder.log == [
        ("enter", "decode/moe"), ("exit", "decode/moe"),
        ("enter", "decode/lm_head"), ("exit", "decode/lm_head"),
    ]

    # A forward that raises still closes its range.
    with pytest.raises(RuntimeError), torch.inference_mode():
        model.lm_head(torch.randn(1, 7))
    assert recorder.depth == 0

    for handle in handles:
        handle.remove()
    assert hook_count(model) == 0
    recorder.log.clear()
    with torch.inference_mode():
        moe(x)
    assert recorder.log == []


def test_attached_ranges_reach_the_profiler(model):
    handles = attach_module_ranges(model, lambda: "prefill")
    try:
        x = torch.randn(1, 4, model.cfg.lm.hidden_size)
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
            model.model.layers[1].mlp(x)
        names = [e.name for e in prof.events()]
        assert names.count("prefill/moe") == 1
        assert "prefill/mlp" not in names  # the experts are inside prefill/moe, not ranges of their own
    finally:
        for handle in handles:
            handle.remove()
    assert hook_count(model) == 0
