"""`python -m llm_perf_opt.analytic.validate`: the formulas against the costs counted on the meta
model through the session's own `generate`, and the counter that gives them (analytic.counted)."""

from __future__ import annotations

import pytest
import torch
from model_costs import meta_model

from llm_perf_opt.analytic import counted, validate
from llm_perf_opt.analytic import families as fam
from llm_perf_opt.config import load
from llm_perf_opt.models.deepseek_ocr.analytic import checks
from llm_perf_opt.models.deepseek_ocr.analytic.costs import MODEL_STAGES
from llm_perf_opt.models.interface import even_split
from llm_perf_opt.runners.ranges import listening, stage_range

TINY = "deepseek_ocr_tiny"


def test_validate_passes_and_lists_every_case(capsys):
    assert validate.main([]) == 0
    out = capsys.readouterr().out
    names = {case.name for case in validate.cases()}
    single = {"tiny", "small", "base", "large", "gundam 1x2", "gundam 2x2", "gundam 2x3", "gundam 3x3"}
    batches = {
        f"{mode}, batch {n}" for mode in ("tiny", "small", "base", "large", "gundam 2x2") for n in (2, 8)
    }
    assert names == single | batches
    for name in names:
        assert name in out
    assert "SAM, 1024^2 view" in out and "lm_head per token" in out
    assert "PASS" in out and "False" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--model", "nope"], "--model"), (["--impl", "fast"], "--bytes")],
)
def test_bad_argument_is_one_line_and_non_zero(capsys, argv, message):
    assert validate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err


def test_an_unknown_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        validate.main(["--text-tokens", "7"])  # gone: the prompt's own tokens are counted
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unrecognized" in err


@pytest.mark.parametrize(
    ("assignments", "experts", "split"),
    [(10, 4, [3, 3, 2, 2]), (8, 4, [2, 2, 2, 2]), (3, 4, [1, 1, 1, 0]), (0, 2, [0, 0])],
)
def test_even_split_spreads_the_assignments(assignments, experts, split):
    # Meta tensors carry no expert ids: only the number of T·k assignments matters.
    flat = torch.empty(assignments, dtype=torch.long, device="meta")
    assert even_split(flat, experts) == split


def test_meta_model_runs_its_moe_layers_without_values(tiny_arch):
    model = meta_model(tiny_arch)
    lm, t = tiny_arch.lm, 10
    d, k, e = lm.hidden_size, lm.num_experts_per_tok, lm.n_routed_experts
    x = torch.empty(1, t, d, device="meta", dtype=torch.bfloat16)
    with counted.flop_counter() as counter:
        y = model.model.layers[1].mlp(x)
    assert y.shape == x.shape and y.is_meta
    # The gate, T·k routed SwiGLUs and T shared ones; a SwiGLU of width f is 3 matmuls of 2·d·f per token.
    gate = 2 * t * d * e
    routed = t * k * 3 * 2 * d * lm.moe_intermediate_size
    shared = t * 3 * 2 * d * lm.shared_intermediate_size
    assert counter.get_total_flops() == gate + routed + shared


def test_the_flop_counter_registers_no_module_hooks():
    # FlopCounterMode's own module tracking adds global forward hooks, which DeepSeek-OCR's fast
    # decode takes for observers; the counter here counts in total only.
    hooks = torch.nn.modules.module._global_forward_hooks
    with counted.flop_counter() as counter:
        assert len(torch.nn.modules.module._global_forward_hooks) == len(hooks)
        torch.nn.functional.linear(torch.ones(3, 4), torch.ones(5, 4))
    assert counter.get_total_flops() == 2 * 3 * 4 * 5


def test_the_stage_counter_counts_each_call_of_each_stage_and_nests_families():
    weight = torch.ones(8, 4)
    counter = counted.StageCounter([weight], lambda: [])
    x = torch.ones(2, 4)
    with torch.no_grad(), listening(counter):
        with stage_range("a"):
            torch.nn.functional.linear(x, weight)  # 2*2*4*8 FLOPs; reads x and the weight, writes [2, 8]
            with stage_range("a/mlp"):
                torch.nn.functional.linear(x, weight)
        for _ in range(2):
            with stage_range("b"):
                x + 1
    assert [c.flops for c in counter.calls["a"]] == [2 * 2 * 2 * 4 * 8]
    a = counter.calls["a"][0].bytes
    assert a.weight_bytes == 2 * 8 * 4 * 4 and a.act_read_bytes == 2 * 2 * 4 * 4
    assert a.act_write_bytes == 2 * 2 * 8 * 4
    b = counter.calls["b"]
    assert len(b) == 2 and b[0] == b[1] and b[0].flops == 0
    assert b[0].bytes == fam.Cost(act_read_bytes=2 * 4 * 4, act_write_bytes=2 * 4 * 4)


def test_count_run_counts_the_sessions_own_stages_on_meta(tmp_path):
    run = load([f"model={TINY}", "mode=gundam"])
    session = validate.meta_session(run)
    request = session.prepare(validate.blank_page(tmp_path, (1280, 1920)), run.prompt)
    assert request.views.grid == (2, 3)
    result = counted.count_run(session, request, max_new_tokens=4)
    assert list(result.calls) == list(MODEL_STAGES)
    assert len(result.calls["decode"]) == 3 and all(len(result.calls[s]) == 1 for s in MODEL_STAGES[:-1])
    lm = run.model.arch.lm
    # Prefill writes K and V of every prompt token in every layer; each decode step one more.
    kv = 2 * lm.num_hidden_layers * lm.num_key_value_heads * lm.head_dim * 2
    assert result.calls["prefill"][0].bytes.kv_write_bytes == request.prompt_tokens * kv
    assert all(step.bytes.kv_write_bytes == kv for step in result.calls["decode"])
    # Routing on meta: every prompt token's k experts in prefill, k per decode step, spread evenly.
    k = lm.num_experts_per_tok
    assert [sum(layer) for layer in result.routing["prefill"][0]] == [request.prompt_tokens * k] * 2
    assert len(result.routing["decode"]) == 3
    costs = validate.analytic_model(run).stage_model(
        request, 3, "bfloat16", result.routing, session.execution()
    )
    for stage in MODEL_STAGES:
        assert result.total(stage).flops == costs.stages[stage].matmul_flops, stage


def test_count_run_needs_the_meta_device():
    from llm_perf_opt.models.interface import SessionOptions
    from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

    session = DeepSeekOCRSession(
        load([f"model={TINY}"]).model, SessionOptions(torch.device("cpu"), torch.float32)
    )
    with pytest.raises(ValueError, match="meta"):
        counted.count_run(session, None, 2)


def test_fast_paths_on_meta_must_all_be_named():
    run = load([f"model={TINY}", "model.impl=fast", "model.paths.sam_attention=folded"])
    with pytest.raises(Exception, match="model.paths.moe_prefill"):
        validate.meta_session(run)


def test_the_fast_cases_cover_every_meta_path_set_on_every_case():
    reference, fast = checks.check_cases("reference"), checks.check_cases("fast")
    assert all("model.impl=fast" in case.overrides for case in fast)
    single = [case.name for case in reference if "batch" not in case.name]
    for name, paths in checks.META_FAST_PATHS.items():
        names = {case.name.removeprefix(f"{name}: ") for case in fast if case.name.startswith(f"{name}: ")}
        # Batches wherever a batch's decode step runs its experts in a way a meta model can count.
        expected = {case.name for case in reference} if paths.routed_for(2) != "grouped" else set(single)
        assert names == expected
