"""Memory footprint of a DeepSeek-OCR run from shapes alone, to set beside measured peaks.

Per stage: the weights that stage's modules hold, and its largest transient activation (one
tensor alive at once, in the run's dtype unless noted). For the run: the KV cache at its end
and the logits of one call. Attention is assumed fused (no score matrix), except where an
additive mask is materialised: SAM's relative-position bias.
"""

from __future__ import annotations

import math

from llm_perf_opt.analytic.families import dtype_bytes
from llm_perf_opt.models.deepseek_ocr.analytic.costs import MODEL_STAGES, Workload
from llm_perf_opt.models.deepseek_ocr.config import (
    ClipConfig,
    DeepSeekOCRConfig,
    LMConfig,
    SamConfig,
)
from llm_perf_opt.models.deepseek_ocr.fast.paths import FOLDED_ALIGN, FastPaths
from llm_perf_opt.models.deepseek_ocr.modes import image_token_count, tokens_per_side
from llm_perf_opt.models.deepseek_ocr.stages import (
    CLIP,
    DECODE,
    PREFILL,
    PROJECTOR,
    SAM,
)
from llm_perf_opt.models.interface import Footprint, StageMemory
from llm_perf_opt.models.kernels.blocked_attention import tile_rows

FP32 = 4


def sam_parameters(sam: SamConfig) -> int:
    """Patch conv (+bias), pos-embed, 12 blocks (2 LayerNorms, qkv+proj with biases, rel-pos
    tables of 2*grid-1 rows, MLP with biases), neck (two convs, two LayerNorm2d), net_2, net_3."""
    d, p, n = sam.width, sam.patch_size, sam.neck_channels
    grid = sam.img_size // p
    hidden = sam.mlp_ratio * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * hidden * d + hidden + d
    sides = [grid if i in sam.global_attn_indexes else sam.window_size for i in range(sam.depth)]
    rel_pos = sum(2 * (2 * side - 1) * sam.head_dim for side in sides)
    c2, c3 = sam.downsample_channels
    return (
        d * 3 * p * p
        + d
        + grid * grid * d
        + sam.depth * block
        + rel_pos
        + n * d
        + 2 * n
        + n * n * 9
        + 2 * n
        + c2 * n * 9
        + c3 * c2 * 9
    )


def clip_parameters(clip: ClipConfig) -> int:
    """CLS, the (unused) patch conv, position table, pre-LN, 24 blocks (2 LayerNorms, qkv and
    out projections with biases, fc1/fc2 with biases)."""
    w, f = clip.width, clip.ffn
    block = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * f + f) + (f * w + w)
    return w + w * 3 * clip.patch_size**2 + clip.num_positions * w + 2 * w + clip.layers * block


def projector_parameters(cfg: DeepSeekOCRConfig) -> int:
    """Linear(2048 -> 1280) with bias, plus the image_newline and view_seperator vectors."""
    h = cfg.lm.hidden_size
    return cfg.projector_in * h + h + 2 * h


def expert_parameters(lm: LMConfig) -> int:
    """One routed expert: gate, up and down projections, bias-free."""
    return 3 * lm.hidden_size * lm.moe_intermediate_size


def lm_parameters(lm: LMConfig) -> int:
    """embed_tokens, 12 layers (2 RMSNorms, q/k/v/o, dense SwiGLU or MoE: gate, 64 experts,
    shared experts), final norm, lm_head."""
    h = lm.hidden_size
    total = 2 * lm.vocab_size * h + h
    for i in range(lm.num_hidden_layers):
        total += 2 * h + 4 * h * h
        if lm.is_moe_layer(i):
            total += lm.n_routed_experts * h + lm.n_routed_experts * expert_parameters(lm)
            total += 3 * h * lm.shared_intermediate_size
        else:
            total += 3 * h * lm.intermediate_size
    return total


def stage_parameters(cfg: DeepSeekOCRConfig) -> dict[str, int]:
    """Parameters each stage's modules hold; prefill and decode share the whole LM."""
    lm = lm_parameters(cfg.lm)
    return {
        SAM: sam_parameters(cfg.sam),
        CLIP: clip_parameters(cfg.clip),
        PROJECTOR: projector_parameters(cfg),
        PREFILL: lm,
        DECODE: lm,
    }


def kv_bytes_per_token(lm: LMConfig, dtype: object) -> int:
    """layers * 2 (K and V) * kv_heads * head_dim * b: 61,440 B in bf16 for DeepSeek-OCR."""
    return lm.num_hidden_layers * 2 * lm.num_key_value_heads * lm.head_dim * dtype_bytes(dtype)


def _sam_transients(
    sam: SamConfig, size: int, batch: int, b: int, paths: FastPaths | None
) -> list[tuple[str, float]]:
    g = size // sam.patch_size
    d = sam.width
    w = sam.window_size
    padded = math.ceil(g / w) * w
    windows = (padded // w) ** 2
    common = [
        ("qkv [B, Np, 3d]", batch * padded * padded * 3 * d * b),
        ("MLP hidden [B, N, 4d]", batch * g * g * sam.mlp_ratio * d * b),
    ]
    attention = [("global", batch, g), (f"window {w}x{w}", batch * windows, w)]
    if paths is None or paths.sam_attention == "reference":
        return common + [
            (f"{kind} rel-pos bias [G*heads, k^2, k^2]", n * sam.heads * k**4 * b) for kind, n, k in attention
        ]
    if paths.sam_attention == "folded":

        def widened(k: int) -> int:
            return math.ceil((sam.head_dim + 2 * k) / FOLDED_ALIGN) * FOLDED_ALIGN

        return common + [
            (f"{kind} folded q' [G*heads, k^2, E={widened(k)}]", n * sam.heads * k * k * widened(k) * b)
            for kind, n, k in attention
        ]
    tiles = []
    for kind, n, k in attention:
        rows = tile_rows(n, sam.heads, k, k, paths.bias_tile_elements)
        tiles.append(
            (f"{kind} rel-pos bias tile [G*heads, {rows}*k, k^2]", n * sam.heads * rows * k * k * k * b)
        )
    return common + tiles


def _clip_transients(clip: ClipConfig, side: int, batch: int, b: int) -> list[tuple[str, float]]:
    t = side * side + 1
    return [
        ("qkv [B, T, 3w]", batch * t * 3 * clip.width * b),
        ("fc1 out [B, T, ffn]", batch * t * clip.ffn * b),
    ]


def _lm_transients(lm: LMConfig, tokens: int, batch: int, b: int, padded: bool) -> list[tuple[str, float]]:
    """`tokens` rows in all (B*S in prefill, B in a decode step)."""
    h = lm.hidden_size
    per_sequence = tokens // batch
    mask = [("padding bias [B, 1, S, S]", tokens * per_sequence * b)] if padded else []
    return mask + [
        ("dense MLP gate/up out [B*S, I]", tokens * lm.intermediate_size * b),
        ("MoE gate input in fp32 [B*S, h]", tokens * h * FP32),
        ("routed expert inputs [B*S*k, h]", tokens * lm.num_experts_per_tok * h * b),
        ("routed outputs in fp32 [B*S*k, h]", tokens * lm.num_experts_per_tok * h * FP32),
        ("logits fp32 [B, V]", batch * lm.vocab_size * FP32),
    ]


def _largest(candidates: list[tuple[str, float]]) -> tuple[str, float]:
    return max(candidates, key=lambda c: c[1])


def footprint(cfg: DeepSeekOCRConfig, workload: Workload, paths: FastPaths | None = None) -> Footprint:
    """Footprint of the run a StageModel describes (its `workload`), for the reference or the
    fast `paths` (SAM's bias in tiles, or folded into widened queries and keys): per stage, its
    weights and largest transient; the KV cache as allocated (B sequences of S + decode_steps + 1
    positions), one call's logits (last position of each sequence, fp32) and the whole model's
    weights."""
    b = dtype_bytes(workload.dtype)
    params = stage_parameters(cfg)
    batch = workload.batch
    views = [(workload.global_size, batch)] + (
        [(workload.tile_size, workload.tiles)] if workload.tiles else []
    )
    padded = len({image_token_count(workload.global_size, workload.tile_size, g) for g in workload.pages}) > 1
    transients = {
        SAM: [c for size, n in views for c in _sam_transients(cfg.sam, size, n, b, paths)],
        CLIP: [c for size, n in views for c in _clip_transients(cfg.clip, tokens_per_side(size), n, b)],
        PROJECTOR: [
            ("fused input [B, q^2, 2048]", n * tokens_per_side(size) ** 2 * cfg.projector_in * b)
            for size, n in views
        ],
        PREFILL: _lm_transients(cfg.lm, batch * workload.prompt_tokens, batch, b, padded),
        DECODE: _lm_transients(cfg.lm, batch, batch, b, False),
    }
    rows = []
    for stage in MODEL_STAGES:
        name, size = _largest(transients[stage])
        rows.append(StageMemory(stage, params[stage], params[stage] * b, name, size))
    per_token = kv_bytes_per_token(cfg.lm, workload.dtype)
    total_params = params[SAM] + params[CLIP] + params[PROJECTOR] + params[PREFILL]
    return Footprint(
        stages=tuple(rows),
        kv_cache_bytes=batch * per_token * (workload.prompt_tokens + workload.decode_steps + 1),
        kv_bytes_per_token=per_token,
        logits_bytes=batch * cfg.lm.vocab_size * FP32,
        total_weight_bytes=total_params * b,
    )
