"""ByteCounter on hand-computed cases, family formulas against it, and `validate --bytes` on the
tiny architecture."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from model_costs import forward_total, meta_model
from torch import nn

from llm_perf_opt.analytic import counted, validate
from llm_perf_opt.analytic import families as fam
from llm_perf_opt.analytic.byte_count import ATTENTION, ByteCounter, footprint
from llm_perf_opt.config import load
from llm_perf_opt.models.deepseek_ocr.analytic import checks
from llm_perf_opt.models.deepseek_ocr.analytic import formulas as ocr_fam
from llm_perf_opt.models.deepseek_ocr.analytic.costs import MODEL_STAGES, stage_costs
from llm_perf_opt.models.deepseek_ocr.config import SamConfig
from llm_perf_opt.models.deepseek_ocr.decoder import RMSNorm
from llm_perf_opt.models.deepseek_ocr.projector import layout_image_embeds
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.models.deepseek_ocr.sam import (
    LayerNorm2d,
    SamAttention,
    window_partition,
)

SAM, CLIP, PROJECTOR, PREFILL, DECODE = MODEL_STAGES
BF16 = torch.bfloat16


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def count(fn, weights=(), kv=()) -> ByteCounter:
    with ByteCounter(weights=weights, kv=kv) as counter:
        fn()
    return counter


BYTE_FIELDS = ("weight_bytes", "act_read_bytes", "act_write_bytes", "kv_read_bytes", "kv_write_bytes")


def as_bytes(cost: fam.Cost) -> fam.Cost:
    """The byte fields of an analytic cost (its FLOPs dropped), which must be whole numbers of bytes."""
    values = {name: getattr(cost, name) for name in BYTE_FIELDS}
    assert all(v == int(v) for v in values.values()), values
    return fam.Cost(**{name: int(v) for name, v in values.items()})


# -- the counter on hand-computed cases ----------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_linear_reads_input_weight_bias_and_writes_output(device):
    with torch.device(device):
        layer = nn.Linear(48, 80).to(BF16)
        x = torch.zeros(2, 7, 48, dtype=BF16)
    with torch.no_grad():
        counter = count(lambda: layer(x), weights=layer.parameters())
    # W 80*48*2 = 7680 and b 80*2 = 160 are weights; x 14*48*2 = 1344 read; y 14*80*2 = 2240 written.
    assert counter.total == fam.Cost(weight_bytes=7840, act_read_bytes=1344, act_write_bytes=2240)
    assert set(counter.by_op) == {"addmm"}


def test_the_same_tensor_is_not_a_weight_unless_it_is_a_parameter():
    w = meta(80, 48)
    counter = count(lambda: F.linear(meta(14, 48), w))
    assert counter.total == fam.Cost(act_read_bytes=14 * 48 * 4 + 80 * 48 * 4, act_write_bytes=14 * 80 * 4)


def test_views_and_metadata_ops_are_free_copies_are_not():
    x = meta(4, 6, 8)

    def views():
        y = x.view(24, 8).t().reshape(8, 4, 6).permute(2, 0, 1)
        y.unsqueeze(0).squeeze(0).expand(2, 6, 8, 4).select(0, 1)
        x[:, 1:3].unbind(1)
        x.split(2, dim=1)
        x.transpose(0, 1).detach()
        torch.as_strided(x, (2, 2), (1, 1))
        torch.empty(1000, device="meta")

    assert count(views).total == fam.Cost()
    # A reshape that cannot be a view copies: read 4*6*8*4 = 768, write 768.
    copy = fam.Cost(act_read_bytes=768, act_write_bytes=768)
    assert count(lambda: x.transpose(0, 1).reshape(48, 4)).total == copy
    assert count(lambda: torch.zeros(10, device="meta")).total == fam.Cost(act_write_bytes=40)


def test_matmul_chain():
    a, b, c = meta(4, 8), meta(8, 16), meta(16, 2)
    counter = count(lambda: a @ b @ c)
    # a@b: read 4*8*4 + 8*16*4 = 640, write 4*16*4 = 256; (ab)@c: read 256 + 16*2*4 = 384, write 4*2*4 = 32.
    assert counter.total == fam.Cost(act_read_bytes=640 + 384, act_write_bytes=256 + 32)
    assert counter.by_op["mm"].bytes == 640 + 256 + 384 + 32


def test_a_broadcast_operand_is_read_once():
    x, row = meta(3, 5), meta(5)
    expected = fam.Cost(act_read_bytes=15 * 4 + 5 * 4, act_write_bytes=15 * 4)
    assert count(lambda: x + row).total == expected
    assert count(lambda: x + row.expand(3, 5)).total == expected
    assert footprint(row.expand(3, 5)) == 20 and footprint(x.t()) == 60


def test_a_gather_reads_only_what_it_can_output():
    table = nn.Embedding(1000, 16, device="meta")
    ids = meta(1, 9, dtype=torch.long)
    counter = count(lambda: table(ids), weights=table.parameters())
    # 9 rows of 16 fp32 = 576 bytes of the 64,000-byte table; ids 9*8 = 72.
    assert counter.total == fam.Cost(weight_bytes=576, act_read_bytes=72, act_write_bytes=576)
    small = meta(3, 4)
    many = meta(50, dtype=torch.long)
    # 50 rows gathered from a 3-row table: the table (48 bytes) is read once, not 50 times.
    assert count(lambda: small[many]).total == fam.Cost(act_read_bytes=48 + 400, act_write_bytes=50 * 16)


def test_in_place_out_and_overwrite():
    x, y, out = meta(10), meta(10), meta(10)
    assert count(lambda: x.add_(y)).total == fam.Cost(act_read_bytes=80, act_write_bytes=40)
    assert count(lambda: torch.add(x, y, out=out)).total == fam.Cost(act_read_bytes=80, act_write_bytes=40)
    assert count(lambda: x.copy_(y)).total == fam.Cost(act_read_bytes=40, act_write_bytes=40)


def test_kv_cache_writes_and_reads_are_told_apart():
    keys, values = meta(1, 2, 10, 4, dtype=BF16), meta(1, 2, 10, 4, dtype=BF16)
    k, q = meta(1, 2, 3, 4, dtype=BF16), meta(1, 2, 3, 4, dtype=BF16)

    def step():
        keys[:, :, 0:3] = k
        values[:, :, 0:3] = k
        F.scaled_dot_product_attention(q, keys[:, :, :3], values[:, :, :3], is_causal=True)

    counter = count(step, kv=[keys, values])
    rows = 1 * 2 * 3 * 4 * 2  # one [1, 2, 3, 4] bf16 block: 48 bytes
    assert counter.total == fam.Cost(
        act_read_bytes=2 * rows + rows, act_write_bytes=rows, kv_read_bytes=2 * rows, kv_write_bytes=2 * rows
    )


def test_attention_is_one_fused_kernel():
    # q from a projection then a transpose: [B, S, H, D] in memory.
    q = meta(1, 5, 2, 8, dtype=BF16).transpose(1, 2)
    mask = meta(1, 2, 5, 5, dtype=BF16)

    def attend():
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return out.transpose(1, 2).reshape(1, 5, 16)  # a view in the fused kernels' layout

    counter = count(attend)
    # q, k, v 3 * 80*2 = 480 and the mask 50*2 = 100 read; the output 80*2 = 160 written; no scores.
    assert counter.by_op == {ATTENTION: fam.Cost(act_read_bytes=580, act_write_bytes=160)}


@torch.no_grad()
def test_attention_on_cpu_runs_the_real_kernel():
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    with ByteCounter() as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert counter.by_op == {ATTENTION: fam.Cost(act_read_bytes=3 * 64 * 4, act_write_bytes=64 * 4)}


def test_a_value_head_dim_of_its_own_gets_the_memory_efficient_layout_on_meta():
    q, k, v = meta(1, 2, 5, 16, dtype=BF16), meta(1, 2, 5, 16, dtype=BF16), meta(1, 2, 5, 8, dtype=BF16)

    def attend():
        out = F.scaled_dot_product_attention(q, k, v)
        assert out.shape == (1, 2, 5, 8)
        return out.transpose(1, 2).reshape(1, 5, 16)  # [B, S, H, Dv] in memory: a view

    counter = count(attend)
    # q, k 2 * 160*2 = 640 and v 80*2 = 160 read; the output 80*2 = 160 written; no copy after it.
    assert counter.by_op == {ATTENTION: fam.Cost(act_read_bytes=800, act_write_bytes=160)}


@torch.no_grad()
def test_a_grouped_gemm_reads_the_weights_of_groups_with_rows():
    rows, weights = torch.randn(6, 8), torch.randn(4, 8, 4)  # 4 groups of 8*4*4 = 128 bytes
    ends = torch.tensor([2, 2, 6, 6], dtype=torch.int32)  # groups 0 and 2 get rows, 1 and 3 none
    counter = count(lambda: F.grouped_mm(rows, weights, offs=ends), weights=[weights])
    # rows 6*8*4 = 192 and the int32 ends 16 read, two groups' weights (256), output 6*4*4 = 96 written.
    assert counter.total == fam.Cost(weight_bytes=256, act_read_bytes=208, act_write_bytes=96)
    # On meta the ends have no values: every group counts as read (bf16 [4, 8, 8]: 512 bytes).
    on_meta = meta(4, 8, 8, dtype=BF16)
    counter = count(
        lambda: F.grouped_mm(meta(6, 8, dtype=BF16), on_meta, offs=ends.to("meta")), weights=[on_meta]
    )
    assert counter.total.weight_bytes == 512


def test_index_copy_writes_only_where_the_source_goes():
    cache, k = meta(1, 2, 10, 4, dtype=BF16), meta(1, 2, 1, 4, dtype=BF16)
    position = meta(1, dtype=torch.long)
    counter = count(lambda: cache.index_copy_(2, position, k), kv=[cache])
    # k 16 bytes and the int64 index 8 read; 16 bytes written into the cache, none of it read.
    assert counter.total == fam.Cost(act_read_bytes=24, kv_write_bytes=16)


def test_inference_mode_is_refused():
    # There composite ops (reshape, einsum) reach the counter whole and their copies go unseen.
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        with ByteCounter():
            pass


def test_an_op_returning_no_tensor_still_reads():
    x = torch.tensor([5, 6])
    assert count(lambda: x[1].item()).total == fam.Cost(act_read_bytes=8)


# -- family formulas against the counter ----------------------------------------------------------


def test_rmsnorm_by_hand():
    norm = RMSNorm(4, 1e-6).to(device="meta", dtype=BF16)
    counter = count(lambda: norm(meta(3, 4, dtype=BF16)), weights=norm.parameters())
    # n = 12 elements, 3 rows: cast 24 -> 48, pow 48 -> 48, mean 48 -> 12, +eps 12 -> 12,
    # rsqrt 12 -> 12, x*rstd 48+12 -> 48, cast 48 -> 24, weight (8 bytes) * x 24 -> 24.
    by_hand = fam.Cost(
        weight_bytes=8,
        act_read_bytes=24 + 48 + 48 + 12 + 12 + 60 + 48 + 24,
        act_write_bytes=48 + 48 + 12 + 12 + 12 + 48 + 24 + 24,
    )
    assert counter.total == by_hand == as_bytes(fam.rmsnorm(3, 4, "bfloat16"))
    # In fp32 the casts are no-ops: 276 - 24 - 48 read, 228 - 48 - 24 written, 16-byte weight.
    norm32 = RMSNorm(4, 1e-6).to(device="meta")
    fp32 = count(lambda: norm32(meta(3, 4)), weights=norm32.parameters()).total
    assert fp32 == fam.Cost(weight_bytes=16, act_read_bytes=204 + 24, act_write_bytes=156 + 24)
    assert fp32 == as_bytes(fam.rmsnorm(3, 4, "float32"))


@pytest.mark.parametrize("dtype, name", [(BF16, "bfloat16"), (torch.float32, "float32")])
def test_norm_families_match_the_count(dtype, name):
    ln2d = LayerNorm2d(8).to(device="meta", dtype=dtype)
    counted = count(lambda: ln2d(meta(2, 8, 3, 3, dtype=dtype)), weights=ln2d.parameters()).total
    assert counted == as_bytes(fam.layernorm2d(2, 8, 3, name))
    ln = nn.LayerNorm(8, device="meta", dtype=dtype)
    counted = count(lambda: ln(meta(5, 8, dtype=dtype)), weights=ln.parameters()).total
    assert counted == as_bytes(fam.layernorm(5, 8, name))


@pytest.mark.parametrize(
    "grid, window, table_side", [(10, 4, 4), (6, 0, 6), (6, 0, 9), (5, 7, 7)]
)  # windowed, global, global with a resized rel-pos table, one padded window
@pytest.mark.parametrize("batch", [1, 2])
def test_sam_attention_matches_the_count(grid, window, table_side, batch):
    cfg = SamConfig(width=32, heads=4, window_size=window or 14)
    attn = SamAttention(cfg, table_side).to(device="meta", dtype=BF16)
    x = meta(batch, grid, grid, 32, dtype=BF16)
    windows = window_partition(x, window)[0] if window else x
    counted = count(lambda: attn(windows), weights=attn.parameters()).total
    cost = ocr_fam.sam_attention(batch, grid, 32, 4, "bfloat16", window=window, table_side=table_side)
    assert counted == as_bytes(cost)


@pytest.mark.parametrize("tokens", [1, 5])
def test_moe_matches_the_count(tiny_arch, tokens):
    lm = tiny_arch.lm
    layer = meta_model(tiny_arch).moe_layers()[1]
    x = meta(1, tokens, lm.hidden_size, dtype=BF16)
    counted = count(lambda: layer(x), weights=layer.parameters()).total
    # On meta the T*k assignments are spread evenly: min(E, T*k) experts are fed.
    touched = min(lm.n_routed_experts, tokens * lm.num_experts_per_tok)
    cost = ocr_fam.moe(
        tokens,
        lm.hidden_size,
        lm.moe_intermediate_size,
        lm.n_routed_experts,
        lm.num_experts_per_tok,
        lm.shared_intermediate_size,
        "bfloat16",
        experts_touched=touched,
    )
    assert counted == as_bytes(cost)


# -- the validator on the tiny architecture -------------------------------------------------------


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("mode", ["base", "small"])  # the tables' own size, and one that resizes them
def test_each_stage_reads_exactly_the_parameters_it_uses(mode):
    run = load(["model=deepseek_ocr_tiny", f"mode={mode}"])
    session = validate.meta_session(run)
    counts = counted.count_run(session, session.prepare(None, run.prompt), 2)
    inner = session.model.model
    assert counts.total(SAM).bytes.weight_bytes == _param_bytes(inner.sam_model)
    # CLIP's patch conv is in the checkpoint but never runs: SAM's features replace it.
    unused = inner.vision_model.embeddings.patch_embedding
    assert counts.total(CLIP).bytes.weight_bytes == _param_bytes(inner.vision_model) - _param_bytes(unused)
    # The projector's range also lays the image out: one newline per view, and the separator.
    layout = inner.image_newline.numel() * 2 + inner.view_seperator.numel() * 2
    assert counts.total(PROJECTOR).bytes.weight_bytes == _param_bytes(inner.projector) + layout


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "float32"), (BF16, "bfloat16")])
@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 3)])  # no tiles; stitched without a copy; with one
def test_image_layout_matches_the_count(tiny_arch, dtype, name, grid):
    cols, rows = grid
    c, q, qt = tiny_arch.lm.hidden_size, 16, 10
    newline, separator = nn.Parameter(torch.randn(c, dtype=dtype)), nn.Parameter(torch.randn(c, dtype=dtype))
    global_feats = torch.randn(1, q * q, c, dtype=dtype)
    tiles = torch.randn(cols * rows, qt * qt, c, dtype=dtype) if cols * rows > 1 else None
    with torch.no_grad():
        counter = count(
            lambda: layout_image_embeds(global_feats, tiles, grid, newline, separator), [newline, separator]
        )
    assert counter.total == as_bytes(ocr_fam.image_layout(grid, q, qt, c, name))


def test_the_greedy_pick_matches_the_count():
    logits = torch.randn(1, 1000)
    with torch.no_grad():
        counter = count(lambda: logits.argmax(-1, keepdim=True))
    assert counter.total == as_bytes(ocr_fam.greedy_pick(1000))


class ExpertRows:
    """Rows each routed expert of the reference model receives, per MoE layer, observed with
    forward pre-hooks (its loop calls every fed expert as a module): a real run's routing."""

    def __init__(self, model) -> None:
        self._rows = {layer: [0] * len(moe.experts) for layer, moe in model.moe_layers().items()}
        self._handles = [
            expert.register_forward_pre_hook(self._hook(layer, e))
            for layer, moe in model.moe_layers().items()
            for e, expert in enumerate(moe.experts)
        ]

    def _hook(self, layer: int, expert: int):
        def record(module, args) -> None:
            self._rows[layer][expert] += args[0].shape[0]

        return record

    def take(self) -> tuple[tuple[int, ...], ...]:
        """Counts per MoE layer since the last take, layers in order."""
        out = tuple(tuple(self._rows[layer]) for layer in sorted(self._rows))
        for counts in self._rows.values():
            counts[:] = [0] * len(counts)
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def test_a_real_cpu_run_moves_the_analytic_bytes(tiny_arch, tiny_model):
    """Real kernels (CPU flash attention, real routing) lay tensors out as the meta run assumes.
    The one addition: a real MoE sizes its expert batches with a bincount per layer (read the
    T*k int64 ids, write E int64 counts), which meta runs skip."""
    m, lm = tiny_model, tiny_arch.lm
    tiny = load(["mode=tiny"]).model.mode
    params = list(m.parameters())

    def count_real(fn, kv=()):
        with ByteCounter(weights=params, kv=kv) as counter:
            out = fn()
        return counter.total, out

    pixels = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    sam, sam_out = count_real(lambda: m.sam(pixels))
    clip, clip_out = count_real(lambda: m.clip(sam_out))
    projector, feats = count_real(lambda: m.project(sam_out, clip_out))
    embeds = m.layout(feats, None, (1, 1))
    s = embeds.shape[0] + 12
    ids = torch.full((1, s), 100)
    ids[0, 1 : 1 + embeds.shape[0]] = tiny_arch.image_token_id
    cache = m.new_cache(s + 1)
    experts = ExpertRows(m)
    try:
        m.prefill(ids, embeds, cache)
        prefill_rows = experts.take()
        token = torch.tensor([[100]])
        step, _ = count_real(lambda: m.decode_step(token, cache), cache.keys + cache.values)
        step_rows = experts.take()
    finally:
        experts.close()
    routing = RoutingRecord(prefill=prefill_rows, decode=(step_rows,))
    model = stage_costs(tiny_arch, tiny, text_tokens=12, decode_steps=1, dtype="float32", routing=routing)
    # The model's calls alone: the session's layout and greedy picks are left out here.
    for stage, moved in ((SAM, sam), (CLIP, clip), (PROJECTOR, projector)):
        assert moved == as_bytes(forward_total(model.stages[stage]))
    moe_layers = len(routing.prefill)
    k, e = lm.num_experts_per_tok, lm.n_routed_experts
    bincount = fam.Cost(act_read_bytes=moe_layers * k * 8, act_write_bytes=moe_layers * e * 8)
    assert step == as_bytes(forward_total(model.decode_step)) + bincount


def test_validate_bytes_passes_on_the_tiny_architecture(capsys):
    assert validate.main(["--model", "deepseek_ocr_tiny", "--bytes"]) == 0
    out = capsys.readouterr().out
    for case in validate.cases("deepseek_ocr_tiny"):
        assert case.name in out
    assert "PASS" in out and "fused kernel" in out and "False" not in out


def test_the_bytes_flag_runs_the_byte_check(monkeypatch):
    calls = []

    def compare(model, impl, bytes_):
        calls.append((model, impl, bytes_))
        return pd.DataFrame([{"case": "x", "ok": False}])

    monkeypatch.setattr(validate, "compare", compare)
    assert validate.main(["--bytes"]) == 1
    assert validate.main(["--bytes", "--impl", "fast", "--model", "deepseek_ocr_tiny"]) == 1
    assert calls == [("deepseek_ocr", "reference", True), ("deepseek_ocr_tiny", "fast", True)]


def test_validate_bytes_of_the_fast_paths_passes_on_the_tiny_architecture(monkeypatch, capsys):
    every = validate.cases("deepseek_ocr_tiny", "fast")
    some = [case for case in every if case.name.endswith((": tiny", ": gundam 2x3"))]
    assert len(some) == 2 * len(checks.META_FAST_PATHS)
    monkeypatch.setattr(validate, "cases", lambda model, impl: some)
    assert validate.main(["--model", "deepseek_ocr_tiny", "--bytes", "--impl", "fast"]) == 0
    out = capsys.readouterr().out
    for name in checks.META_FAST_PATHS:
        assert f"{name}: gundam 2x3" in out
    assert "PASS" in out and "False" not in out


def test_float32_model_agrees_too(monkeypatch):
    # gundam 2x3: the global view at the tables' own size and six 640^2 tiles that resize them.
    gundam = [case for case in validate.cases("deepseek_ocr_tiny") if case.name == "gundam 2x3"]
    monkeypatch.setattr(validate, "cases", lambda model, impl: gundam)
    monkeypatch.setattr(validate, "DTYPE", torch.float32)
    table = validate.compare("deepseek_ocr_tiny", "reference", bytes_=True)
    assert table["ok"].all() and len(table) == 6


def test_a_wrong_formula_fails(monkeypatch, capsys):
    one = [case for case in validate.cases("deepseek_ocr_tiny") if case.name == "tiny"]
    monkeypatch.setattr(validate, "cases", lambda model, impl: one)
    original = fam.rmsnorm
    monkeypatch.setattr(fam, "rmsnorm", lambda *a: original(*a) + fam.Cost(act_write_bytes=1))
    assert validate.main(["--model", "deepseek_ocr_tiny", "--bytes"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 3 disagreement(s)" in out  # prefill, the decode step and the decode run
