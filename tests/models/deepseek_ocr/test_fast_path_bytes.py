"""The analytic bytes of `model.impl=fast` against ByteCounter: each fast formulation's family
formula, then every stage of the tiny fast model for the CPU's paths and the GPU's.

Real CPU tensors where the path reads values (routing, the host's expert ids); meta tensors for
the folded attention, whose output layout is the CUDA kernel's (byte_count._fused_attention).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from model_costs import forward_total

from llm_perf_opt.analytic import families as fam
from llm_perf_opt.analytic.byte_count import ByteCounter
from llm_perf_opt.config import load
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.deepseek_ocr.analytic import formulas as ocr_fam
from llm_perf_opt.models.deepseek_ocr.analytic.costs import MODEL_STAGES, stage_costs
from llm_perf_opt.models.deepseek_ocr.config import SamConfig
from llm_perf_opt.models.deepseek_ocr.fast.moe import FastMoE
from llm_perf_opt.models.deepseek_ocr.fast.paths import FastPaths
from llm_perf_opt.models.deepseek_ocr.fast.sam import FastSamAttention
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.models.deepseek_ocr.sam import window_partition
from llm_perf_opt.models.kernels.blocked_attention import tile_rows
from llm_perf_opt.models.kernels.linear import CHUNK_ROWS, use_fast_linears

SAM, CLIP, PROJECTOR, PREFILL, DECODE = MODEL_STAGES
FIELDS = ("weight_bytes", "act_read_bytes", "act_write_bytes", "kv_read_bytes", "kv_write_bytes")
DTYPES = [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")]


def byte_fields(cost: fam.Cost) -> tuple[float, ...]:
    return tuple(getattr(cost, name) for name in FIELDS)


def host_bincount(flat: torch.Tensor, n_experts: int) -> list[int]:
    """Tokens per expert without an aten op, so the count sees what the analytic model does
    (a real MoE's bincount adds T*k*8 read and E*8 written, which meta runs never see)."""
    return np.bincount(flat.numpy(), minlength=n_experts).tolist()


def paths(sam: str, prefill: str, decode_moe: str, decode: str, tile: int = 1 << 26, **others) -> FastPaths:
    return FastPaths(sam, prefill, decode_moe, decode, bias_tile_elements=tile, **others)


# -- one module ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "name"), DTYPES)
@pytest.mark.parametrize(
    ("grid", "window", "table_side"), [(32, 14, 14), (32, 0, 64), (16, 0, 16)]
)  # 9 padded windows (D + 2k = 60 -> 64), global with a resized table (96), global (64, no pad)
@pytest.mark.parametrize(
    ("bias", "tile"), [("blocked", 1 << 26), ("blocked", 3000), ("folded", 1)]
)  # one tile, one grid row per tile, folded
def test_sam_attention_paths_match_the_count(dtype, name, grid, window, table_side, bias, tile):
    device = "meta" if bias == "folded" else "cpu"
    attn = FastSamAttention(SamConfig(width=64, heads=2), table_side).to(device=device, dtype=dtype)
    attn.paths = paths(bias, "grouped", "grouped", "eager", tile)
    x = torch.randn(1, grid, grid, 64, dtype=dtype, device=device)
    groups_in = window_partition(x, window)[0] if window else x
    with torch.no_grad(), ByteCounter(weights=attn.parameters()) as counter:
        attn(groups_in)
    side = window or grid
    rows = tile_rows(groups_in.shape[0], 2, side, side, tile)
    cost = ocr_fam.sam_attention(
        1, grid, 64, 2, name, window=window, table_side=table_side, bias=bias, tile_rows=rows
    )
    assert byte_fields(counter.total) == byte_fields(cost)


@pytest.mark.parametrize(("dtype", "name"), DTYPES)
@pytest.mark.parametrize(
    ("routed", "tokens"),
    [
        ("grouped", 1),
        ("grouped", 5),
        ("grouped", 40),
        ("gathered", 1),
        ("one_by_one", 1),
        ("one_by_one", 5),
        ("looped", 5),
    ],
)
def test_moe_paths_match_the_count(tiny_arch, dtype, name, routed, tokens):
    """A few tokens take `moe_batch`'s way, and the shared experts' products (and the one-by-one
    experts') run weight-major in fp32."""
    lm = tiny_arch.lm
    torch.manual_seed(tokens)
    layer = FastMoE(lm)
    use_fast_linears(layer.shared_experts)  # as install_fast_modules does
    for tensor in (
        layer.gate_up_weight,
        layer.down_weight,
        layer.gate.weight,
        *layer.shared_experts.parameters(),
    ):
        torch.nn.init.normal_(tensor)
    layer = layer.to(dtype)
    layer.tie_experts()
    layer.count_tokens = host_bincount
    layer.paths = paths(
        "blocked",
        "grouped",
        routed if tokens == 1 else "grouped",
        "eager",
        moe_batch=routed if tokens > 1 else "looped",
        rows="weight_major",
    )
    chosen = []
    layer.on_route = lambda experts: chosen.append(experts.tolist())
    x = torch.randn(1, tokens, lm.hidden_size, dtype=dtype)
    with torch.no_grad(), ByteCounter(weights=layer.parameters()) as counter:
        layer(x)
    touched = len({e for row in chosen[0] for e in row})
    block = CHUNK_ROWS if tokens > 1 and dtype == torch.float32 else None
    cost = ocr_fam.moe(
        tokens,
        lm.hidden_size,
        lm.moe_intermediate_size,
        lm.n_routed_experts,
        lm.num_experts_per_tok,
        lm.shared_intermediate_size,
        name,
        experts_touched=touched,
        routed=routed,
        weight_major_block=block,
    )
    assert byte_fields(counter.total) == byte_fields(cost)


def test_fast_paths_keep_the_reference_flops():
    """The paths move other bytes; the useful work, and so the FLOPs, are the reference's."""
    for bias in ("blocked", "folded"):
        fast = ocr_fam.sam_attention(1, 64, 768, 12, "bfloat16", bias=bias, tile_rows=16)
        reference = ocr_fam.sam_attention(1, 64, 768, 12, "bfloat16")
        assert (fast.matmul_flops, fast.other_flops) == (reference.matmul_flops, reference.other_flops)
    for routed in ("grouped", "gathered", "one_by_one"):
        fast = ocr_fam.moe(1, 1280, 896, 64, 6, 1792, "bfloat16", routed=routed)
        reference = ocr_fam.moe(1, 1280, 896, 64, 6, 1792, "bfloat16")
        assert (fast.matmul_flops, fast.other_flops) == (reference.matmul_flops, reference.other_flops)


def test_blocked_sam_drops_the_copy_of_the_bias_at_base_size():
    """Base mode's global block, bf16: the bias is 12 heads x 4096^2 x 2 B = 402,653,184 B. The
    reference writes it, copies it (read + write) and SDPA reads it: 4 x 402.65 MB. Blocked in 4
    tiles of 16 rows writes and reads it once (2 x) but reads K and V (4096 x 768 x 2 B =
    6,291,456 B each) three more times and copies the output (read + write 6,291,456 B)."""
    reference = ocr_fam.sam_attention(1, 64, 768, 12, "bfloat16")
    blocked = ocr_fam.sam_attention(1, 64, 768, 12, "bfloat16", bias="blocked", tile_rows=16)
    bias, kv = 402_653_184, 6_291_456
    assert reference.bytes - blocked.bytes == 2 * bias - 3 * 2 * kv - 2 * kv


# -- the whole tiny model -----------------------------------------------------------------------


def fast_model(arch, dtype: torch.dtype, fixed: FastPaths):
    model = weights.dummy_model(arch, "cpu", dtype, impl="fast")
    model.use_paths(fixed)
    for layer in model.moe_layers().values():
        layer.count_tokens = host_bincount
    return model


@pytest.mark.parametrize(("dtype", "name"), DTYPES)
@pytest.mark.parametrize(
    "fixed",
    [
        paths("blocked", "grouped", "one_by_one", "eager"),  # the CPU's choice
        paths("blocked", "looped", "gathered", "static", tile=100_000),  # a GPU's decode, bias in tiles
    ],
    ids=["cpu", "gpu-decode"],
)
@torch.no_grad()
def test_every_stage_of_the_fast_model_moves_the_analytic_bytes(tiny_arch, dtype, name, fixed):
    cfg = load(["model=deepseek_ocr_tiny", "mode=tiny"]).model
    model = fast_model(tiny_arch, dtype, fixed)
    lm = tiny_arch.lm
    routes: dict[int, list[list[int]]] = {i: [] for i in model.moe_layers()}
    for i, layer in model.moe_layers().items():
        layer.on_route = lambda experts, i=i: routes[i].append(
            host_bincount(experts.flatten(), lm.n_routed_experts)
        )
    params = list(model.parameters())

    def count(fn, kv=()):
        with ByteCounter(weights=params, kv=kv) as counter:
            out = fn()
        return counter.total, out

    pixels = torch.randn(1, 3, 512, 512, dtype=dtype, generator=torch.Generator().manual_seed(0))
    counted = {}
    counted[SAM], sam_out = count(lambda: model.sam(pixels))
    counted[CLIP], clip_out = count(lambda: model.clip(sam_out))
    counted[PROJECTOR], feats = count(lambda: model.project(sam_out, clip_out))
    embeds = model.layout(feats, None, (1, 1))
    s, steps, max_new = embeds.shape[0] + 12, 3, 5
    ids = torch.full((1, s), 100)
    ids[0, 1 : 1 + embeds.shape[0]] = tiny_arch.image_token_id
    cache = model.new_cache(s + max_new)
    kv = cache.keys + cache.values
    counted[PREFILL], _ = count(lambda: model.prefill(ids, embeds, cache), kv)
    token = torch.tensor([[100]])
    decode = [count(lambda: model.decode_step(token, cache), kv)[0] for _ in range(steps)]
    layers = sorted(routes)
    routing = RoutingRecord(
        prefill=tuple(tuple(routes[i][0]) for i in layers),
        decode=tuple(tuple(tuple(routes[i][1 + j]) for i in layers) for j in range(steps)),
    )
    analytic = stage_costs(
        tiny_arch,
        cfg.mode,
        text_tokens=12,
        decode_steps=steps,
        dtype=name,
        routing=routing,
        paths=fixed,
        cache_len=s + max_new,
    )
    # Vision in bf16 is left out: CPU's LayerNorm returns its per-row mean and rstd in bf16 where
    # the meta model the formulas follow (and CUDA) keeps them in fp32, 4 B fewer per row in SAM
    # and CLIP, reference and fast alike; fp32 checks vision.
    stages = (PREFILL,) if dtype == torch.bfloat16 else (SAM, CLIP, PROJECTOR, PREFILL)
    for stage in stages:
        assert byte_fields(counted[stage]) == pytest.approx(
            byte_fields(forward_total(analytic.stages[stage])), rel=1e-12
        ), stage
    step = forward_total(analytic.decode_step)  # the model's calls alone, without the session's pick
    assert byte_fields(decode[0]) == pytest.approx(byte_fields(step), rel=1e-12)
    assert byte_fields(sum(decode, fam.Cost())) == pytest.approx(
        byte_fields(forward_total(analytic.stages[DECODE])), rel=1e-12
    )


@torch.no_grad()
def test_folded_sam_moves_the_analytic_bytes_on_meta(tiny_arch):
    """The whole SAM stage with the folded attention, on meta in bf16 (the GPU's choice)."""
    model = weights.build_model(tiny_arch, torch.device("meta"), torch.bfloat16, "sdpa", impl="fast")
    model.use_paths(paths("folded", "grouped", "grouped", "static"))
    cfg = load(["model=deepseek_ocr_tiny", "mode=tiny"]).model
    pixels = torch.empty(1, 3, 512, 512, dtype=torch.bfloat16, device="meta")
    with ByteCounter(weights=model.parameters()) as counter:
        model.sam(pixels)
    analytic = stage_costs(tiny_arch, cfg.mode, dtype="bfloat16", paths=model.paths)
    assert byte_fields(counter.total) == byte_fields(forward_total(analytic.stages[SAM]))


@torch.no_grad()
def test_a_batch_moves_the_analytic_bytes_with_weight_major_rows(tiny_arch):
    """Two copies of a page in fp32 with the CPU's paths: each decode step runs 2 tokens
    (weight-major products, lm_head's too, and one-by-one experts over both)."""
    cfg = load(["model=deepseek_ocr_tiny", "mode=tiny"]).model
    fixed = paths("blocked", "grouped", "one_by_one", "eager", moe_batch="one_by_one", rows="weight_major")
    model = fast_model(tiny_arch, torch.float32, fixed)
    lm = tiny_arch.lm
    routes: dict[int, list[list[int]]] = {i: [] for i in model.moe_layers()}
    for i, layer in model.moe_layers().items():
        layer.on_route = lambda experts, i=i: routes[i].append(
            host_bincount(experts.flatten(), lm.n_routed_experts)
        )
    params = list(model.parameters())
    pixels = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    sam_out = model.sam(pixels)
    embeds = model.layout(model.project(sam_out, model.clip(sam_out)), None, (1, 1))
    s, steps, max_new = embeds.shape[0] + 12, 2, 4
    ids = torch.full((2, s), 100)
    ids[:, 1 : 1 + embeds.shape[0]] = tiny_arch.image_token_id
    cache = model.new_cache(s + max_new, batch=2)
    kv = cache.keys + cache.values
    model.prefill(ids, torch.cat([embeds, embeds]), cache)
    tokens = torch.tensor([[100], [7]])  # different tokens: the two rows route apart
    decode = []
    for _ in range(steps):
        with ByteCounter(weights=params, kv=kv) as counter:
            model.decode_step(tokens, cache)
        decode.append(counter.total)
    layers = sorted(routes)
    routing = RoutingRecord(
        prefill=tuple(tuple(routes[i][0]) for i in layers),
        decode=tuple(tuple(tuple(routes[i][1 + j]) for i in layers) for j in range(steps)),
    )
    analytic = stage_costs(
        tiny_arch,
        cfg.mode,
        text_tokens=12,
        decode_steps=steps,
        dtype="float32",
        routing=routing,
        paths=fixed,
        cache_len=s + max_new,
        grids=[(1, 1), (1, 1)],
    )
    assert byte_fields(decode[0]) == pytest.approx(
        byte_fields(forward_total(analytic.decode_step)), rel=1e-12
    )
    plain = stage_costs(
        tiny_arch,
        cfg.mode,
        text_tokens=12,
        decode_steps=steps,
        dtype="float32",
        routing=routing,
        paths=dataclasses.replace(fixed, rows="plain"),
        cache_len=s + max_new,
        grids=[(1, 1), (1, 1)],
    )
    decode_total = forward_total(analytic.stages[DECODE])
    assert byte_fields(sum(decode, fam.Cost())) == pytest.approx(byte_fields(decode_total), rel=1e-12)
    # Weight-major products move more than F.linear's: the transposing copies of their outputs.
    assert forward_total(analytic.decode_step).bytes > forward_total(plain.decode_step).bytes
