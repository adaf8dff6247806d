"""Each family's formula against FlopCounterMode on small real CPU tensors, run through the
model's own modules where it has one, plus the byte and Cost bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_perf_opt.analytic import families as fam
from llm_perf_opt.analytic.counted import flop_counter
from llm_perf_opt.analytic.families import Cost
from llm_perf_opt.models.deepseek_ocr.analytic import formulas as ocr_fam
from llm_perf_opt.models.deepseek_ocr.clip import ClipAttention
from llm_perf_opt.models.deepseek_ocr.config import ClipConfig, LMConfig, SamConfig
from llm_perf_opt.models.deepseek_ocr.decoder import Attention, KVCache, MoE, RMSNorm, SwiGLU, rope_cos_sin
from llm_perf_opt.models.deepseek_ocr.sam import LayerNorm2d, SamAttention, window_partition

F32 = "float32"
SMALL_LM = LMConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=3,
)


def counted(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@torch.no_grad()
@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(2, 7, 48)
    cost = fam.linear(14, 48, 80, F32, bias=bias)
    assert cost.matmul_flops == counted(lambda: layer(x)) == 2 * 14 * 48 * 80
    assert cost.weight_bytes == param_bytes(layer)
    assert cost.act_read_bytes == x.numel() * 4 and cost.act_write_bytes == 14 * 80 * 4
    assert cost.other_flops == (14 * 80 if bias else 0)


@torch.no_grad()
@pytest.mark.parametrize(
    "cin, cout, size, kernel, stride, padding, bias",
    [
        (3, 16, 32, 16, 16, 0, True),
        (16, 8, 12, 1, 1, 0, False),
        (8, 8, 12, 3, 1, 1, False),
        (8, 12, 13, 3, 2, 1, False),
    ],
)
def test_conv2d(cin, cout, size, kernel, stride, padding, bias):
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias)
    x = torch.randn(2, cin, size, size)
    cost = fam.conv2d(2, cin, cout, size, kernel, F32, stride=stride, padding=padding, bias=bias)
    out = conv(x)
    assert cost.matmul_flops == counted(lambda: conv(x))
    assert cost.weight_bytes == param_bytes(conv)
    assert cost.act_write_bytes == out.numel() * 4
    assert fam.conv2d_out(size, kernel, stride, padding) == out.shape[-1]


@torch.no_grad()
def test_norms_and_activations_have_no_matmul_flops():
    x = torch.randn(5, 32)
    ln, rms, ln2d = nn.LayerNorm(32), RMSNorm(32, 1e-6), LayerNorm2d(32)
    fmap = torch.randn(2, 32, 3, 3)
    cases = [
        (fam.layernorm(5, 32, F32), lambda: ln(x), ln, fam.LAYERNORM_FLOPS * 160),
        (fam.rmsnorm(5, 32, F32), lambda: rms(x), rms, fam.RMSNORM_FLOPS * 160),
        (fam.layernorm2d(2, 32, 3, F32), lambda: ln2d(fmap), ln2d, fam.LAYERNORM_FLOPS * 2 * 9 * 32),
        (fam.gelu(160, F32), lambda: F.gelu(x), None, fam.GELU_FLOPS * 160),
        (fam.quick_gelu(160, F32), lambda: x * torch.sigmoid(1.702 * x), None, fam.QUICK_GELU_FLOPS * 160),
        (fam.silu_gated(160, F32), lambda: F.silu(x) * x, None, fam.SILU_GATED_FLOPS * 160),
        (fam.add(160, F32), lambda: x + x, None, 160),
    ]
    for cost, run, module, other in cases:
        assert cost.matmul_flops == counted(run) == 0
        assert cost.other_flops == other
        assert cost.weight_bytes == (param_bytes(module) if module is not None else 0)


@torch.no_grad()
def test_embedding_reads_only_the_rows_it_gathers():
    table = nn.Embedding(1000, 16)
    ids = torch.randint(0, 1000, (1, 9))
    cost = fam.embedding(9, 16, F32)
    assert cost.matmul_flops == counted(lambda: table(ids)) == 0
    assert cost.weight_bytes == 9 * 16 * 4
    assert cost.act_read_bytes == ids.numel() * ids.element_size()


@torch.no_grad()
@pytest.mark.parametrize("grid, window", [(10, 4), (8, 4), (6, 0), (5, 7)])
def test_sam_attention(grid, window):
    cfg = SamConfig(width=64, heads=4, window_size=window or 14)
    attn = SamAttention(cfg, window or grid)
    x = torch.randn(2, grid, grid, 64)
    if window:
        windows, _ = window_partition(x, window)
        flops = counted(lambda: attn(windows))
    else:
        flops = counted(lambda: attn(x))
    cost = ocr_fam.sam_attention(2, grid, 64, 4, F32, window=window)
    assert cost.matmul_flops == flops
    assert cost.weight_bytes == param_bytes(attn)
    assert cost.masked_matmul_flops == 0


@torch.no_grad()
def test_clip_attention():
    cfg = ClipConfig(width=64, heads=4)
    attn = ClipAttention(cfg, "sdpa")
    x = torch.randn(3, 17, 64)
    cost = ocr_fam.clip_attention(3, 17, 64, 4, F32)
    assert cost.matmul_flops == counted(lambda: attn(x))
    assert cost.weight_bytes == param_bytes(attn)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_causal_attention_prefill_then_decode(backend):
    lm = SMALL_LM
    attn = Attention(lm, 0, backend)
    cache = KVCache(lm, 32, 1, torch.float32, torch.device("cpu"))
    s = 11
    rope = rope_cos_sin(torch.arange(s), lm.head_dim, lm.rope_theta, torch.float32)
    prefill = fam.causal_attention(s, 0, 64, 4, F32)
    assert prefill.matmul_flops == counted(lambda: attn(torch.randn(1, s, 64), rope, cache))
    cache.length = s
    rope = rope_cos_sin(torch.tensor([s]), lm.head_dim, lm.rope_theta, torch.float32)
    decode = fam.causal_attention(1, s, 64, 4, F32)
    assert decode.matmul_flops == counted(lambda: attn(torch.randn(1, 1, 64), rope, cache))
    assert prefill.weight_bytes == decode.weight_bytes == param_bytes(attn)
    assert decode.kv_write_bytes == 2 * 64 * 4 and decode.kv_read_bytes == 2 * (s + 1) * 64 * 4


def test_causal_attention_useful_is_the_lower_triangle():
    h, new, cached = 64, 7, 5
    cost = fam.causal_attention(new, cached, h, 4, F32)
    core = fam.attention_core(1, 4, new, cached + new, h // 4, F32)
    # query i (0-based) sees cached + i + 1 keys
    useful_core = sum(4 * h * (cached + i + 1) for i in range(new))
    assert cost.masked_matmul_flops == core.matmul_flops - useful_core
    assert fam.causal_attention(1, 9, h, 4, F32).masked_matmul_flops == 0


@torch.no_grad()
def test_swiglu_mlp():
    mlp = SwiGLU(64, 96)
    cost = fam.swiglu_mlp(13, 64, 96, F32)
    assert cost.matmul_flops == counted(lambda: mlp(torch.randn(1, 13, 64)))
    assert cost.weight_bytes == param_bytes(mlp)


@torch.no_grad()
def test_moe_counts_any_routing_the_same():
    lm = SMALL_LM
    layer = MoE(lm)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.1)
    seen = []
    layer.on_route = lambda experts: seen.append(experts)
    t = 10
    flops = counted(lambda: layer(torch.randn(1, t, 64)))
    touched = len(torch.unique(seen[0]))
    cost = ocr_fam.moe(t, 64, 24, 8, 3, 48, F32, experts_touched=touched)
    assert cost.matmul_flops == flops
    used = param_bytes(layer) - (8 - touched) * param_bytes(layer.experts[0])
    assert cost.weight_bytes == used
    parts = ocr_fam.moe_parts(t, 64, 24, 8, 3, 48, F32, experts_touched=touched)
    assert sum(parts.values(), Cost()) == cost


def test_expected_distinct_experts():
    assert fam.expected_distinct_experts(1, 64, 6) == pytest.approx(6)
    assert fam.expected_distinct_experts(0, 64, 6) == 0
    assert fam.expected_distinct_experts(2, 64, 6) == pytest.approx(64 * (1 - (58 / 64) ** 2))
    assert fam.expected_distinct_experts(915, 64, 6) == pytest.approx(64)
    # without touched experts the MoE reads the expected number
    cost = ocr_fam.moe(2, 64, 24, 8, 3, 48, F32)
    assert cost.weight_bytes == pytest.approx(
        (8 * 64 + fam.expected_distinct_experts(2, 8, 3) * 3 * 64 * 24 + 3 * 64 * 48) * 4
    )


@torch.no_grad()
def test_lm_head():
    head = nn.Linear(64, 300, bias=False)
    cost = fam.lm_head(1, 64, 300, F32)
    assert cost.matmul_flops == counted(lambda: head(torch.randn(1, 64)).float())
    assert cost.weight_bytes == param_bytes(head)
    assert cost.act_write_bytes == 300 * 4  # .float() of fp32 logits returns them, no copy
    bf16 = fam.lm_head(1, 64, 300, "bfloat16")
    assert bf16.act_write_bytes == 300 * 2 + 300 * 4  # bf16 logits, then their fp32 copy
    assert bf16.act_read_bytes == 64 * 2 + 300 * 2


def test_cost_arithmetic():
    a = Cost(matmul_flops=10, other_flops=2, weight_bytes=3, act_read_bytes=1, kv_write_bytes=4)
    a = a + Cost(masked_matmul_flops=5)
    b = 2 * a + a
    assert b == a * 3
    assert b.flops == 36 and b.useful_matmul_flops == 15 and b.useful_flops == 21 and b.bytes == 24
    assert sum([a, a]) == a + a
    assert set(a.as_dict()) >= {"matmul_flops", "flops", "bytes", "useful_matmul_flops"}


def test_dtype_bytes():
    assert fam.dtype_bytes(torch.bfloat16) == fam.dtype_bytes("bfloat16") == fam.dtype_bytes("bf16") == 2
    assert fam.dtype_bytes("torch.float32") == fam.dtype_bytes(torch.float32) == 4
    assert fam.dtype_bytes(torch.float8_e4m3fn) == 1
    assert fam.linear(1, 2, 3, torch.bfloat16).weight_bytes * 2 == fam.linear(1, 2, 3, "float32").weight_bytes


@pytest.mark.parametrize(
    "call",
    [
        lambda: fam.dtype_bytes("int3"),
        lambda: fam.linear(-1, 2, 3, F32),
        lambda: fam.linear(1.5j, 2, 3, F32),
        lambda: fam.conv2d(1, 3, 8, 4, 16, F32),
        lambda: ocr_fam.clip_attention(1, 5, 64, 5, F32),
        lambda: fam.expected_distinct_experts(3, 4, 6),
        lambda: ocr_fam.moe(1, 64, 24, 8, 3, 48, F32, experts_touched=4),
    ],
)
def test_bad_input_is_a_caller_bug(call):
    with pytest.raises(ValueError) as err:
        call()
    assert "\n" not in str(err.value)


def test_useful_flops_drop_the_masked_scores_softmax_included():
    # Prefill of 4 tokens, 2 heads of width 4: each head scores 4x4 = 16 pairs, of which the causal
    # mask keeps 1+2+3+4 = 10 and drops 6; 12 dropped over both heads.
    cost = fam.causal_attention(4, 0, 8, 2, F32)
    assert cost.masked_matmul_flops == 4 * 12 * 4  # QK^T and PV: 2 x 2 FLOPs per dropped pair per channel
    assert cost.masked_other_flops == fam.SOFTMAX_FLOPS * 12
    assert cost.useful_flops == cost.flops - 4 * 12 * 4 - fam.SOFTMAX_FLOPS * 12
    # One decode token sees every cached key: nothing is masked.
    step = fam.causal_attention(1, 9, 8, 2, F32)
    assert step.masked_matmul_flops == 0 and step.masked_other_flops == 0


def test_grouped_query_attention_shares_each_kv_head_between_query_heads():
    # hidden 8, 4 query heads of D = 2, 2 K/V heads (h_kv = 4); 3 new tokens, empty cache, fp32.
    gqa = fam.causal_attention(3, 0, 8, 4, "float32", kv_heads=2)
    mha = fam.causal_attention(3, 0, 8, 4, "float32")
    # q and o: 2·(2·3·8·8) = 768; k and v: 2·(2·3·8·4) = 384; scores and values: 4·4·3·3·2 = 288.
    assert gqa.matmul_flops == 768 + 384 + 288
    assert mha.matmul_flops == 768 + 768 + 288
    # K and V of 3 tokens over 4 features, fp32: written 2·3·4·4 = 96 B and read back as much.
    assert (gqa.kv_write_bytes, gqa.kv_read_bytes) == (96, 96)
    assert (mha.kv_write_bytes, mha.kv_read_bytes) == (192, 192)
    # Softmax work is per query head, whatever the sharing.
    assert gqa.other_flops - mha.other_flops == pytest.approx(
        fam.rope(3, 4, 2, "float32").other_flops - fam.rope(3, 8, 2, "float32").other_flops
    )
