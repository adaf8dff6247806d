"""`model.impl=fast` against the faithful implementation, on the tiny architecture in fp32 (CPU):
the same state dict, the same vision outputs, logits, greedy tokens and routing, and a MoE
whose decode path reads nothing on the host."""

from __future__ import annotations

import math

import pytest
import torch

from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.deepseek_ocr.decoder import MoE
from llm_perf_opt.models.deepseek_ocr.fast import FastDeepSeekOCR
from llm_perf_opt.models.deepseek_ocr.fast.decoder import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.fast.moe import FastMoE
from llm_perf_opt.models.deepseek_ocr.fast.paths import grouped_mm_op, grouped_mm_without_sync
from llm_perf_opt.models.deepseek_ocr.fast.sam import (
    FastSamAttention,
    folded_attention,
    rel_pos_terms,
)
from llm_perf_opt.models.deepseek_ocr.routing import balance_router
from llm_perf_opt.models.deepseek_ocr.sam import SamAttention, SamBlock
from llm_perf_opt.models.interface import SessionOptions
from llm_perf_opt.models.kernels.blocked_attention import blocked_attention
from llm_perf_opt.models.kernels.linear import FastLinear
from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

REL = 1e-4  # relative error allowed between the implementations (fp32)
DECODE_STEPS = 32


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    """Equal up to `rel` of the expected values' largest magnitude."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * max(scale, 1e-6))


@pytest.fixture(scope="module")
def models(tiny_arch):
    """(reference, fast) with the same weights; the MoE gates fitted to `lm_prompt` so that
    routing spreads over the experts, then copied into the fast model through its state dict."""
    reference = weights.dummy_model(tiny_arch, "cpu", torch.float32)
    ids, embeds = lm_prompt(tiny_arch)
    with torch.inference_mode():
        balance_router(reference, ids, embeds)
    fast = weights.dummy_model(tiny_arch, "cpu", torch.float32, impl="fast", seed=1)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def lm_prompt(arch, n_image: int = 40, n_text: int = 24):
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, 128000, (n_text,), generator=gen).tolist()
    ids = torch.tensor([[0] + [arch.image_token_id] * n_image + text])
    return ids, torch.randn(n_image, arch.lm.hidden_size, generator=gen)


# --- configuration and weights --------------------------------------------------------------


def test_impl_is_a_validated_model_option():
    assert load(["model=deepseek_ocr_tiny"]).model.impl == "reference"
    assert load(["model=deepseek_ocr_tiny", "model.impl=fast"]).model.impl == "fast"
    with pytest.raises(UserError, match="model.impl='quick' is not one of reference, fast"):
        load(["model=deepseek_ocr_tiny", "model.impl=quick"])


def test_both_implementations_have_the_same_state_dict(tiny_arch):
    reference = weights.build_model(tiny_arch, torch.device("meta"), torch.float32, "sdpa")
    fast = weights.build_model(tiny_arch, torch.device("meta"), torch.float32, "sdpa", impl="fast")
    assert isinstance(fast, FastDeepSeekOCR) and not isinstance(reference, FastDeepSeekOCR)
    shapes = {key: tuple(t.shape) for key, t in reference.state_dict().items()}
    assert {key: tuple(t.shape) for key, t in fast.state_dict().items()} == shapes
    # Same parameters too (the stacked expert tensors are views, not parameters).
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in reference.named_parameters()]


def test_dummy_weights_are_the_same_for_both(tiny_arch, tiny_model):
    fast = weights.dummy_model(tiny_arch, "cpu", torch.float32, impl="fast")
    reference = tiny_model.state_dict()
    for key, value in fast.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_routed_experts_are_views_of_one_stacked_tensor_per_layer(tiny_arch, models):
    _, fast = models
    lm = tiny_arch.lm
    i, d = lm.moe_intermediate_size, lm.hidden_size
    for moe in fast.moe_layers().values():
        assert moe.gate_up_weight.shape == (lm.n_routed_experts, 2 * i, d)
        assert moe.down_weight.shape == (lm.n_routed_experts, d, i)
        storage = moe.gate_up_weight.untyped_storage().data_ptr()
        for e, expert in enumerate(moe.experts):
            for name in ("gate_proj", "up_proj"):
                assert getattr(expert, name).weight.untyped_storage().data_ptr() == storage
            assert (
                expert.down_proj.weight.untyped_storage().data_ptr()
                == moe.down_weight.untyped_storage().data_ptr()
            )
            # Expert e's up projection is rows I..2I of slice e: e·2I·d + I·d elements in.
            offset = expert.up_proj.weight.data_ptr() - moe.gate_up_weight.data_ptr()
            assert offset == (e * 2 * i * d + i * d) * 4


def test_a_reference_checkpoint_loads_into_fast(tiny_arch, models, tmp_path):
    reference, _ = models
    folder = weights.save_checkpoint(reference, tmp_path / "ckpt")
    fast = weights.load_checkpoint(folder, "cpu", torch.float32, impl="fast")
    assert isinstance(fast, FastDeepSeekOCR)
    for key, value in reference.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
    # Loading wrote into the stacked tensors the fast MoE actually runs on.
    moe = fast.moe_layers()[1]
    assert torch.equal(moe.down_weight[3], reference.moe_layers()[1].experts[3].down_proj.weight)
    ids, embeds = lm_prompt(tiny_arch)
    with torch.inference_mode():
        close(
            fast.prefill(ids, embeds, fast.new_cache(ids.shape[1])),
            reference.prefill(ids, embeds, reference.new_cache(ids.shape[1])),
        )


# --- vision ------------------------------------------------------------------------------------


def test_vision_outputs_match(models):
    reference, fast = models
    gen = torch.Generator().manual_seed(2)
    pixels = torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1  # mode tiny: a 32×32 grid, 2 global blocks
    with torch.inference_mode():
        outs = []
        for model in (reference, fast):
            sam = model.sam(pixels)
            clip = model.clip(sam)
            outs.append((sam, clip, model.project(sam, clip)))
    for ref, got in zip(*outs):
        close(got, ref)


def attention_pair(tiny_arch, grid: int) -> tuple[SamAttention, FastSamAttention]:
    gen = torch.Generator().manual_seed(grid)
    reference = SamAttention(tiny_arch.sam, grid)
    for param in reference.parameters():
        param.data = torch.randn(param.shape, generator=gen) * 0.2
    fast = FastSamAttention(tiny_arch.sam, grid)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


@pytest.mark.parametrize("window", [14, 0], ids=["windowed", "global"])
def test_sam_blocks_match_on_gundam_tiles(tiny_arch, window):
    """Two 640-px tiles: a 40×40 grid, padded to 42 (3×3 windows of 14) in windowed blocks."""
    cfg = tiny_arch.sam
    reference = SamBlock(cfg, window)
    gen = torch.Generator().manual_seed(5)
    for param in reference.parameters():
        param.data = torch.randn(param.shape, generator=gen) * 0.2
    fast = SamBlock(cfg, window)
    fast.attn = FastSamAttention(cfg, window or cfg.img_size // cfg.patch_size)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 40, 40, cfg.width, generator=gen)
    with torch.inference_mode():
        close(fast(x), reference(x))


def test_sam_attention_matches_on_a_non_square_grid(tiny_arch):
    reference, fast = attention_pair(tiny_arch, grid=64)  # tables resized to 24 rows × 40 columns
    x = torch.randn(1, 24, 40, tiny_arch.sam.width, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        close(fast(x), reference(x))


def dense_biased_attention(q, k, v, rel_h, rel_w):
    """softmax(q·k/√D + bias) v with bias[i, j] = rel_h[i, j // W] + rel_w[i, j % W], built by indexing."""
    b, heads, n, d = q.shape
    h, w = rel_h.shape[2], rel_h.shape[3]
    rows = torch.arange(n) // w
    cols = torch.arange(n) % w
    rh = rel_h.reshape(b, heads, n, h)[..., rows]  # [.., i, j] = rel_h[i, row_j]
    rw = rel_w.reshape(b, heads, n, w)[..., cols]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) + rh + rw
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("formulation", ["blocked, 5 tiles", "blocked, one tile", "folded"])
def test_attention_formulations_match_the_dense_bias(formulation):
    gen = torch.Generator().manual_seed(7)
    b, heads, h, w, d = 2, 3, 24, 10, 16
    n = h * w
    q, k, v = (torch.randn(b, heads, n, d, generator=gen) for _ in range(3))
    rel_h = torch.randn(b, heads, h, w, h, generator=gen)
    rel_w = torch.randn(b, heads, h, w, w, generator=gen)
    expected = dense_biased_attention(q, k, v, rel_h, rel_w)
    if formulation == "folded":
        got = folded_attention(q, k, v, rel_h, rel_w)
    else:
        # 5 grid rows per tile: 24 rows make tiles of 5, 5, 5, 5 and 4 rows.
        tile = b * heads * 5 * w * n if formulation.endswith("5 tiles") else b * heads * n * n
        got = blocked_attention(q, k, v, rel_h, rel_w, tile_elements=tile)
    close(got, expected, rel=1e-5)


def test_rel_pos_terms_are_the_reference_bias(tiny_arch):
    """rel_h[i, row_j] + rel_w[i, col_j] equals the bias the reference builds."""
    reference, _ = attention_pair(tiny_arch, grid=14)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, tiny_arch.sam.heads, 14 * 14, tiny_arch.sam.head_dim, generator=gen)
    rel_h, rel_w = rel_pos_terms(q, reference.rel_pos_h, reference.rel_pos_w, 14, 14)
    rows, cols = torch.arange(196) // 14, torch.arange(196) % 14
    bias = rel_h.reshape(2, -1, 196, 14)[..., rows] + rel_w.reshape(2, -1, 196, 14)[..., cols]
    torch.testing.assert_close(bias, reference._rel_pos_bias(q, 14, 14), rtol=0, atol=0)


# --- language model ----------------------------------------------------------------------------


def generate(model, ids, embeds, cache, routes: list):
    """Prefill + DECODE_STEPS greedy steps: (logits of every forward, tokens), routing into `routes`."""
    hooks = list(model.moe_layers().values())
    for moe in hooks:
        moe.on_route = lambda experts: routes.append(experts.sort(-1).values)
    try:
        with torch.inference_mode():
            logits = [model.prefill(ids, embeds, cache)]
            tokens = [logits[-1].argmax(-1, keepdim=True)]
            for _ in range(DECODE_STEPS):
                logits.append(model.decode_step(tokens[-1], cache))
                tokens.append(logits[-1].argmax(-1, keepdim=True))
    finally:
        for moe in hooks:
            moe.on_route = None
    return logits, torch.cat(tokens).flatten().tolist()


@pytest.mark.parametrize("cache_kind", ["eager", "positioned"])
def test_prefill_and_every_decode_step_match(tiny_arch, models, cache_kind):
    """Eager: the fast MoE on the reference's decode path. Positioned: the body a CUDA graph
    captures (token and position from device tensors, masked attention over the whole cache),
    run eagerly."""
    reference, fast = models
    ids, embeds = lm_prompt(tiny_arch)
    max_len = ids.shape[1] + DECODE_STEPS
    if cache_kind == "eager":
        fast_cache = fast.new_cache(max_len)
        assert not isinstance(fast_cache, StaticKVCache)  # no graphs off CUDA
    else:
        fast_cache = StaticKVCache(tiny_arch.lm, max_len, 1, torch.float32, torch.device("cpu"))
    ref_routes, fast_routes = [], []
    ref_logits, ref_tokens = generate(reference, ids, embeds, reference.new_cache(max_len), ref_routes)
    fast_logits, fast_tokens = generate(fast, ids, embeds, fast_cache, fast_routes)
    assert len(fast_logits) == DECODE_STEPS + 1
    for got, expected in zip(fast_logits, ref_logits):
        close(got, expected)
    assert fast_tokens == ref_tokens
    assert len(set(ref_tokens)) > 1  # the dummy model does not just repeat one token
    # One routing record per MoE layer and forward, the same experts each time.
    assert len(fast_routes) == len(ref_routes) == (DECODE_STEPS + 1) * len(reference.moe_layers())
    for got, expected in zip(fast_routes, ref_routes):
        assert torch.equal(got, expected)
    assert len(torch.cat(ref_routes).unique()) == tiny_arch.lm.n_routed_experts


def moe_pair(tiny_arch, dtype=torch.float32) -> tuple[MoE, FastMoE]:
    gen = torch.Generator().manual_seed(9)
    reference = MoE(tiny_arch.lm)
    for param in reference.parameters():
        param.data = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
    fast = FastMoE(tiny_arch.lm)
    fast.load_state_dict(reference.state_dict())
    return reference.to(dtype), fast


@pytest.mark.parametrize("tokens", [1, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("path", ["forward", "grouped", "gathered", "one_by_one", "looped"])
def test_fast_moe_matches_the_reference_moe(tiny_arch, tokens, path):
    if path in ("gathered", "one_by_one") and tokens > 1:
        pytest.skip("a one-token form")
    reference, fast = moe_pair(tiny_arch)
    x = torch.randn(1, tokens, tiny_arch.lm.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        expected = reference(x)
        if path == "forward":
            got = fast(x)
        else:
            flat = x.reshape(tokens, -1)
            weights_, experts = fast.gate(flat).softmax(-1).topk(fast.top_k, dim=-1, sorted=False)
            routed = getattr(fast, path)(flat, weights_, experts)
            got = (routed.to(x.dtype) + fast.shared_experts(flat)).view(x.shape)
    close(got, expected, rel=1e-5)


def test_fast_lm_linears_keep_their_names(tiny_arch, models):
    _, fast = models
    assert isinstance(fast.lm_head, FastLinear)
    layer = fast.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, FastLinear)
    assert isinstance(layer.mlp.shared_experts.down_proj, FastLinear)
    assert type(layer.mlp.experts[0].gate_proj) is torch.nn.Linear  # runs from the stacks
    assert isinstance(fast.model.layers[0].mlp.up_proj, FastLinear)


def test_grouped_gemm_is_used_only_where_it_needs_no_sync():
    assert grouped_mm_without_sync(torch.device("cpu"), torch.float32)
    assert grouped_mm_without_sync(torch.device("cpu"), torch.bfloat16)
    assert grouped_mm_without_sync(torch.device("meta"), torch.bfloat16)
    assert not grouped_mm_without_sync(torch.device("meta"), torch.float32)


def test_torch_2_8s_private_grouped_gemm_is_taken_where_the_public_one_is_missing(tiny_arch, monkeypatch):
    """torch 2.8 and 2.9 have only `torch._grouped_mm`: the gate still opens, and the grouped
    experts run on it and match the reference MoE."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    assert grouped_mm_op() is torch._grouped_mm
    assert grouped_mm_without_sync(torch.device("cpu"), torch.float32)
    assert grouped_mm_without_sync(torch.device("meta"), torch.bfloat16)
    reference, fast = moe_pair(tiny_arch)
    flat = torch.randn(37, tiny_arch.lm.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        weights_, experts = fast.gate(flat).softmax(-1).topk(fast.top_k, dim=-1, sorted=False)
        got = fast.grouped(flat, weights_, experts).to(flat.dtype) + fast.shared_experts(flat)
        expected = reference(flat[None])[0]
    close(got, expected, rel=1e-5)
    monkeypatch.delattr(torch, "_grouped_mm")
    assert grouped_mm_op() is None and not grouped_mm_without_sync(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["grouped", "gathered"])
def test_fast_decode_moe_reads_nothing_on_the_host(tiny_arch, dtype):
    """Meta tensors carry no values: any .item(), .tolist() or int() of one raises. The reference
    MoE fails there (it reads its token counts); the fast one runs."""
    d = tiny_arch.lm.hidden_size
    with torch.device("meta"):
        reference, fast = MoE(tiny_arch.lm).to(dtype), FastMoE(tiny_arch.lm).to(dtype)
        x = torch.empty(1, 1, d, dtype=dtype)
    with pytest.raises((RuntimeError, NotImplementedError)):
        reference(x)
    y = fast(x)
    assert y.shape == (1, 1, d) and y.device.type == "meta"


def test_positioned_decode_step_reads_nothing_on_the_host(tiny_arch):
    """The whole step a CUDA graph captures, on meta tensors (bf16, the grouped MoE)."""
    with torch.device("meta"):
        model = FastDeepSeekOCR(tiny_arch).to(torch.bfloat16)
    cache = StaticKVCache(tiny_arch.lm, 16, 1, torch.bfloat16, torch.device("meta"))
    logits = model.positioned_step(cache)
    assert logits.shape == (1, tiny_arch.lm.vocab_size) and logits.dtype == torch.float32


def test_positioned_decode_refuses_a_full_cache(tiny_arch, models):
    _, fast = models
    cache = StaticKVCache(tiny_arch.lm, 4, 1, torch.float32, torch.device("cpu"))
    cache.length = 4
    with pytest.raises(ValueError, match="cannot hold 5"):
        fast.decode_step(torch.tensor([[7]]), cache)


# --- through the session ---------------------------------------------------------------------------


def test_session_with_impl_fast_generates_the_reference_tokens():
    tokens = {}
    for impl in ("reference", "fast"):
        cfg = load(["model=deepseek_ocr_tiny", "mode=tiny", f"model.impl={impl}"]).model
        session = DeepSeekOCRSession(cfg, SessionOptions(torch.device("cpu"), torch.float32))
        session.load()
        request = session.prepare(None, DEFAULT_PROMPT)
        session.fit_dummy_weights(request)
        tokens[impl] = session.generate(request, 6).tokens
    assert isinstance(session.model, FastDeepSeekOCR)
    assert tokens["fast"] == tokens["reference"]
