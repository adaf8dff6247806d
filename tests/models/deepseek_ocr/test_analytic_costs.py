"""The DeepSeek-OCR stage model and memory footprint: totals, bytes, experts, routing."""

from __future__ import annotations

import pytest
import torch
from model_costs import meta_model as build_meta_model

from llm_perf_opt.analytic.families import Cost
from llm_perf_opt.models.deepseek_ocr.analytic import footprint as memory
from llm_perf_opt.models.deepseek_ocr.analytic.checks import builtin_modes
from llm_perf_opt.models.deepseek_ocr.analytic.costs import (
    MODEL_STAGES,
    ROOFLINE_NOTE,
    lm_costs,
    resolve_grid,
    stage_costs,
)
from llm_perf_opt.models.deepseek_ocr.analytic.formulas import greedy_pick
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.fast.paths import FastPaths
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.models.deepseek_ocr.stages import CLIP, DECODE, PREFILL, PROJECTOR, SAM

CFG = DeepSeekOCRConfig()
MODES = builtin_modes()
G = 1e9


def run(mode: str, grid=None, **kw):
    return stage_costs(CFG, MODES[mode], grid=grid, **kw)


@pytest.fixture(scope="module")
def meta_model():
    return build_meta_model(CFG)


def test_base_stage_totals_match_the_reference_figures():
    base = run("base")
    assert base.workload.image_tokens == 273 and base.workload.prompt_tokens == 285
    assert base.total(SAM).matmul_flops / G == pytest.approx(976.9, rel=1e-4)
    vision = sum(base.total(s).matmul_flops for s in (SAM, CLIP, PROJECTOR)) / G
    assert vision == pytest.approx(1140, rel=1e-3)
    assert base.total(CLIP).matmul_flops / G == pytest.approx(161.7, rel=1e-3)
    assert base.total(PROJECTOR).matmul_flops / G == pytest.approx(1.34, rel=1e-2)


def test_tile_and_gundam_totals_match_the_reference_figures():
    def vision(model) -> float:
        return sum(model.total(s).matmul_flops for s in (SAM, CLIP, PROJECTOR))

    small, gundam = run("small"), run("gundam", (2, 3))
    assert vision(small) / G == pytest.approx(388, rel=1e-3)
    assert gundam.workload.image_tokens == 903 and gundam.workload.prompt_tokens == 915
    assert vision(gundam) == pytest.approx(6 * vision(small) + vision(run("base")))
    assert vision(gundam) / G == pytest.approx(3470, rel=1e-3)
    # Prefill at S = 915: 0.77 TF counting the causal triangle, last-position logits only.
    assert gundam.total(PREFILL).useful_matmul_flops / G == pytest.approx(770, rel=1e-2)


def test_lm_per_token_and_decode_slope():
    lm = CFG.lm
    step = run("base").decode_step
    assert step["lm_head"].matmul_flops == 2 * 1280 * 129280
    assert step["lm_head"].matmul_flops / G == pytest.approx(0.331, rel=1e-3)
    a = sum(c.matmul_flops for c in lm_costs(lm, 1, 100, "bf16").values())
    b = sum(c.matmul_flops for c in lm_costs(lm, 1, 101, "bf16").values())
    assert b - a == 12 * 4 * 1280 == 61_440
    # At an empty cache, one query against one key: 0.817 GF + lm_head + 12 * 4 * 1280.
    assert (a - 100 * 61_440 - step["lm_head"].matmul_flops - 61_440) / G == pytest.approx(0.817, rel=1e-3)


def test_decode_run_is_the_sum_of_its_steps():
    lm, n = CFG.lm, 5
    model = run("base", decode_steps=n)
    s = model.workload.prompt_tokens
    # Each step: one LM forward, then the greedy pick of its token (read 4V, write 8 bytes).
    pick = greedy_pick(lm.vocab_size)
    assert pick == Cost(act_read_bytes=4 * 129_280, act_write_bytes=8)
    steps = sum((sum(lm_costs(lm, 1, s + i, "bf16").values(), pick) for i in range(n)), Cost())
    total = model.total(DECODE)
    for field in ("matmul_flops", "other_flops", "weight_bytes", "act_read_bytes", "kv_read_bytes"):
        assert getattr(total, field) == pytest.approx(getattr(steps, field))
    first = sum(model.decode_step.values(), Cost())
    assert first == sum(lm_costs(lm, 1, s, "bf16").values(), pick)
    assert run("base").total(DECODE) == Cost()


def test_executed_and_useful_attention():
    model = run("gundam", (2, 3), decode_steps=10)
    s = model.workload.prompt_tokens
    prefill = model.total(PREFILL)
    assert prefill.matmul_flops - prefill.useful_matmul_flops == pytest.approx(12 * 2 * 1280 * s * (s - 1))
    for stage in (SAM, CLIP, PROJECTOR, DECODE):
        assert model.total(stage).masked_matmul_flops == 0
    totals = model.totals()
    assert totals.attrs["note"] == ROOFLINE_NOTE and "useful" in ROOFLINE_NOTE
    assert {"matmul_flops", "useful_matmul_flops", "useful_flops"} <= set(totals.columns)


def test_the_typed_costs_hold_the_tables_figures():
    model = run("gundam", (2, 2), decode_steps=3)
    costs = model.costs()
    totals = model.totals().set_index(["stage", "scope"])
    assert list(costs.stages) == list(MODEL_STAGES) and list(costs.steps) == [DECODE]
    for (stage, scope), row in totals.iterrows():
        work = (costs.stages if scope == "run" else costs.steps)[stage]
        assert work.as_dict() == {name: row[name] for name in work.as_dict()}
    ranges = model.range_totals().set_index("stage")
    assert list(costs.ranges) == list(ranges.index)
    assert costs.ranges["prefill/attn"].useful_flops == ranges.loc["prefill/attn", "useful_flops"]
    assert len(costs.families) == len(model.breakdown())
    experts = model.experts()
    assert [e.observed_distinct for e in costs.experts] == [None] * len(experts)
    assert [e.expected_distinct for e in costs.experts] == list(experts["expected_distinct"])
    assert costs.note == ROOFLINE_NOTE


def test_tables_add_up():
    model = run("gundam", (2, 2), decode_steps=3)
    parts = model.breakdown()
    totals = model.totals().set_index(["stage", "scope"])
    sums = parts.groupby(["stage", "scope"])[["matmul_flops", "bytes"]].sum()
    assert list(model.stages) == list(MODEL_STAGES)
    for key in sums.index:
        assert sums.loc[key, "matmul_flops"] == pytest.approx(totals.loc[key, "matmul_flops"])
        assert sums.loc[key, "bytes"] == pytest.approx(totals.loc[key, "bytes"])
    families = set(parts[parts.stage == SAM].family)
    assert {
        "patch_conv",
        "conv2d",
        "sam_attention_global",
        "sam_attention_window",
        "linear",
        "layernorm2d",
    } <= families
    assert {"causal_attention", "moe_routed", "moe_shared", "moe_gate", "swiglu_mlp", "lm_head"} <= set(
        parts[parts.stage == PREFILL].family
    )


def _decode_used_parameter_bytes(model, touched_per_layer: int) -> int:
    """Bytes of the LM parameters one decode step uses: everything but the embedding table
    (one row is gathered) and the routed experts not selected."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("model.embed_tokens"):
            total += p.shape[1] * 2
        elif ".mlp.experts." in name:
            if int(name.split(".mlp.experts.")[1].split(".")[0]) < touched_per_layer:
                total += p.numel() * 2
        elif name.startswith(("model.layers.", "model.norm.", "lm_head.")):
            total += p.numel() * 2
    return total


def test_decode_weight_bytes_are_the_parameters_used(meta_model):
    step = sum(run("base").decode_step.values(), Cost())
    assert step.weight_bytes == _decode_used_parameter_bytes(meta_model, CFG.lm.num_experts_per_tok)
    n = 4
    assert run("base", decode_steps=n).total(DECODE).weight_bytes == pytest.approx(n * step.weight_bytes)


def test_kv_bytes_per_token():
    assert memory.kv_bytes_per_token(CFG.lm, "bfloat16") == 61_440
    assert memory.kv_bytes_per_token(CFG.lm, torch.float32) == 2 * 61_440
    step = sum(run("base").decode_step.values(), Cost())
    assert step.kv_write_bytes == 61_440
    prefill = run("base").total(PREFILL)
    assert prefill.kv_write_bytes == 61_440 * 285


def test_parameter_counts_match_the_checkpoint(meta_model):
    params = memory.stage_parameters(CFG)
    assert params[SAM] == 95_569_152
    assert params[CLIP] == 303_177_728
    assert params[PROJECTOR] == 2_622_720 + 2_560
    assert params[PREFILL] == params[DECODE] == 2_934_734_080
    assert sum(params[s] for s in (SAM, CLIP, PROJECTOR, PREFILL)) == 3_336_106_240
    counts = {SAM: 0, CLIP: 0, PROJECTOR: 0, PREFILL: 0}
    for name, p in meta_model.named_parameters():
        if name.startswith("model.sam_model."):
            counts[SAM] += p.numel()
        elif name.startswith("model.vision_model."):
            counts[CLIP] += p.numel()
        elif name.startswith(("model.projector.", "model.image_newline", "model.view_seperator")):
            counts[PROJECTOR] += p.numel()
        else:
            counts[PREFILL] += p.numel()
    assert counts == {s: params[s] for s in counts}


def test_footprint():
    model = run("gundam", (2, 3), decode_steps=100)
    fp = memory.footprint(CFG, model.workload)
    assert fp.kv_bytes_per_token == 61_440
    # As the session allocates it: S + max_new_tokens positions, and 100 decode steps follow the
    # token the prefill produces, so max_new_tokens = 101.
    assert fp.kv_cache_bytes == 61_440 * (915 + 101)
    assert fp.logits_bytes == 129_280 * 4
    assert fp.total_weight_bytes == 3_336_106_240 * 2
    stages = {s.stage: s for s in fp.stages}
    assert list(stages) == list(MODEL_STAGES)
    base = {s.stage: s for s in memory.footprint(CFG, run("base").workload).stages}
    assert base[SAM].transient_bytes == 12 * 4096 * 4096 * 2
    assert "rel-pos bias" in base[SAM].transient
    assert stages[SAM].weight_bytes == 95_569_152 * 2
    # The run's largest transient: the global view's materialised SAM bias (12 heads x 4096^2 x 2 B)
    # is larger than that of the six 640^2 tiles (6 x 12 x 1600^2 x 2 B).
    assert fp.largest_transient.stage == SAM
    assert fp.largest_transient.transient_bytes == 12 * 4096 * 4096 * 2


def test_footprint_of_the_fast_paths():
    """Base mode, fp32. Blocked: a global block's bias in 4 tiles of 16 grid rows, 12 heads x
    (16 x 64) x 4096 x 4 B. Folded: no bias at all, so the largest SAM transient is the MLP's
    hidden [4096, 3072] fp32 (50.3 MB; a global block's q' is 12 x 4096 x 192 x 4 = 37.7 MB)."""
    workload = run("base", dtype="float32").workload
    blocked = memory.footprint(CFG, workload, FastPaths("blocked", "grouped", "one_by_one", "eager"))
    sam = blocked.stages[0]
    assert sam.stage == SAM
    assert sam.transient_bytes == 12 * 16 * 64 * 4096 * 4 and "tile" in sam.transient
    folded = memory.footprint(CFG, workload, FastPaths("folded", "grouped", "grouped", "graph"))
    sam = folded.stages[0]
    assert sam.transient_bytes == 4096 * 3072 * 4 and "MLP" in sam.transient


def test_the_fast_paths_reference_formulations_cost_what_the_reference_does():
    """SAM attention "reference" and "looped" decode experts are the released code's ways: the
    fast model taking them moves the reference's bytes in SAM and decode."""
    workload = run("base", dtype="float32").workload
    faithful = FastPaths("reference", "looped", "looped", "eager", "plain")
    assert memory.footprint(CFG, workload, faithful) == memory.footprint(CFG, workload)
    fast, reference = run("base", paths=faithful), run("base")
    for stage in (SAM, DECODE):
        assert fast.total(stage) == reference.total(stage)


def test_fast_decode_over_a_static_cache_reads_all_of_it():
    """A positioned step reads K and V of every position of the static cache, visible or not:
    12 layers x 2 x 1280 x 2 B = 61,440 B per position, so 61,440 x (285 + 100) per step
    where the reference reads 61,440 x (285 + 1) in the first and more in later ones."""
    static = FastPaths("folded", "grouped", "grouped", "graph")
    fast = run("base", decode_steps=99, paths=static, cache_len=285 + 100)
    reference = run("base", decode_steps=99)
    assert sum(c.kv_read_bytes for c in fast.decode_step.values()) == 61_440 * 385
    assert sum(c.kv_read_bytes for c in reference.decode_step.values()) == 61_440 * 286
    assert fast.total(DECODE).kv_read_bytes == 99 * 61_440 * 385
    # The default static cache is the one a run of decode_steps + 1 new tokens allocates.
    assert run("base", decode_steps=99, paths=static).total(DECODE) == fast.total(DECODE)


def test_experts_expected_and_observed():
    lm = CFG.lm
    s = run("base").workload.prompt_tokens
    prefill = [[0] * 64 for _ in range(11)]
    for layer in prefill:  # every token to experts 0..5
        layer[:6] = [s] * 6
    step = [[1] * 6 + [0] * 58 for _ in range(11)]
    other = [[0] * 6 + [1] * 6 + [0] * 52 for _ in range(11)]
    routing = RoutingRecord(prefill=prefill, decode=[step, other, step])
    observed = run("base", decode_steps=3, routing=routing)
    expected = run("base", decode_steps=3)
    table = observed.experts().set_index(["layer", "scope"])
    assert table.loc[(1, "prefill"), "observed_distinct"] == 6
    assert table.loc[(1, "prefill"), "expected_distinct"] == pytest.approx(64)
    assert table.loc[(1, "decode_step"), "observed_distinct"] == 6
    assert table.loc[(1, "decode_step"), "expected_distinct"] == pytest.approx(6)
    assert table.loc[(11, "decode_run"), "observed_distinct"] == 12
    assert table.loc[(11, "decode_run"), "expected_distinct"] == pytest.approx(64 * (1 - (58 / 64) ** 3))
    expert_bytes = memory.expert_parameters(lm) * 2
    saved = expected.total(PREFILL).weight_bytes - observed.total(PREFILL).weight_bytes
    assert saved == pytest.approx(11 * (64 - 6) * expert_bytes)
    assert observed.total(DECODE).weight_bytes == pytest.approx(expected.total(DECODE).weight_bytes)
    assert observed.total(PREFILL).matmul_flops == expected.total(PREFILL).matmul_flops


def test_observed_routing_is_counted_per_scope():
    s = run("base").workload.prompt_tokens
    # Every prompt token to experts 0..5 in each of the 11 MoE layers; the one decode step to 7..12.
    prefill = [[s] * 6 + [0] * 58] * 11
    decode = [[[0] * 7 + [1] * 6 + [0] * 51] * 11]
    model = run("base", decode_steps=1, routing=RoutingRecord(prefill=prefill, decode=decode))
    table = model.experts().set_index(["layer", "scope"])
    assert table.loc[(3, "prefill"), "observed_distinct"] == 6
    assert table.loc[(3, "decode_run"), "observed_distinct"] == 6


@pytest.mark.parametrize(
    "routing, steps",
    [
        (RoutingRecord(prefill=[[1] * 64] * 11), 0),  # counts do not sum to S * k
        (RoutingRecord(prefill=[[0] * 64] * 10), 0),  # a layer missing
        # one decode step recorded for a run of two
        (RoutingRecord(prefill=[[285 * 6] + [0] * 63] * 11, decode=[[[6] + [0] * 63] * 11]), 2),
    ],
)
def test_routing_that_does_not_fit_the_run_is_a_bug(routing, steps):
    # The record comes from the run's own recorder, so a mismatch is an internal error.
    with pytest.raises(ValueError):
        run("base", decode_steps=steps, routing=routing)


def test_grids():
    gundam = MODES["gundam"]
    assert resolve_grid(gundam, image_size=(1191, 1684)) == (2, 3)
    assert resolve_grid(gundam, image_size=(600, 500)) == (1, 1)
    assert resolve_grid(MODES["base"]) == (1, 1)
    assert stage_costs(CFG, gundam, image_size=(1000, 1000)).workload.image_tokens == 693
    small_page = stage_costs(CFG, gundam, image_size=(600, 500))
    assert small_page.workload.tiles == 0 and small_page.workload.image_tokens == 273
    for bad in (
        lambda: resolve_grid(gundam),
        lambda: resolve_grid(MODES["base"], (2, 1)),
        lambda: resolve_grid(gundam, (5, 2)),
        lambda: resolve_grid(gundam, (0, 2)),
        lambda: run("base", text_tokens=0),
        lambda: run("base", decode_steps=9000),
        lambda: run("base", dtype="int3"),
        lambda: run("base").total("preprocess"),
    ):
        with pytest.raises(ValueError):  # a caller's bug, not a user's mistake: a traceback
            bad()


def test_every_mode_evaluates_without_a_model():
    for mode in MODES.values():
        grids = [(1, 2), (2, 2), (2, 3), (3, 3)] if mode.crop_mode else [None]
        for grid in grids:
            model = stage_costs(CFG, mode, grid=grid, decode_steps=500, dtype=torch.bfloat16)
            assert all(model.total(stage).matmul_flops > 0 for stage in MODEL_STAGES)


def test_range_totals_sum_the_families_each_module_range_runs():
    model = run("base", decode_steps=2)
    ranges = model.range_totals().set_index("stage")
    parts = model.stages
    sam_attn = parts["sam"]["sam_attention_global"] + parts["sam"]["sam_attention_window"]
    assert ranges.loc["sam/attn", "flops"] == sam_attn.flops
    assert ranges.loc["sam/mlp", "bytes"] == (parts["sam"]["linear"] + parts["sam"]["gelu"]).bytes
    moe = parts["decode"]["moe_gate"] + parts["decode"]["moe_routed"] + parts["decode"]["moe_shared"]
    assert ranges.loc["decode/moe", "useful_flops"] == moe.useful_flops
    # Work outside every tagged module (residual adds, SAM's LayerNorms, ...) stays with the stage.
    for stage in ("sam", "clip", "prefill", "decode"):
        inside = ranges[ranges.index.str.startswith(stage + "/")]["flops"].sum()
        assert 0 < inside < model.total(stage).flops


# -- batches ---------------------------------------------------------------------------------------
def test_a_batch_of_copies_does_n_times_the_work_and_reads_the_weights_once():
    one, four = run("base"), stage_costs(CFG, MODES["base"], grids=[(1, 1)] * 4)
    for stage in (SAM, CLIP, PROJECTOR, PREFILL):
        assert four.total(stage).matmul_flops == pytest.approx(4 * one.total(stage).matmul_flops)
    # Vision weights: read once per SAM and CLIP call, whatever the batch (the projector's
    # newline and separator vectors are read again by each page's layout).
    for stage in (SAM, CLIP):
        assert four.total(stage).weight_bytes == one.total(stage).weight_bytes
    # A decode step of four sequences: four times the KV cache read, the dense weights once.
    assert sum(c.kv_read_bytes for c in four.decode_step.values()) == 4 * sum(
        c.kv_read_bytes for c in one.decode_step.values()
    )
    assert four.decode_step["lm_head"].weight_bytes == one.decode_step["lm_head"].weight_bytes
    assert four.decode_step["lm_head"].matmul_flops == 4 * one.decode_step["lm_head"].matmul_flops


def test_a_batch_of_different_pages_pads_to_the_longest_and_adds_their_vision():
    pages = [(1, 1), (2, 3), (2, 2)]
    batch = stage_costs(CFG, MODES["gundam"], grids=pages)
    alone = [run("gundam", grid) for grid in pages]
    assert batch.workload.prompt_tokens == max(a.workload.prompt_tokens for a in alone)
    assert batch.workload.tiles == 0 + 6 + 4
    for stage in (SAM, CLIP):
        assert batch.total(stage).matmul_flops == pytest.approx(
            sum(a.total(stage).matmul_flops for a in alone)
        )
    # Prefill runs three sequences of the longest prompt (padding is executed work).
    longest = max(alone, key=lambda a: a.workload.prompt_tokens)
    assert batch.total(PREFILL).matmul_flops == pytest.approx(3 * longest.total(PREFILL).matmul_flops)


def test_expected_experts_of_a_batch_decode_step_route_b_tokens():
    lm = CFG.lm
    rows = [
        r
        for r in stage_costs(CFG, MODES["tiny"], grids=[(1, 1)] * 16).expert_usage
        if r["scope"] == "decode_step"
    ]
    e, k = lm.n_routed_experts, lm.num_experts_per_tok
    # 16 tokens of top-6 over 64 experts touch E(1 - (1 - k/E)^16) of them on average.
    assert rows[0]["tokens"] == 16
    assert rows[0]["expected_distinct"] == pytest.approx(e * (1 - (1 - k / e) ** 16))


def test_the_footprint_of_a_batch_holds_every_sequence_kv_cache():
    one = memory.footprint(CFG, run("base", decode_steps=9).workload)
    four = memory.footprint(CFG, stage_costs(CFG, MODES["base"], grids=[(1, 1)] * 4, decode_steps=9).workload)
    assert four.kv_cache_bytes == 4 * one.kv_cache_bytes
    assert four.total_weight_bytes == one.total_weight_bytes
    assert four.largest_transient.transient_bytes == 4 * one.largest_transient.transient_bytes
