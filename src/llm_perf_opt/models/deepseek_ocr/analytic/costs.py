"""Analytic stage model of DeepSeek-OCR composed from the module families (analytic.families and
its own, formulas.py).

    model = stage_costs(cfg, mode, grid=(2, 3), text_tokens=12, decode_steps=1000)
    model.totals()      one row per stage (decode: the whole run, and one step)
    model.breakdown()   one row per (stage, family)
    model.experts()     distinct routed experts read, expected and observed
    model.costs()       all of it as the harness reads it (models.interface.StageCosts)

A run is what the session's stage ranges hold: SAM (after casting the fp32 pixels to the
model's dtype), CLIP and the projector over the global view (batch 1) and, when tiled, over
all tiles (one batch), then the image tokens laid out for the LM (in the projector's range);
prefill of S = image tokens + text tokens; then `decode_steps` decode steps, step i (0-based)
feeding one token against a cache of S + i positions; prefill and every step end with the
greedy pick of the next token. The first generated token comes from prefill's logits, so n
generated tokens take n - 1 decode steps.

Attention FLOPs are reported two ways: `matmul_flops` is *executed* work, what a dense kernel
computes and FlopCounterMode counts (full S x S in prefill); `useful_matmul_flops` keeps
only the causal lower triangle. See ROOFLINE_FLOPS for the one the roofline uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from llm_perf_opt.analytic import families as fam
from llm_perf_opt.analytic.families import Cost
from llm_perf_opt.models.deepseek_ocr.analytic import formulas as ocr_fam
from llm_perf_opt.models.deepseek_ocr.config import (
    ClipConfig,
    DeepSeekOCRConfig,
    LMConfig,
    SamConfig,
)
from llm_perf_opt.models.deepseek_ocr.fast.paths import FOLDED_ALIGN, FastPaths
from llm_perf_opt.models.deepseek_ocr.modes import (
    ModeSpec,
    image_token_count,
    tokens_per_side,
)
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.models.deepseek_ocr.stages import (
    CLIP,
    DECODE,
    PREFILL,
    PROJECTOR,
    SAM,
)
from llm_perf_opt.models.interface import ExpertUsage, FamilyWork, StageCosts
from llm_perf_opt.models.kernels.blocked_attention import tile_rows
from llm_perf_opt.models.kernels.linear import CHUNK_ROWS, FEW_ROWS

#: Stages the analytic model covers, in run order (preprocessing runs on the host, no FLOPs here).
MODEL_STAGES: tuple[str, ...] = (SAM, CLIP, PROJECTOR, PREFILL, DECODE)

#: Scopes of a row: a whole run, or the first decode step alone.
RUN, STEP = "run", "step"

#: BOS plus the "<|grounding|>Convert the document to markdown." prompt, about 12 tokens.
DEFAULT_TEXT_TOKENS = 12

#: Which attention count the roofline uses, and why.
ROOFLINE_FLOPS = "useful_flops"
ROOFLINE_NOTE = (
    "roofline uses useful FLOPs (causal lower triangle): the GPU prefill kernels (SDPA flash/"
    "efficient and flash_attn with is_causal) skip fully masked tiles, so they do about the useful "
    "work; executed FLOPs (full S x S, = FlopCounterMode) would credit work never done. "
    "They differ only in prefill attention."
)

_METRICS = (
    "matmul_flops",
    "useful_matmul_flops",
    "other_flops",
    "useful_other_flops",
    "flops",
    "useful_flops",
    "weight_bytes",
    "act_read_bytes",
    "act_write_bytes",
    "kv_read_bytes",
    "kv_write_bytes",
    "bytes",
)

Breakdown = dict[str, Cost]  # family -> cost

#: The nested `stage/family` range (models/deepseek_ocr/families.py) each analytic family runs in,
#: per stage. Families not listed (residual adds, the LayerNorms SAM and CLIP run outside a
#: tagged module, position tables, window partitioning, ...) run in the stage range itself.
RANGE_FAMILIES: dict[str, dict[str, str]] = {
    SAM: {
        "patch_conv": "patch_embed",
        "sam_attention_global": "attn",
        "sam_attention_window": "attn",
        "linear": "mlp",
        "gelu": "mlp",
        "conv2d": "neck",
        "layernorm2d": "neck",
    },
    CLIP: {"clip_attention": "attn", "linear": "mlp", "quick_gelu": "mlp"},
    PROJECTOR: {"concat": "linear", "linear": "linear"},  # the layout runs outside the projector module
    **dict.fromkeys(
        (PREFILL, DECODE),
        {
            "embedding": "embed",
            "rmsnorm": "norm",
            "causal_attention": "attn",
            "swiglu_mlp": "mlp",
            "moe_gate": "moe",
            "moe_routed": "moe",
            "moe_shared": "moe",
            "lm_head": "lm_head",
        },
    ),
}


def _accumulate(items: Sequence[tuple[str, Cost]]) -> Breakdown:
    out: Breakdown = {}
    for family, cost in items:
        out[family] = out.get(family, Cost()) + cost
    return out


def _total(parts: Breakdown) -> Cost:
    return sum(parts.values(), Cost())


def _moe_layers(lm: LMConfig) -> list[int]:
    return [i for i in range(lm.num_hidden_layers) if lm.is_moe_layer(i)]


# -- vision ------------------------------------------------------------------------------------


def sam_costs(
    sam: SamConfig, size: int, batch: int, dtype: object, paths: FastPaths | None = None
) -> Breakdown:
    """SAM over `batch` views of size x size: patch conv, pos-embed add, 12 blocks, neck, net_2, net_3.

    The position table and the global blocks' rel-pos tables are built for img_size; other view
    sizes resize them every forward. The attention applies its rel-pos bias as the fast `paths`
    do (blocked or folded), or materialised as the reference does (None, or "reference").
    """
    if size % sam.patch_size:
        raise ValueError(f"sam: view size {size} is not a multiple of the patch size {sam.patch_size}")
    g = size // sam.patch_size
    table_grid = sam.img_size // sam.patch_size
    d, n = sam.width, batch * g * g
    c2, c3 = sam.downsample_channels
    items = [
        (
            "patch_conv",
            fam.conv2d(batch, 3, d, size, sam.patch_size, dtype, stride=sam.patch_size, bias=True),
        ),
        ("pos_embed", ocr_fam.sam_pos_embed(batch, g, table_grid, d, dtype)),
    ]
    for i in range(sam.depth):
        window = 0 if i in sam.global_attn_indexes else sam.window_size
        side = window or g
        bias = {"bias": "materialised"}
        if paths is not None and paths.sam_attention != "reference":
            groups = batch * math.ceil(g / side) ** 2
            rows = tile_rows(groups, sam.heads, side, side, paths.bias_tile_elements)
            bias = {"bias": paths.sam_attention, "tile_rows": rows, "align": FOLDED_ALIGN}
        if window:
            items += [
                (
                    "sam_attention_window",
                    ocr_fam.sam_attention(batch, g, d, sam.heads, dtype, window=window, **bias),
                ),
                ("window_partition", ocr_fam.window_partition(batch, g, d, window, dtype)),
            ]
        else:
            attention = ocr_fam.sam_attention(batch, g, d, sam.heads, dtype, table_side=table_grid, **bias)
            items.append(("sam_attention_global", attention))
        items += [
            ("layernorm", 2 * fam.layernorm(n, d, dtype)),
            ("add", 2 * fam.add(n * d, dtype)),
            ("linear", fam.linear(n, d, sam.mlp_ratio * d, dtype)),
            ("gelu", fam.gelu(n * sam.mlp_ratio * d, dtype)),
            ("linear", fam.linear(n, sam.mlp_ratio * d, d, dtype)),
        ]
    g2 = fam.conv2d_out(g, 3, 2, 1)
    items += [
        ("conv2d", fam.conv2d(batch, d, sam.neck_channels, g, 1, dtype)),
        ("layernorm2d", fam.layernorm2d(batch, sam.neck_channels, g, dtype)),
        ("conv2d", fam.conv2d(batch, sam.neck_channels, sam.neck_channels, g, 3, dtype, padding=1)),
        ("layernorm2d", fam.layernorm2d(batch, sam.neck_channels, g, dtype)),
        ("conv2d", fam.conv2d(batch, sam.neck_channels, c2, g, 3, dtype, stride=2, padding=1)),
        ("conv2d", fam.conv2d(batch, c2, c3, g2, 3, dtype, stride=2, padding=1)),
    ]
    return _accumulate(items)


def clip_costs(clip: ClipConfig, side: int, batch: int, dtype: object) -> Breakdown:
    """CLIP over `batch` views whose SAM output is side x side: T = side^2 + 1 tokens (CLS first)."""
    t = side * side + 1
    rows, w = batch * t, clip.width
    items = [
        ("embeddings", ocr_fam.clip_embeddings(batch, side, clip.grid, w, dtype)),
        ("layernorm", fam.layernorm(rows, w, dtype)),
    ]
    items += [
        ("layernorm", 2 * fam.layernorm(rows, w, dtype)),
        ("clip_attention", ocr_fam.clip_attention(batch, t, w, clip.heads, dtype)),
        ("add", 2 * fam.add(rows * w, dtype)),
        ("linear", fam.linear(rows, w, clip.ffn, dtype)),
        ("quick_gelu", fam.quick_gelu(rows * clip.ffn, dtype)),
        ("linear", fam.linear(rows, clip.ffn, w, dtype)),
    ] * clip.layers
    return _accumulate(items)


def projector_costs(cfg: DeepSeekOCRConfig, side: int, batch: int, dtype: object) -> Breakdown:
    """CLIP (CLS dropped) and SAM features concatenated per token, then Linear(2048 -> 1280, bias)
    over the side^2 tokens of each view."""
    tokens = batch * side * side
    return {
        "concat": fam.concat(tokens * cfg.projector_in, dtype),
        "linear": fam.linear(tokens, cfg.projector_in, cfg.lm.hidden_size, dtype),
    }


# -- language model ----------------------------------------------------------------------------


def lm_costs(
    lm: LMConfig,
    new_tokens: float,
    cached_tokens: float,
    dtype: object,
    experts_touched: Sequence[float] | None = None,
    *,
    routed: str = "looped",
    static_len: int | None = None,
    graph: bool = False,
    batch: int = 1,
    weight_major: bool = False,
) -> Breakdown:
    """One LM forward of `new_tokens` after `cached_tokens` in each of `batch` sequences: prefill
    is (S, 0), a decode step (1, L). Every token-wise family runs over batch * new_tokens rows and
    reads its weights once; attention is per sequence; the RoPE tables are the batch's one set.

    embedding, RoPE tables -> per layer [RMSNorm, causal attention, add, RMSNorm, SwiGLU or MoE,
    add] -> final RMSNorm and lm_head on the last position only. `experts_touched` gives the distinct
    routed experts per MoE layer (default: the uniform-routing expectation); `routed` is how the
    routed experts run (families.MOE_ROUTED). A decode step with `static_len` is a positioned step
    over a static cache of that many positions (the fast decode), replayed from a CUDA graph
    with `graph`. With `weight_major` the fast linears' products of 2 to FEW_ROWS rows run
    weight-major (`ocr_fam.weight_major_rows`, blocks of CHUNK_ROWS weight rows): a decode
    step of a batch, lm_head over a batch's last positions.
    """
    moe_layers = _moe_layers(lm)
    if experts_touched is not None and len(experts_touched) != len(moe_layers):
        raise ValueError(f"routing: {len(experts_touched)} MoE layers given, the model has {len(moe_layers)}")
    touched = dict(zip(moe_layers, experts_touched)) if experts_touched is not None else {}
    h, t = lm.hidden_size, batch * new_tokens  # t: rows of the token-wise families
    static = static_len is not None

    def few(rows: float) -> int | None:  # the block of a weight-major product of `rows` rows, if any
        return CHUNK_ROWS if weight_major and 1 < rows <= FEW_ROWS else None

    block = few(t)
    items = [
        ("embedding", fam.embedding(t, h, dtype)),
        ("rope_tables", fam.rope_tables(new_tokens, lm.head_dim, dtype, positions_given=static)),
    ]
    if static:
        items.append(
            ("static_step", ocr_fam.static_step_inputs(static_len, lm.vocab_size, graph=graph, batch=batch))
        )
    heads = lm.num_attention_heads
    for i in range(lm.num_hidden_layers):
        attention = fam.causal_attention(
            new_tokens, cached_tokens, h, heads, dtype, static_len=static_len, batch=batch
        )
        if block is not None:  # q, k, v, o
            attention += 4 * ocr_fam.weight_major_rows(t, h, heads * lm.head_dim, dtype, block)
        items += [
            ("rmsnorm", 2 * fam.rmsnorm(t, h, dtype)),
            ("causal_attention", attention),
            ("add", 2 * fam.add(t * h, dtype)),
        ]
        if lm.is_moe_layer(i):
            parts = ocr_fam.moe_parts(
                t,
                h,
                lm.moe_intermediate_size,
                lm.n_routed_experts,
                lm.num_experts_per_tok,
                lm.shared_intermediate_size,
                dtype,
                experts_touched=touched.get(i),
                routed=routed,
                weight_major_block=block,
            )
            items += [(f"moe_{name}", cost) for name, cost in parts.items()]
        else:
            mlp = fam.swiglu_mlp(t, h, lm.intermediate_size, dtype)
            if block is not None:
                mlp += ocr_fam.weight_major_swiglu(t, h, lm.intermediate_size, dtype, block)
            items.append(("swiglu_mlp", mlp))
    # The last position of each sequence only.
    head, head_block = fam.lm_head(batch, h, lm.vocab_size, dtype), few(batch)
    if head_block is not None:
        head += ocr_fam.weight_major_rows(batch, h, lm.vocab_size, dtype, head_block)
    items += [("rmsnorm", fam.rmsnorm(batch, h, dtype)), ("lm_head", head)]
    return _accumulate(items)


# -- routing -----------------------------------------------------------------------------------


def _distinct(counts: Sequence[int]) -> int:
    return sum(1 for c in counts if c > 0)


# -- the stage model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one run processes: one page, or a batch of pages run together."""

    mode: str
    global_size: int
    tile_size: int
    pages: tuple[tuple[int, int], ...]  # (cols, rows) of each page's tiles; (1, 1) = global view only
    image_tokens: int  # of the first page
    prompt_tokens: int  # S = image tokens + text tokens; a batch: its longest prompt (all are padded to it)
    decode_steps: int
    dtype: str

    @property
    def grid(self) -> tuple[int, int]:
        """The first page's grid."""
        return self.pages[0]

    @property
    def batch(self) -> int:
        return len(self.pages)

    @property
    def tiles(self) -> int:
        """Tiles over the batch."""
        return sum(cols * rows for cols, rows in self.pages if cols * rows > 1)


@dataclass(frozen=True)
class StageModel:
    """Per-family costs of each stage of one run, plus the first decode step and expert usage."""

    workload: Workload
    stages: dict[str, Breakdown]  # MODEL_STAGES -> family -> cost; decode summed over the run
    decode_step: Breakdown  # the first decode step (cache holds the S prompt tokens)
    expert_usage: tuple[dict[str, object], ...]

    def total(self, stage: str) -> Cost:
        if stage not in self.stages:
            raise ValueError(f"analytic: unknown stage {stage!r}; expected one of {', '.join(self.stages)}")
        return _total(self.stages[stage])

    def breakdown(self) -> pd.DataFrame:
        """Rows (stage, scope, family): scope is "run", or "step" for the first decode step."""
        rows = [
            {"stage": stage, "scope": RUN, "family": family, **cost.as_dict()}
            for stage, parts in self.stages.items()
            for family, cost in parts.items()
        ]
        rows += [
            {"stage": DECODE, "scope": STEP, "family": family, **cost.as_dict()}
            for family, cost in self.decode_step.items()
        ]
        return pd.DataFrame(rows, columns=["stage", "scope", "family", *_METRICS])

    def totals(self) -> pd.DataFrame:
        """One row per stage over the run, plus the first decode step; attrs["note"] = ROOFLINE_NOTE."""
        rows = [{"stage": s, "scope": RUN, **self.total(s).as_dict()} for s in self.stages]
        rows.append({"stage": DECODE, "scope": STEP, **_total(self.decode_step).as_dict()})
        table = pd.DataFrame(rows, columns=["stage", "scope", *_METRICS])
        table.attrs["note"] = ROOFLINE_NOTE
        return table

    def experts(self) -> pd.DataFrame:
        """Distinct routed experts read per MoE layer: expected (uniform routing) and observed."""
        return pd.DataFrame(list(self.expert_usage))

    def range_costs(self) -> dict[str, Cost]:
        """ "stage/family" -> cost over the run for the nested module ranges: the analytic
        families summed by the range they run in (RANGE_FAMILIES)."""
        out: dict[str, Cost] = {}
        for stage, parts in self.stages.items():
            ranges: dict[str, Cost] = {}
            for family, cost in parts.items():
                target = RANGE_FAMILIES[stage].get(family)
                if target is not None:
                    ranges[target] = ranges.get(target, Cost()) + cost
            out.update({f"{stage}/{name}": cost for name, cost in ranges.items()})
        return out

    def range_totals(self) -> pd.DataFrame:
        """Rows ("stage/family", metrics) of `range_costs`."""
        rows = [{"stage": name, **cost.as_dict()} for name, cost in self.range_costs().items()]
        return pd.DataFrame(rows, columns=["stage", *_METRICS])

    def costs(self) -> StageCosts:
        """The run's figures as the harness reads them (models.interface.StageCosts)."""
        families = [
            FamilyWork(stage, RUN, family, cost.work())
            for stage, parts in self.stages.items()
            for family, cost in parts.items()
        ]
        families += [
            FamilyWork(DECODE, STEP, family, cost.work()) for family, cost in self.decode_step.items()
        ]
        return StageCosts(
            stages={stage: self.total(stage).work() for stage in self.stages},
            steps={DECODE: _total(self.decode_step).work()},
            ranges={name: cost.work() for name, cost in self.range_costs().items()},
            families=tuple(families),
            experts=tuple(ExpertUsage(**row) for row in self.expert_usage),
            note=ROOFLINE_NOTE,
        )


def resolve_grid(
    mode: ModeSpec, grid: tuple[int, int] | None = None, image_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(cols, rows) of tiles: the one given, or the preprocessing's choice for a (width, height) image."""
    if grid is not None:
        cols, rows = grid
        if cols < 1 or rows < 1:
            raise ValueError(f"analytic: tile grid must be at least 1x1, got {cols}x{rows}")
        if not mode.crop_mode and cols * rows > 1:
            raise ValueError(f"analytic: mode {mode.name} does not tile; grid must be 1x1")
        if cols * rows > 1 and not mode.min_tiles <= cols * rows <= mode.max_tiles:
            raise ValueError(
                f"analytic: mode {mode.name} uses {mode.min_tiles}-{mode.max_tiles} tiles, not {cols * rows}"
            )
        return (cols, rows)
    if not mode.crop_mode:
        return (1, 1)
    if image_size is None:
        raise ValueError(f"analytic: mode {mode.name} tiles the page; give the image size or the tile grid")
    # Imported here: preprocessing pulls in PIL, which the stage model otherwise does not need.
    from llm_perf_opt.models.deepseek_ocr.preprocess import select_tile_grid

    return select_tile_grid(image_size[0], image_size[1], mode)


def _vision(
    cfg: DeepSeekOCRConfig, size: int, batch: int, dtype: object, paths: FastPaths | None
) -> dict[str, Breakdown]:
    """The vision stages over `batch` views of size x size; SAM's includes the cast of the fp32
    pixels the preprocessing made to the model's dtype (none in fp32)."""
    side = tokens_per_side(size)
    pixels = {"pixel_cast": fam.cast(batch * 3 * size * size, fam.FP32, fam.dtype_bytes(dtype))}
    return {
        SAM: _merge(pixels, sam_costs(cfg.sam, size, batch, dtype, paths)),
        CLIP: clip_costs(cfg.clip, side, batch, dtype),
        PROJECTOR: projector_costs(cfg, side, batch, dtype),
    }


def _merge(a: Breakdown, b: Breakdown) -> Breakdown:
    return _accumulate(list(a.items()) + list(b.items()))


def stage_costs(
    cfg: DeepSeekOCRConfig,
    mode: ModeSpec,
    *,
    grid: tuple[int, int] | None = None,
    image_size: tuple[int, int] | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    decode_steps: int = 0,
    dtype: object = "bfloat16",
    routing: RoutingRecord | None = None,
    paths: FastPaths | None = None,
    cache_len: int | None = None,
    grids: Sequence[tuple[int, int]] | None = None,
) -> StageModel:
    """Costs of every stage of one run of `mode` on one image, or on a batch of pages.

    The tile grid is `grid`, or chosen from `image_size` = (width, height) in crop mode. A
    batch gives every page's grid in `grids` (same prompt on each): the global views run as one
    SAM/CLIP/projector batch, all tiles as another, each page is laid out as alone and the
    pages' embeddings concatenated; prefill and decode run B sequences of the longest prompt S
    (shorter ones left-padded: their padding is executed work; the attention bias and the
    per-sequence RoPE tables of a padded batch are not counted). Weights are read once per
    forward for the whole batch; activations and the KV cache scale with B.

    Decode costs are affine in the context length, so the run's decode total is
    decode_steps x (one step at the mean context S + (n - 1)/2). Routed-expert weights are
    read for the distinct experts each forward touches: observed from `routing` when given,
    otherwise the uniform expectation E * (1 - (1 - k/E)^T) (T = B*S in prefill, B per decode step).

    `paths` (None: the reference) are the formulations the fast implementation ran: its bytes
    differ where it moves less or more (SAM's bias, the MoE's dispatch, positioned decode
    steps over a static cache of `cache_len` positions, default S + decode_steps + 1, few-row
    products run weight-major in fp32), its FLOPs are the reference's.
    """
    if text_tokens < 1 or decode_steps < 0:
        raise ValueError("analytic: need text_tokens >= 1 (BOS at least) and decode_steps >= 0")
    fam.dtype_bytes(dtype)  # fail early on an unknown dtype
    pages = [resolve_grid(mode, g) for g in grids] if grids else [resolve_grid(mode, grid, image_size)]
    batch = len(pages)
    image_tokens = [image_token_count(mode.global_size, mode.image_size, g) for g in pages]
    s = max(image_tokens) + text_tokens
    lm = cfg.lm
    if s + decode_steps > lm.max_position_embeddings:
        raise ValueError(
            f"analytic: {s} prompt + {decode_steps} decode positions exceed {lm.max_position_embeddings}"
        )
    workload = Workload(
        mode.name,
        mode.global_size,
        mode.image_size,
        tuple(pages),
        image_tokens[0],
        s,
        decode_steps,
        str(dtype),
    )

    stages = _vision(cfg, mode.global_size, batch, dtype, paths)
    if workload.tiles:
        tiles = _vision(cfg, mode.image_size, workload.tiles, dtype, paths)
        stages = {name: _merge(parts, tiles[name]) for name, parts in stages.items()}
    global_side, tile_side = tokens_per_side(mode.global_size), tokens_per_side(mode.image_size)
    layout = [
        ("layout", ocr_fam.image_layout(g, global_side, tile_side, lm.hidden_size, dtype)) for g in pages
    ]
    if batch > 1:  # the pages' embeddings in one tensor
        layout.append(("layout", fam.concat(sum(image_tokens) * lm.hidden_size, dtype)))
    stages[PROJECTOR] = _merge(stages[PROJECTOR], _accumulate(layout))

    if routing is not None:
        routing.check(lm, batch * s, decode_steps, batch)
    prefill_touched = [_distinct(c) for c in routing.prefill] if routing is not None else None
    step_touched = None
    if routing is not None and routing.decode:
        layers = len(routing.prefill)
        step_touched = [
            sum(_distinct(step[layer]) for step in routing.decode) / decode_steps for layer in range(layers)
        ]
    scatter = {"image_scatter": ocr_fam.image_scatter(batch * s, sum(image_tokens), lm.hidden_size, dtype)}
    pick = {"greedy_pick": ocr_fam.greedy_pick(lm.vocab_size, batch)}
    prefill_routed, step = "looped", {}
    weight_major = paths is not None and paths.rows == "weight_major" and fam.dtype_bytes(dtype) == 4
    if paths is not None:
        prefill_routed = paths.routed_for(batch * s)
        step = {"routed": paths.routed_for(batch)}
        if paths.decode != "eager":
            cache_len = s + decode_steps + 1 if cache_len is None else cache_len
            step.update(static_len=cache_len, graph=paths.graphs_decode(batch))
    prefill = lm_costs(
        lm, s, 0, dtype, prefill_touched, routed=prefill_routed, batch=batch, weight_major=weight_major
    )
    stages[PREFILL] = _merge(_merge(prefill, scatter), pick)
    step_at = functools.partial(
        lm_costs,
        lm,
        1,
        dtype=dtype,
        experts_touched=step_touched,
        batch=batch,
        weight_major=weight_major,
        **step,
    )
    first_step = _merge(step_at(s), pick)
    mean_step = _merge(step_at(s + (decode_steps - 1) / 2), pick)
    stages[DECODE] = {family: decode_steps * cost for family, cost in mean_step.items()}

    return StageModel(
        workload=workload,
        stages={name: stages[name] for name in MODEL_STAGES},
        decode_step=first_step,
        expert_usage=_expert_usage(lm, s, decode_steps, routing, batch),
    )


def _expert_usage(
    lm: LMConfig, s: int, steps: int, routing: RoutingRecord | None, batch: int = 1
) -> tuple[dict[str, object], ...]:
    """Expected and observed distinct experts per MoE layer: in prefill, in one decode step, and
    over all decode steps of the run (the routed-expert weights the run reads at least once);
    a batch routes B*S tokens in prefill and B per decode step."""
    e, k = lm.n_routed_experts, lm.num_experts_per_tok
    rows = []
    for j, layer in enumerate(_moe_layers(lm)):
        observed: dict[str, float | None] = {"prefill": None, "decode_step": None, "decode_run": None}
        if routing is not None:
            observed["prefill"] = _distinct(routing.prefill[j])
            if routing.decode:
                per_step = [step[j] for step in routing.decode]
                observed["decode_step"] = sum(_distinct(c) for c in per_step) / steps
                observed["decode_run"] = _distinct([sum(col) for col in zip(*per_step)])
        for scope, tokens in (("prefill", batch * s), ("decode_step", batch), ("decode_run", batch * steps)):
            rows.append(
                {
                    "layer": layer,
                    "scope": scope,
                    "tokens": tokens,
                    "experts": e,
                    "top_k": k,
                    "expected_distinct": fam.expected_distinct_experts(tokens, e, k),
                    "observed_distinct": observed[scope],
                }
            )
    return tuple(rows)
