"""Costs counted on the meta model: every stage has work, and the counts agree with what is
known independently of the counting (the parameters each decode step multiplies, the
attention over a context one position longer each step)."""

from __future__ import annotations

import pytest

from llm_perf_opt.models.deepseek_ocr2.analytic import DeepSeekOCR2Analytic
from llm_perf_opt.models.deepseek_ocr2.stages import MODEL_STAGES

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


@pytest.fixture(scope="module")
def analytic(tiny_cfg):
    return DeepSeekOCR2Analytic(tiny_cfg)


@pytest.fixture(scope="module")
def request_(tiny_session):
    return tiny_session.prepare(None, PROMPT)


def decode_step_flops(text, context: int) -> int:
    """Matmul FLOPs of one decode token, 2 per multiply-add: q, k, v, o; the dense MLP or the
    MoE (gate, k routed experts, shared experts); lm_head; QK^T and PV over `context` keys."""
    h, heads, d = text.hidden_size, text.num_attention_heads, text.head_dim
    kv = text.num_key_value_heads * d
    macs = text.vocab_size * h
    for kind in text.mlp_layer_types:
        macs += h * heads * d * 2 + h * kv * 2
        if kind == "dense":
            macs += 3 * h * text.intermediate_size
        else:
            macs += h * text.n_routed_experts + text.num_experts_per_tok * 3 * h * text.moe_intermediate_size
            macs += 3 * h * text.moe_intermediate_size * text.n_shared_experts
        macs += 2 * heads * d * context
    return 2 * macs


def test_every_model_stage_has_flops_and_bytes(analytic, request_):
    costs = analytic.stage_model(request_, 3, "float32", None)
    assert list(costs.stages) == list(MODEL_STAGES)
    for work in costs.stages.values():
        assert work.useful_flops > 0 and work.bytes > 0 and work.weight_bytes > 0
    assert costs.stages["decode"].kv_read_bytes > 0  # each step reads the cache prefill wrote


def test_decode_steps_count_the_known_products(analytic, request_):
    text = analytic.config.text_config
    s = request_.prompt_tokens
    costs = analytic.stage_model(request_, 4, "float32", None)
    assert costs.steps["decode"].matmul_flops == decode_step_flops(text, s + 1)  # the first step: S + 1 keys
    total = costs.stages["decode"].matmul_flops
    assert total == sum(decode_step_flops(text, s + 1 + i) for i in range(4))
    twice = analytic.stage_model(request_, 8, "float32", None).stages["decode"].matmul_flops
    assert twice == sum(decode_step_flops(text, s + 1 + i) for i in range(8))
    assert 2 * total < twice < 2.2 * total  # double the steps, a little more for the longer context


def test_vision_and_prefill_do_not_depend_on_decode_steps(analytic, request_):
    one = analytic.stage_model(request_, 1, "float32", None).stages
    four = analytic.stage_model(request_, 4, "float32", None).stages
    for stage in ("sam", "vision", "projector", "prefill"):
        assert one[stage].flops == four[stage].flops


def test_observed_routing_sets_the_experts_read(analytic, request_, tiny_session):
    from llm_perf_opt.profiling.trackers import RoutingRecorder

    with RoutingRecorder(tiny_session.routed_layers()) as recorder:
        tiny_session.generate(request_, 3)
    observed = analytic.stage_model(request_, 2, "float32", recorder.counts)
    even = analytic.stage_model(request_, 2, "float32", None)
    decode_step = [row for row in observed.experts if row.scope == "decode_step"]
    assert decode_step and all(
        row.observed_distinct <= analytic.config.text_config.num_experts_per_tok for row in decode_step
    )
    # routing moves rows between experts, never the number of products
    assert observed.stages["prefill"].matmul_flops == even.stages["prefill"].matmul_flops


def test_footprint_weights_and_kv_cache(analytic, request_, tiny_session):
    footprint = analytic.footprint(request_, 5, "float32")
    params = sum(p.numel() for p in tiny_session.model.parameters())
    assert footprint.total_weight_bytes == 4 * params
    text = analytic.config.text_config
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * 4
    assert footprint.kv_bytes_per_token == per_token
    assert footprint.kv_cache_bytes == per_token * (request_.prompt_tokens + 4)
    assert all(row.transient_bytes > 0 for row in footprint.stages)


def test_first_and_last_decode_steps_give_the_sum_of_every_step(analytic, request_):
    every = analytic.count(request_, 5, "float32", None, every_step=True).calls["decode"]
    assert len(every) == 5
    total = {}
    for call in every:
        for op, cost in call.ops.items():
            total[op] = total.get(op, 0) + cost.flops + cost.bytes
    counts = analytic.count(request_, 5, "float32", None)  # the first and the last step only
    interpolated = analytic.stage_costs(request_, 5, None, counts).stages["decode"]
    assert set(interpolated) == set(total)
    for op, cost in interpolated.items():
        assert cost.flops + cost.bytes == pytest.approx(total[op], rel=1e-12), op


def test_per_op_counts_add_up_to_each_stage_call(analytic, request_):
    """The generic listener's per-op breakdown (analytic.counted.StageCount.ops), which the
    families of the stage model come from, holds every FLOP and byte of the call's totals."""
    counts = analytic.count(request_, 3, "float32", None)
    assert set(counts.calls) == set(MODEL_STAGES)
    for calls in counts.calls.values():
        for call in calls:
            assert sum(cost.matmul_flops for cost in call.ops.values()) == call.flops
            assert sum(cost.bytes for cost in call.ops.values()) == pytest.approx(call.bytes.bytes, rel=1e-12)


@pytest.mark.parametrize("flags", [[], ["--bytes"]], ids=["flops", "bytes"])
def test_validate_runs_the_meta_session(flags, capsys):
    """`analytic.validate --model` loads the session on meta and counts its own generate through
    `counted.count_run`: transformers' code must run there (meta.py's stand-ins)."""
    from llm_perf_opt.analytic import validate

    assert validate.main(["--model", "deepseek_ocr2_tiny", *flags]) == 0
    assert "PASS" in capsys.readouterr().out
