"""python -m llm_perf_opt.analytic.validate: the analytic stage model against FlopCounterMode.

For every mode (tiny, small, base, large; gundam with 1x2, 2x2, 2x3, 3x3 tiles) the full-size
model runs on the meta device (no memory, no arithmetic) under FlopCounterMode, stage by
stage: SAM, CLIP and the projector over the global view and the tiles, prefill of the whole
prompt, and two decode steps. Each stage's analytic *executed* matmul FLOPs must agree with
the count within 1%; so must the published reference figures in `references()`. Prints both tables and
the analytic model's evaluation time; exits 1 on any disagreement.

With --bytes, the analytic bytes per stage (weights, activations read and written, KV reads
and writes) are checked instead against `analytic.byte_count.ByteCounter`, a dispatch mode
that counts the bytes of every aten op on the same meta model (rules in its docstring), for
the same cases and stages. The analytic formulas follow eager execution op for op, so the two
must be equal (BYTES_TOLERANCE absorbs float rounding only), weights and KV bytes exactly.
The one convention the count adopts from the analytic model: scaled-dot-product attention is
one fused kernel that never writes its score matrix (torch decomposes it on meta). The routed
experts are those the meta run fed, given to the analytic model as observed routing.

With --bytes --impl fast, the same for the fast implementation under each path set of
META_FAST_PATHS (every SAM attention, grouped and looped prefill experts, gathered and looped
decode experts, eager and static decode), the analytic model given the same paths. Two paths read
values a meta tensor does not have and are checked on real CPU tensors by the tests instead:
one-by-one decode experts (ids read on the host) and a one-token grouped GEMM (which of its
groups get rows); so is the CUDA-graph replay, which only exists on CUDA.

FLOP formulas: on meta tensors SDPA decomposes into aten.bmm, which FlopCounterMode counts, so
no formula is missing there. On real CPU tensors SDPA runs
aten._scaled_dot_product_flash_attention_for_cpu, which torch (2.13) has no formula for;
`flop_counter()` registers one (4*B*H*Sq*Sk*D, the same as torch's own SDPA formulas).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from llm_perf_opt.analytic import families as fam
from llm_perf_opt.analytic.byte_count import ByteCounter
from llm_perf_opt.models.deepseek_ocr.analytic.costs import (
    DEFAULT_TEXT_TOKENS,
    ROOFLINE_NOTE,
    RUN,
    STEP,
    StageModel,
    stage_costs,
)
from llm_perf_opt.analytic.families import Cost
from llm_perf_opt.config import group_options, load
from llm_perf_opt.errors import OneLineParser, UserError
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.fast.paths import FastPaths
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.models.deepseek_ocr.stages import (
    CLIP,
    DECODE,
    PREFILL,
    PROJECTOR,
    SAM,
)

TOLERANCE = 0.01
#: Decode steps run per case: the first is checked alone, both together as the run.
DECODE_STEPS = 2
GIGA = 1e9
#: Total and activation bytes: the analytic formulas follow eager execution op for op, so they
#: must equal the count; this only absorbs float rounding in the analytic sums (terms like 5.5*n,
#: the mean decode context). Anything looser would hide a forgotten copy: one copy of one
#: activation in one SAM block is ~0.1% of the stage. Weight and KV bytes are compared exactly.
BYTES_TOLERANCE = 1e-9
BYTES_NOTE = (
    "counted: every aten op reads its tensor inputs and writes its outputs once; views, metadata ops and\n"
    "uninitialised allocations are free; weights and KV-cache buffers are told apart by storage.\n"
    "Both sides count SDPA as one fused kernel (q, k, v and mask read, output written, no score matrix):\n"
    "on meta torch decomposes it into bmm + softmax + bmm writing the scores, so the counter takes the call\n"
    "before the decomposition. Everything else is counted as it runs, and the analytic formulas follow it:\n"
    "fp32 RMSNorm/router/combine internals and casts, SAM's rel-pos bias written twice (add, then the copy\n"
    "its layout forces), the q copies for the rel-pos einsums, window padding and partition copies, the\n"
    "resized position tables, RoPE ops and tables, the MoE dispatch and combine ops.\n"
    "Routed experts: those the meta run fed (an even split), given to the analytic model as observed routing."
)


def builtin_modes() -> dict[str, ModeSpec]:
    """The released resolution modes: every option of the `mode` config group, composed by Hydra."""
    return {name: load([f"mode={name}"]).model.mode for name in group_options("mode")}


@dataclass(frozen=True)
class Case:
    mode: ModeSpec
    grid: tuple[int, int]  # (cols, rows)

    @property
    def name(self) -> str:
        cols, rows = self.grid
        return f"{self.mode.name} {cols}x{rows}" if self.mode.crop_mode else self.mode.name


def cases() -> list[Case]:
    """Every no-crop mode, and gundam at 1x2, 2x2, 2x3 and 3x3 tiles (cols x rows)."""
    modes = builtin_modes()
    plain = [Case(modes[name], (1, 1)) for name in ("tiny", "small", "base", "large")]
    return plain + [Case(modes["gundam"], grid) for grid in ((1, 2), (2, 2), (2, 3), (3, 3))]


def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    """Forward FLOPs of CPU flash SDPA: QK^T and PV, 2 * 2*B*H*Sq*Sk*D (causal masking not discounted)."""
    b, h, sq, _ = query_shape
    return 4 * b * h * sq * key_shape[2] * value_shape[3]


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode, plus a formula for CPU flash SDPA, which torch lacks."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flop}
    )


def _count(fn) -> tuple[int, Any]:
    with flop_counter() as counter:
        out = fn()
    return counter.get_total_flops(), out


def even_split(flat: torch.Tensor, n_experts: int) -> list[int]:
    """Tokens per expert for meta tensors, which carry no expert ids: the T·k assignments spread
    evenly. Any split costs the same FLOPs, so the count does not depend on it."""
    total = flat.numel()
    return [total // n_experts + (e < total % n_experts) for e in range(n_experts)]


#: Path sets of the fast implementation that run on meta tensors, together covering every path
#: but the value-reading ones (module docstring).
META_FAST_PATHS = {
    "blocked SAM, grouped prefill, gathered decode": FastPaths("blocked", "grouped", "gathered", "eager"),
    "folded SAM, looped prefill, static decode": FastPaths("folded", "looped", "gathered", "static"),
    "the reference's formulations": FastPaths("reference", "looped", "looped", "eager", "plain"),
}


def build_meta_model(cfg: DeepSeekOCRConfig, paths: FastPaths | None = None):
    """The full-size model on the meta device, in bf16: shapes only. With `paths`, the fast
    implementation running them."""
    from llm_perf_opt.models.deepseek_ocr.weights import build_model

    impl = "reference" if paths is None else "fast"
    model = build_model(cfg, torch.device("meta"), torch.bfloat16, "sdpa", impl=impl)
    if paths is not None:
        model.use_paths(paths)
    for moe in model.moe_layers().values():
        moe.count_tokens = even_split
    return model


class Counter:
    """FlopCounterMode counts of the meta model per stage; vision counts are reused across cases."""

    def __init__(self, model) -> None:
        self.model = model
        self._vision: dict[tuple[int, int], tuple[dict[str, int], torch.Tensor]] = {}

    def vision(self, size: int, batch: int) -> tuple[dict[str, int], torch.Tensor]:
        """FLOPs of SAM, CLIP and the projector on `batch` views of size x size, and the features."""
        key = (size, batch)
        if key not in self._vision:
            m = self.model
            pixels = torch.empty(batch, 3, size, size, device="meta", dtype=torch.bfloat16)
            sam_flops, sam_out = _count(lambda: m.sam(pixels))
            clip_flops, clip_out = _count(lambda: m.clip(sam_out))
            proj_flops, feats = _count(lambda: m.project(sam_out, clip_out))
            self._vision[key] = ({SAM: sam_flops, CLIP: clip_flops, PROJECTOR: proj_flops}, feats)
        return self._vision[key]

    def case(self, case: Case, text_tokens: int) -> dict[tuple[str, str], int]:
        """(stage, scope) -> counted FLOPs for one run of `case` with DECODE_STEPS decode steps."""
        m, mode = self.model, case.mode
        counts, global_feats = self.vision(mode.global_size, 1)
        counts = dict(counts)
        tile_feats = None
        cols, rows = case.grid
        if cols * rows > 1:
            tile_counts, tile_feats = self.vision(mode.image_size, cols * rows)
            counts = {stage: counts[stage] + tile_counts[stage] for stage in counts}
        embeds = m.layout(global_feats, tile_feats, case.grid)
        s = embeds.shape[0] + text_tokens
        cache = m.new_cache(s + DECODE_STEPS)
        ids = torch.empty(1, s, dtype=torch.long, device="meta")
        out = {(stage, RUN): flops for stage, flops in counts.items()}
        out[(PREFILL, RUN)], _ = _count(lambda: m.prefill(ids, embeds, cache))
        token = torch.empty(1, 1, dtype=torch.long, device="meta")
        steps = [_count(lambda: m.decode_step(token, cache))[0] for _ in range(DECODE_STEPS)]
        out[(DECODE, STEP)] = steps[0]
        out[(DECODE, RUN)] = sum(steps)
        return out


def analytic_case(
    cfg: DeepSeekOCRConfig, case: Case, text_tokens: int, decode_steps: int = DECODE_STEPS
) -> StageModel:
    return stage_costs(cfg, case.mode, grid=case.grid, text_tokens=text_tokens, decode_steps=decode_steps)


def _agreement(analytic: float, reference: float) -> dict[str, Any]:
    err = abs(analytic - reference) / abs(reference) if reference else abs(analytic)
    return {"rel_err": err, "ok": err <= TOLERANCE}


def compare(cfg: DeepSeekOCRConfig, counter: Counter, text_tokens: int) -> pd.DataFrame:
    """Analytic executed matmul GFLOPs vs FlopCounterMode GFLOPs, per case and stage."""
    rows = []
    for case in cases():
        model = analytic_case(cfg, case, text_tokens)
        totals = model.totals().set_index(["stage", "scope"])
        counted = counter.case(case, text_tokens)
        for (stage, scope), flops in counted.items():
            analytic = totals.loc[(stage, scope)]
            rows.append(
                {
                    "case": case.name,
                    "S": model.workload.prompt_tokens,
                    "stage": stage,
                    "scope": scope,
                    "analytic": analytic["matmul_flops"] / GIGA,
                    "flopcounter": flops / GIGA,
                    "useful": analytic["useful_matmul_flops"] / GIGA,
                    **_agreement(analytic["matmul_flops"], flops),
                }
            )
    return pd.DataFrame(rows)


def references(cfg: DeepSeekOCRConfig, text_tokens: int) -> pd.DataFrame:
    """Reference figures for DeepSeek-OCR, in GFLOPs unless the check says otherwise."""
    modes = builtin_modes()
    base = analytic_case(cfg, Case(modes["base"], (1, 1)), text_tokens)
    small = analytic_case(cfg, Case(modes["small"], (1, 1)), text_tokens)
    gundam = analytic_case(cfg, Case(modes["gundam"], (2, 3)), text_tokens=12)

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
    per_context = sum(c.matmul_flops for c in slope.values()) - sum(c.matmul_flops for c in step.values())
    checks = [
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
    return pd.DataFrame(
        [{"check": what, "analytic": a, "reference": r, **_agreement(a, r)} for what, a, r in checks]
    )


def analytic_speed(cfg: DeepSeekOCRConfig, text_tokens: int, decode_steps: int = 1000) -> float:
    """Seconds to evaluate the stage model for every case (no model instance involved)."""
    start = time.perf_counter()
    for case in cases():
        analytic_case(cfg, case, text_tokens, decode_steps).totals()
    return time.perf_counter() - start


# -- bytes ------------------------------------------------------------------------------------


class EvenRouting:
    """Tokens per routed expert of every MoE forward on meta, where the router has no values:
    the T*k assignments spread evenly (`even_split`, what the reference's loop feeds its
    experts there), recorded from each layer's `on_route` so that every implementation's
    routing is seen, whichever way its experts run. The analytic model gets it as observed
    routing, so both sides read the same experts."""

    def __init__(self, model) -> None:
        self._layers = model.moe_layers()
        self._rows: dict[int, list[int]] = {}
        for layer, moe in self._layers.items():
            moe.on_route = self._hook(layer, moe.n_experts)

    def _hook(self, layer: int, n_experts: int):
        def record(experts: torch.Tensor) -> None:
            self._rows[layer] = even_split(experts.flatten(), n_experts)

        return record

    def take(self) -> tuple[tuple[int, ...], ...]:
        """Counts per MoE layer of the last forward, layers in order."""
        out = tuple(tuple(self._rows[layer]) for layer in sorted(self._layers))
        self._rows = {}
        return out

    def close(self) -> None:
        for moe in self._layers.values():
            moe.on_route = None


class ByteStages:
    """ByteCounter counts of the meta model per stage (byte_count.py); vision counts are reused."""

    def __init__(self, model) -> None:
        self.model = model
        self._params = list(model.parameters())
        self._vision: dict[tuple[int, int], tuple[dict[str, Cost], torch.Tensor]] = {}

    def _count(self, fn, kv: Sequence[torch.Tensor] = ()) -> tuple[Cost, Any]:
        with ByteCounter(weights=self._params, kv=kv) as counter:
            out = fn()
        return counter.total, out

    def vision(self, size: int, batch: int) -> tuple[dict[str, Cost], torch.Tensor]:
        """Bytes of SAM, CLIP and the projector on `batch` views of size x size, and the features."""
        key = (size, batch)
        if key not in self._vision:
            m = self.model
            pixels = torch.empty(batch, 3, size, size, device="meta", dtype=m.dtype)
            sam, sam_out = self._count(lambda: m.sam(pixels))
            clip, clip_out = self._count(lambda: m.clip(sam_out))
            proj, feats = self._count(lambda: m.project(sam_out, clip_out))
            self._vision[key] = ({SAM: sam, CLIP: clip, PROJECTOR: proj}, feats)
        return self._vision[key]

    def case(self, case: Case, text_tokens: int) -> tuple[dict[tuple[str, str], Cost], RoutingRecord]:
        """(stage, scope) -> counted bytes for one run of `case` with DECODE_STEPS decode steps,
        and the expert routing the run took."""
        m, mode = self.model, case.mode
        counts, global_feats = self.vision(mode.global_size, 1)
        tile_feats = None
        cols, rows = case.grid
        if cols * rows > 1:
            tile_counts, tile_feats = self.vision(mode.image_size, cols * rows)
            counts = {stage: counts[stage] + tile_counts[stage] for stage in counts}
        out = {(stage, RUN): count for stage, count in counts.items()}
        embeds = m.layout(global_feats, tile_feats, case.grid)
        s = embeds.shape[0] + text_tokens
        cache = m.new_cache(s + DECODE_STEPS + 1)  # as a run of DECODE_STEPS + 1 new tokens allocates
        kv = cache.keys + cache.values
        ids = torch.empty(1, s, dtype=torch.long, device="meta")
        token = torch.empty(1, 1, dtype=torch.long, device="meta")
        experts = EvenRouting(m)
        try:
            out[(PREFILL, RUN)], _ = self._count(lambda: m.prefill(ids, embeds, cache), kv)
            prefill_rows = experts.take()
            steps, decode_rows = [], []
            for _ in range(DECODE_STEPS):
                steps.append(self._count(lambda: m.decode_step(token, cache), kv)[0])
                decode_rows.append(experts.take())
        finally:
            experts.close()
        out[(DECODE, STEP)] = steps[0]
        out[(DECODE, RUN)] = sum(steps, Cost())
        return out, RoutingRecord(prefill=prefill_rows, decode=tuple(decode_rows))


def _rel(analytic: float, counted: float) -> float:
    return abs(analytic - counted) / counted if counted else abs(analytic)


def compare_bytes(
    cfg: DeepSeekOCRConfig,
    counter: ByteStages,
    text_tokens: int,
    dtype: str = "bfloat16",
    paths: FastPaths | None = None,
) -> pd.DataFrame:
    """Analytic bytes vs ByteCounter bytes per case and stage (GB; weights in MB).

    The analytic model gets the routing the meta run took, so both read the same experts, and
    the fast `paths` the counted model ran (None: the reference).
    `act_err` is the larger relative error of activation reads and writes; weight and KV bytes
    must be equal, exactly (whole numbers of bytes on both sides).
    """
    rows = []
    for case in cases():
        counted, routing = counter.case(case, text_tokens)
        model = stage_costs(
            cfg, case.mode, grid=case.grid, text_tokens=text_tokens, decode_steps=DECODE_STEPS,
            dtype=dtype, routing=routing, paths=paths,
        )  # fmt: skip
        totals = model.totals().set_index(["stage", "scope"])
        for (stage, scope), count in counted.items():
            analytic = totals.loc[(stage, scope)]
            err = _rel(analytic["bytes"], count.bytes)
            act_err = max(
                _rel(analytic["act_read_bytes"], count.act_read_bytes),
                _rel(analytic["act_write_bytes"], count.act_write_bytes),
            )
            weights = analytic["weight_bytes"] == count.weight_bytes
            kv = (analytic["kv_read_bytes"], analytic["kv_write_bytes"]) == (
                count.kv_read_bytes,
                count.kv_write_bytes,
            )
            rows.append(
                {
                    "case": case.name,
                    "S": model.workload.prompt_tokens,
                    "stage": stage,
                    "scope": scope,
                    "analytic_GB": analytic["bytes"] / GIGA,
                    "counted_GB": count.bytes / GIGA,
                    "rel_err": err,
                    "act_err": act_err,
                    "weight_MB": count.weight_bytes / 1e6,
                    "weights_equal": weights,
                    "kv_equal": kv,
                    "ok": err <= BYTES_TOLERANCE and act_err <= BYTES_TOLERANCE and weights and kv,
                }
            )
    return pd.DataFrame(rows)


def validate_bytes(cfg: DeepSeekOCRConfig, text_tokens: int, impl: str = "reference") -> int:
    """Print the byte comparison for every case (and, for the fast implementation, every path set
    of META_FAST_PATHS); 0 when every stage agrees, else 1."""
    start = time.perf_counter()
    runs = {"reference": None} if impl == "reference" else META_FAST_PATHS
    tables = {
        name: compare_bytes(cfg, ByteStages(build_meta_model(cfg, paths)), text_tokens, paths=paths)
        for name, paths in runs.items()
    }
    seconds = time.perf_counter() - start
    display = ("display.width", 200, "display.max_rows", None, "display.float_format", "{:.4g}".format)
    with pd.option_context(*display):
        print("Bytes per stage: analytic (families.py, eager op by op) vs ByteCounter on the meta model")
        print(BYTES_NOTE)
        for name, table in tables.items():
            print(f"\nmodel.impl={impl}" + ("" if name == "reference" else f", paths: {name}"))
            print(table.to_string(index=False))
    bad = int(sum((~table["ok"]).sum() for table in tables.values()))
    print(f"\nByteCounter on meta: {seconds:.1f} s")
    print(
        f"{'FAIL' if bad else 'PASS'}: {bad} stage(s) differ (total or activation bytes beyond "
        f"{BYTES_TOLERANCE:g} relative, or weight or KV bytes not equal)"
    )
    return 1 if bad else 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m llm_perf_opt.analytic.validate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="non-image prompt tokens (BOS included)"
    )
    parser.add_argument(
        "--bytes", action="store_true", help="check the analytic bytes (ByteCounter) instead of the FLOPs"
    )
    parser.add_argument(
        "--impl", choices=("reference", "fast"), default="reference",
        help="with --bytes: the implementation whose bytes to check (fast: every path set that runs on meta)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.text_tokens < 1:
            raise UserError("validate: --text-tokens must be at least 1")
        if args.impl != "reference" and not args.bytes:
            raise UserError("validate: --impl fast checks bytes only (add --bytes); the FLOPs are the reference's")
        cfg = DeepSeekOCRConfig()
        if args.bytes:
            return validate_bytes(cfg, args.text_tokens, args.impl)
        seconds = analytic_speed(cfg, args.text_tokens)
        start = time.perf_counter()
        stages = compare(cfg, Counter(build_meta_model(cfg)), args.text_tokens)
        counted_seconds = time.perf_counter() - start
        refs = references(cfg, args.text_tokens)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    display = ("display.width", 200, "display.max_rows", None, "display.float_format", "{:.4g}".format)
    with pd.option_context(*display):
        print("Matmul GFLOPs per stage: analytic (executed) vs FlopCounterMode on the meta-device model")
        print(f"useful = causal lower triangle only; {ROOFLINE_NOTE}")
        print(stages.to_string(index=False))
        print("\nReference figures (GFLOPs unless noted)")
        print(refs.to_string(index=False))
    bad = int((~stages["ok"]).sum() + (~refs["ok"]).sum())
    print(f"\nanalytic model: {len(cases())} cases in {seconds * 1e3:.1f} ms (target < 1 s); "
          f"FlopCounterMode on meta: {counted_seconds:.1f} s")  # fmt: skip
    print(f"{'FAIL' if bad else 'PASS'}: {bad} disagreement(s) above {TOLERANCE:.0%}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
