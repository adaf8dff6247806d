"""The native DeepSeek-OCR model: parameter inventory, stage shapes, KV-cache decoding,
attention backends and MoE routing math."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from llm_perf_opt.models.deepseek_ocr import attention, weights
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.decoder import MoE, SwiGLU, tokens_per_expert
from llm_perf_opt.models.deepseek_ocr.model import DeepSeekOCR
from llm_perf_opt.models.deepseek_ocr.modes import image_token_count

# The folder beside the checkout (<repo>/../shared/official); a user's clone has none.
OFFICIAL = Path(__file__).resolve().parents[3] / ".." / "shared" / "official"
OFFICIAL_PARAMS = 3_336_106_240
OFFICIAL_TENSORS = 2710


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to `rel` of the expected values' scale."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * max(scale, 1e-6))


# --- full-size parameter inventory ----------------------------------------------------------


@pytest.fixture(scope="module")
def full_meta() -> DeepSeekOCR:
    with torch.device("meta"):
        return DeepSeekOCR(DeepSeekOCRConfig())


@pytest.fixture(scope="module")
def full_shapes(full_meta) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in full_meta.state_dict().items()}


def test_full_model_has_the_official_parameter_count(full_meta):
    assert sum(p.numel() for p in full_meta.parameters()) == OFFICIAL_PARAMS
    state = full_meta.state_dict()
    assert len(state) == OFFICIAL_TENSORS
    # Buffers such as CLIP's position_ids or rotary inv_freq must not be persistent.
    assert set(state) == {name for name, _ in full_meta.named_parameters()}


def test_full_model_keys_match_the_official_index(full_meta):
    index = OFFICIAL / "model.safetensors.index.json"
    if not index.is_file():
        pytest.skip(f"official weight index not available at {index}")
    official = json.loads(index.read_text())
    state = full_meta.state_dict()
    assert set(state) == set(official["weight_map"])
    # All bf16 (2 bytes per parameter).
    assert official["metadata"]["total_size"] == 2 * sum(t.numel() for t in state.values())


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("model.embed_tokens.weight", (129280, 1280)),
        ("lm_head.weight", (129280, 1280)),
        ("model.norm.weight", (1280,)),
        ("model.layers.0.self_attn.q_proj.weight", (1280, 1280)),
        ("model.layers.11.self_attn.o_proj.weight", (1280, 1280)),
        ("model.layers.0.mlp.gate_proj.weight", (6848, 1280)),
        ("model.layers.0.mlp.down_proj.weight", (1280, 6848)),
        ("model.layers.1.mlp.gate.weight", (64, 1280)),
        ("model.layers.11.mlp.experts.63.up_proj.weight", (896, 1280)),
        ("model.layers.5.mlp.experts.0.down_proj.weight", (1280, 896)),
        ("model.layers.1.mlp.shared_experts.gate_proj.weight", (1792, 1280)),
        ("model.layers.1.mlp.shared_experts.down_proj.weight", (1280, 1792)),
        ("model.image_newline", (1280,)),
        ("model.view_seperator", (1280,)),
        ("model.projector.layers.weight", (1280, 2048)),
        ("model.projector.layers.bias", (1280,)),
        ("model.sam_model.patch_embed.proj.weight", (768, 3, 16, 16)),
        ("model.sam_model.patch_embed.proj.bias", (768,)),
        ("model.sam_model.pos_embed", (1, 64, 64, 768)),
        ("model.sam_model.blocks.0.attn.rel_pos_h", (27, 64)),
        ("model.sam_model.blocks.0.attn.rel_pos_w", (27, 64)),
        ("model.sam_model.blocks.2.attn.rel_pos_h", (127, 64)),
        ("model.sam_model.blocks.11.attn.rel_pos_w", (127, 64)),
        ("model.sam_model.blocks.10.attn.rel_pos_h", (27, 64)),
        ("model.sam_model.blocks.3.attn.qkv.weight", (2304, 768)),
        ("model.sam_model.blocks.3.mlp.lin1.weight", (3072, 768)),
        ("model.sam_model.neck.0.weight", (256, 768, 1, 1)),
        ("model.sam_model.neck.1.weight", (256,)),
        ("model.sam_model.neck.2.weight", (256, 256, 3, 3)),
        ("model.sam_model.neck.3.bias", (256,)),
        ("model.sam_model.net_2.weight", (512, 256, 3, 3)),
        ("model.sam_model.net_3.weight", (1024, 512, 3, 3)),
        ("model.vision_model.embeddings.class_embedding", (1024,)),
        ("model.vision_model.embeddings.patch_embedding.weight", (1024, 3, 14, 14)),
        ("model.vision_model.embeddings.position_embedding.weight", (257, 1024)),
        ("model.vision_model.pre_layrnorm.weight", (1024,)),
        ("model.vision_model.transformer.layers.23.self_attn.qkv_proj.weight", (3072, 1024)),
        ("model.vision_model.transformer.layers.0.mlp.fc1.weight", (4096, 1024)),
        ("model.vision_model.transformer.layers.0.mlp.fc2.weight", (1024, 4096)),
    ],
)
def test_full_model_shapes_match_the_official_checkpoint(full_shapes, key, shape):
    assert full_shapes[key] == shape


def test_full_model_key_groups(full_shapes):
    keys = list(full_shapes)
    assert sum(k.startswith("model.sam_model.") for k in keys) == 179
    assert sum(k.startswith("model.vision_model.") for k in keys) == 293
    assert sum(k.startswith("model.layers.") for k in keys) == 2231
    assert not any("bias" in k for k in keys if k.startswith("model.layers."))


# --- tiny model: shapes through every stage -----------------------------------------------


def pixels(batch: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def vision_stages(model, batch: int, size: int, seed: int):
    """SAM, CLIP and projector outputs for `batch` random views of `size`²."""
    with torch.no_grad():
        sam = model.sam(pixels(batch, size, seed=seed))
        clip = model.clip(sam)
        return sam, clip, model.project(sam, clip)


@pytest.fixture(scope="module")
def global_view(tiny_model):
    """Stage outputs of one 1024² view (base mode, and the global view of gundam)."""
    return vision_stages(tiny_model, 1, 1024, seed=1)


@pytest.fixture(scope="module")
def tile_views(tiny_model):
    """Stage outputs of a 2 cols x 3 rows grid of 640² tiles (gundam)."""
    return vision_stages(tiny_model, 6, 640, seed=2)


def test_stage_shapes_base(tiny_arch, tiny_model, global_view):
    sam, clip, feats = global_view
    c_sam, c_clip, hidden = tiny_arch.sam.out_channels, tiny_arch.clip.width, tiny_arch.lm.hidden_size
    assert sam.shape == (1, c_sam, 16, 16)  # 1024 / 16 patches / 4
    assert clip.shape == (1, 1 + 16 * 16, c_clip)  # CLS first
    assert feats.shape == (1, 256, hidden)
    embeds = tiny_model.layout(feats, None, (1, 1))
    assert embeds.shape == (image_token_count(1024, 1024, (1, 1)), hidden) == (273, hidden)
    for t in (sam, clip, feats, embeds):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()


def test_stage_shapes_gundam_tiles(tiny_arch, tiny_model, global_view, tile_views):
    sam, clip, feats = tile_views
    hidden = tiny_arch.lm.hidden_size
    assert sam.shape == (6, tiny_arch.sam.out_channels, 10, 10)  # 640 / 64
    assert clip.shape == (6, 101, tiny_arch.clip.width)
    assert feats.shape == (6, 100, hidden)
    embeds = tiny_model.layout(global_view[2], feats, (2, 3))
    assert embeds.shape == (image_token_count(1024, 640, (2, 3)), hidden) == (903, hidden)
    assert torch.isfinite(embeds).all()


def test_layout_order_tiles_global_separator(tiny_model, global_view, tile_views):
    """[stitched tile grid + newline per row] + [global grid + newline per row] + [separator]."""
    g, t = global_view[2], tile_views[2]
    cols, rows, qt, q = 2, 3, 10, 16
    newline, sep = tiny_model.model.image_newline, tiny_model.model.view_seperator
    expected = []
    for r in range(rows * qt):  # stitched rows
        tile_row, i = divmod(r, qt)
        for c in range(cols * qt):
            tile_col, j = divmod(c, qt)
            expected.append(t[tile_row * cols + tile_col, i * qt + j])
        expected.append(newline)
    for i in range(q):
        expected.extend(g[0, i * q : (i + 1) * q])
        expected.append(newline)
    expected.append(sep)
    torch.testing.assert_close(tiny_model.layout(g, t, (cols, rows)), torch.stack(expected), rtol=0, atol=0)


def test_projector_puts_clip_channels_first(tiny_arch, tiny_model, global_view):
    sam, clip, feats = global_view
    proj = tiny_model.model.projector.layers
    manual = torch.cat([clip[0, 1:], sam[0].flatten(1).T], dim=-1) @ proj.weight.T + proj.bias
    close(feats[0], manual, rel=1e-5)


# --- tiny model: prefill / decode ------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_model(tiny_arch, tiny_model) -> DeepSeekOCR:
    model = weights.build_model(tiny_arch, torch.device("cpu"), torch.float32, "eager")
    model.load_state_dict(tiny_model.state_dict())
    return model


def prompt(arch: DeepSeekOCRConfig, n_image: int = 9, n_text: int = 12, seed: int = 0):
    """[1, S] ids (BOS, image tokens, text) and image embeddings [n_image, hidden]."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 128000, (n_text,), generator=gen).tolist()
    ids = torch.tensor([[0] + [arch.image_token_id] * n_image + text])
    embeds = torch.randn(n_image, arch.lm.hidden_size, generator=gen)
    return ids, embeds


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_decode_steps_equal_longer_prefills(tiny_arch, tiny_model, eager_model, backend):
    model = tiny_model if backend == "sdpa" else eager_model
    ids, embeds = prompt(tiny_arch)
    n, steps = ids.shape[1] - 3, 3
    with torch.no_grad():
        cache = model.new_cache(ids.shape[1])
        decoded = [model.prefill(ids[:, :n], embeds, cache)]
        for s in range(steps):
            decoded.append(model.decode_step(ids[:, n + s : n + s + 1], cache))
        assert cache.length == ids.shape[1]
        for s, logits in enumerate(decoded):
            full = model.prefill(ids[:, : n + s], embeds, model.new_cache(n + s))
            assert logits.shape == (1, tiny_arch.lm.vocab_size) and logits.dtype == torch.float32
            close(logits, full)


def test_eager_and_sdpa_agree(tiny_arch, tiny_model, eager_model):
    ids, embeds = prompt(tiny_arch, seed=3)
    with torch.no_grad():
        results = []
        for model in (tiny_model, eager_model):
            cache = model.new_cache(ids.shape[1] + 1)
            prefill = model.prefill(ids, embeds, cache)
            decode = model.decode_step(torch.tensor([[5]]), cache)
            sam_out = torch.randn(
                1, tiny_arch.sam.out_channels, 8, 8, generator=torch.Generator().manual_seed(4)
            )
            clip = model.clip(sam_out)
            results.append((prefill, decode, clip))
    for sdpa, eager in zip(*results):
        close(eager, sdpa)


def test_multi_token_forward_on_non_empty_cache_raises(tiny_arch, tiny_model):
    ids, embeds = prompt(tiny_arch)
    with torch.no_grad():
        cache = tiny_model.new_cache(2 * ids.shape[1] + 8)
        tiny_model.prefill(ids, embeds, cache)
        with pytest.raises(ValueError, match="non-empty cache"):
            tiny_model.decode_step(torch.tensor([[5, 6]]), cache)
        with pytest.raises(ValueError, match="non-empty cache"):
            tiny_model.prefill(ids, embeds, cache)


def test_cache_overflow_raises(tiny_arch, tiny_model):
    ids, embeds = prompt(tiny_arch)
    with torch.no_grad():
        cache = tiny_model.new_cache(ids.shape[1])
        tiny_model.prefill(ids, embeds, cache)
        with pytest.raises(ValueError, match="cannot hold"):
            tiny_model.decode_step(torch.tensor([[5]]), cache)


# --- attention backends -------------------------------------------------------------------


def test_flash_attn_falls_back_to_sdpa_on_cpu_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert attention.resolve_backend("flash_attn", torch.device("cpu")) == "sdpa"
    assert len(caught) == 1
    assert "flash_attn" in str(caught[0].message) and "sdpa" in str(caught[0].message)


def _flash_backend(monkeypatch, capability, dtype, flash_module):
    """resolve_backend("flash_attn") as on a CUDA GPU of `capability`, with `flash_module` the
    flash_attn package (None: not installed; an exception: what importing it raises)."""
    import importlib
    import importlib.machinery

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    real_find, real_import = importlib.util.find_spec, importlib.import_module

    def find_spec(name, *args):
        if name == "flash_attn":
            return None if flash_module is None else importlib.machinery.ModuleSpec("flash_attn", None)
        return real_find(name, *args)

    def import_module(name, *args):
        if name != "flash_attn":
            return real_import(name, *args)
        if isinstance(flash_module, BaseException):
            raise flash_module
        return flash_module

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = attention.resolve_backend("flash_attn", torch.device("cuda", 0), dtype)
    return backend, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "capability, dtype, flash_module, why",
    [
        ((8, 0), torch.float32, ImportError(), "dtype float32"),
        ((7, 5), torch.bfloat16, ImportError(), "compute capability 7.5"),
        ((9, 0), torch.bfloat16, None, "not installed"),
        (
            (9, 0),
            torch.bfloat16,
            ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10"),
            "undefined symbol",
        ),
    ],
)
def test_flash_attn_that_cannot_run_falls_back_to_sdpa_saying_why(
    monkeypatch, capability, dtype, flash_module, why
):
    backend, warned = _flash_backend(monkeypatch, capability, dtype, flash_module)
    assert backend == "sdpa"
    assert len(warned) == 1 and why in warned[0] and "\n" not in warned[0]


def test_flash_attn_runs_on_an_sm80_gpu_in_half_precision_where_it_imports(monkeypatch):
    import types

    backend, warned = _flash_backend(monkeypatch, (8, 0), torch.bfloat16, types.ModuleType("flash_attn"))
    assert backend == "flash_attn" and warned == []


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_other_backends_resolve_silently(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.resolve_backend(name, torch.device("cpu")) == name


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve_backend("xformers", torch.device("cpu"))


def test_eager_attention_matches_sdpa_with_bias_and_offset_causal_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (5, 5, 5))
    bias = torch.randn(2, 3, 5, 5, generator=gen)
    for kwargs in ({"causal": True}, {"bias": bias}, {}):
        close(
            attention.attend(q, k, v, backend="eager", **kwargs),
            attention.attend(q, k, v, **kwargs),
            rel=1e-5,
        )
    # A decode-style query block at the end of a longer key sequence sees every earlier key.
    k_long, v_long = torch.randn(2, 3, 9, 16, generator=gen), torch.randn(2, 3, 9, 16, generator=gen)
    eager = attention.attend(q[:, :, :1], k_long, v_long, backend="eager", causal=True)
    close(eager, attention.attend(q[:, :, :1], k_long, v_long), rel=1e-5)


# --- MoE ------------------------------------------------------------------------------------


def naive_moe(moe, x: torch.Tensor) -> tuple[torch.Tensor, list[set[int]]]:
    """Per-token reference: top-k of softmax(fp32 gate logits), Σ w·expert(x) + shared(x)."""
    out, chosen = [], []
    for token in x.reshape(-1, x.shape[-1]):
        probs = (token.float() @ moe.gate.weight.float().T).softmax(-1)
        w, idx = probs.topk(moe.top_k)
        routed = sum(wi * moe.experts[int(e)](token[None])[0].float() for wi, e in zip(w, idx))
        out.append(routed.to(x.dtype) + moe.shared_experts(token[None])[0])
        chosen.append({int(e) for e in idx})
    return torch.stack(out).view(x.shape), chosen


def test_moe_matches_naive_per_token_reference(tiny_arch, tiny_model):
    moes = tiny_model.moe_layers()
    assert sorted(moes) == list(range(tiny_arch.lm.first_k_dense_replace, tiny_arch.lm.num_hidden_layers))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, tiny_arch.lm.hidden_size, generator=gen)
    for moe in moes.values():
        seen = []
        moe.on_route = seen.append
        try:
            with torch.no_grad():
                y = moe(x)
        finally:
            moe.on_route = None
        with torch.no_grad():
            expected, chosen = naive_moe(moe, x)
        assert y.shape == x.shape
        close(y, expected, rel=1e-5)
        # The hook sees the top-k expert ids of every token, [T, k].
        (experts,) = seen
        assert experts.shape == (26, tiny_arch.lm.num_experts_per_tok)
        assert [set(row.tolist()) for row in experts] == chosen


def test_dense_first_layer_and_moe_after(tiny_arch, tiny_model):
    layers = tiny_model.model.layers
    assert isinstance(layers[0].mlp, SwiGLU)
    assert all(isinstance(layer.mlp, MoE) for layer in layers[1:])
    assert layers[1].mlp.n_experts == len(layers[1].mlp.experts) == tiny_arch.lm.n_routed_experts


def test_tokens_per_expert_counts_every_assignment():
    # Expert ids of 3 tokens x top-2: expert 3 twice; 0, 1, 5 and 7 once; 2, 4 and 6 never.
    flat = torch.tensor([3, 0, 3, 7, 1, 5])
    assert tokens_per_expert(flat, 8) == [1, 1, 0, 2, 0, 1, 0, 1]


def test_moe_sizes_its_expert_batches_with_count_tokens(tiny_arch, tiny_model):
    """`count_tokens` is the one place the per-expert batch sizes come from (the FLOP validator
    replaces it on meta tensors): a wrong split must change the output."""
    moe = copy.deepcopy(tiny_model.model.layers[1].mlp)
    x = torch.randn(1, 5, tiny_arch.lm.hidden_size, generator=torch.Generator().manual_seed(0))
    calls = []

    def spy(flat: torch.Tensor, n_experts: int) -> list[int]:
        calls.append((flat.numel(), n_experts))
        return tokens_per_expert(flat, n_experts)

    with torch.no_grad():
        expected = moe(x)
        moe.count_tokens = spy
        torch.testing.assert_close(moe(x), expected, rtol=0, atol=0)
        assert calls == [(5 * tiny_arch.lm.num_experts_per_tok, tiny_arch.lm.n_routed_experts)]
        # Every assignment to the first expert: the batches no longer match the routing.
        moe.count_tokens = lambda flat, n: [flat.numel()] + [0] * (n - 1)
        assert not torch.equal(moe(x), expected)
