"""What `python -m llm_perf_opt.analytic.validate` checks of DeepSeek-OCR: the runs it counts
on the meta-device model (every mode; gundam at 1x2, 2x2, 2x3 and 3x3 tiles; every mode at
batches of 2 and 8 pages; for the fast
implementation, each of META_FAST_PATHS on all of them) and the published figures its formulas
must reproduce (`reference_checks`)."""

from __future__ import annotations

from llm_perf_opt.analytic import families as fam
from llm_perf_opt.config import group_options, load
from llm_perf_opt.models.deepseek_ocr.analytic.costs import DEFAULT_TEXT_TOKENS, StageModel, stage_costs
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.fast.paths import FastPaths
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec
from llm_perf_opt.models.deepseek_ocr.stages import CLIP, PREFILL, PROJECTOR, SAM
from llm_perf_opt.models.interface import CheckCase

GIGA = 1e9
#: Tile grids (cols, rows) of gundam checked; a blank page of 640*cols x 640*rows gets each.
GUNDAM_GRIDS = ((1, 2), (2, 2), (2, 3), (3, 3))
TILE_PIXELS = 640
#: Batches of copies of one page checked in every mode (gundam at 2x2), beside batch 1.
BATCHES = (2, 8)

#: Path sets of the fast implementation that run on meta tensors, together covering every path
#: but those that read values a meta tensor does not have, which the tests check on real CPU
#: tensors: one-by-one experts for one token (ids read on the host), a one-token grouped GEMM
#: (which of its groups get rows), the CUDA-graph replay, which only exists on CUDA, and the
#: CPU's split and weight-major products (meta tensors take F.linear).
META_FAST_PATHS = {
    "blocked SAM, grouped prefill, gathered decode, batch one by one": FastPaths(
        "blocked", "grouped", "gathered", "eager", rows="plain", moe_batch="one_by_one"
    ),
    "folded SAM, looped prefill, static decode": FastPaths(
        "folded", "looped", "gathered", "static", rows="plain", moe_batch="looped"
    ),
    "the reference's formulations": FastPaths(
        "reference", "looped", "looped", "eager", "plain", "plain", "looped"
    ),
}


def builtin_modes() -> dict[str, ModeSpec]:
    """The released resolution modes: every option of the `mode` config group, composed by Hydra."""
    return {name: load([f"mode={name}"]).model.mode for name in group_options("mode")}


def _plain_cases(batched: bool = True) -> list[CheckCase]:
    """Every mode at batch 1, each followed by its batches (gundam: at 2x2 tiles), in an order
    where cases of one model config follow each other (they share a meta model)."""
    plain = [CheckCase(name, (f"mode={name}",)) for name in ("tiny", "small", "base", "large")]
    tiled = [
        CheckCase(f"gundam {cols}x{rows}", ("mode=gundam",), (TILE_PIXELS * cols, TILE_PIXELS * rows))
        for cols, rows in GUNDAM_GRIDS
    ]
    out = []
    for case in plain + tiled:
        out.append(case)
        if batched and (case in plain or case.name == "gundam 2x2"):
            out += [
                CheckCase(f"{case.name}, batch {n}", (*case.overrides, f"batch_size={n}"), case.image_size)
                for n in BATCHES
            ]
    return out


def _path_overrides(paths: FastPaths) -> tuple[str, ...]:
    fields = ("sam_attention", "moe_prefill", "moe_decode", "moe_batch", "decode", "linear", "rows")
    return ("model.impl=fast", *(f"model.paths.{name}={getattr(paths, name)}" for name in fields))


def check_cases(impl: str) -> list[CheckCase]:
    """The reference: every mode, gundam at each of GUNDAM_GRIDS, and batches of BATCHES pages.
    The fast implementation: the same under each path set of META_FAST_PATHS, batches only
    where their decode steps do not run grouped experts (a decode step of a batch takes the
    many-token way, and which groups of a grouped GEMM get rows needs values)."""
    if impl == "reference":
        return _plain_cases()
    return [
        CheckCase(f"{name}: {case.name}", case.overrides + _path_overrides(paths), case.image_size)
        for name, paths in META_FAST_PATHS.items()
        for case in _plain_cases(batched=paths.routed_for(min(BATCHES)) != "grouped")
    ]


def reference_checks(text_tokens: int = DEFAULT_TEXT_TOKENS) -> list[tuple[str, float, float]]:
    """Published figures of the released DeepSeek-OCR: (what, analytic, reference), GFLOPs
    unless the name says otherwise."""
    cfg = DeepSeekOCRConfig()
    modes = builtin_modes()
    base = stage_costs(cfg, modes["base"], text_tokens=text_tokens)
    small = stage_costs(cfg, modes["small"], text_tokens=text_tokens)
    gundam = stage_costs(cfg, modes["gundam"], grid=(2, 3), text_tokens=12)

    def vision(model: StageModel) -> float:
        return sum(model.total(stage).matmul_flops for stage in (SAM, CLIP, PROJECTOR)) / GIGA

    lm = cfg.lm
    step = base.decode_step
    # Per-token LM work without attention scores: the first decode step minus lm_head and
    # minus the score/value products against its L+1 keys.
    keys = base.workload.prompt_tokens + 1
    core = fam.attention_core(1, lm.num_attention_heads, 1, keys, lm.head_dim, "bf16")
    scores = lm.num_hidden_layers * core
    step_flops = sum(c.matmul_flops for c in step.values())
    per_token = step_flops - step["lm_head"].matmul_flops - scores.matmul_flops
    slope = stage_costs(cfg, modes["base"], text_tokens=text_tokens + 1).decode_step
    per_context = sum(c.matmul_flops for c in slope.values()) - step_flops
    return [
        ("SAM, 1024^2 view", base.total(SAM).matmul_flops / GIGA, 976.9),
        ("SAM+CLIP+projector, 1024^2 view", vision(base), 1140.0),
        ("SAM+CLIP+projector, 640^2 tile", vision(small), 388.0),
        ("vision, gundam 2x3 page", vision(gundam), 3470.0),
        ("LM per token, no attention scores", per_token / GIGA, 0.817),
        ("lm_head per token", step["lm_head"].matmul_flops / GIGA, 0.331),
        ("prefill useful, gundam 2x3, S=915", gundam.total(PREFILL).useful_matmul_flops / GIGA, 770.0),
        ("decode FLOPs per context token", per_context, 61_440.0),
        ("KV cache bytes per token (bf16)", sum(c.kv_write_bytes for c in step.values()), 61_440.0),
    ]
