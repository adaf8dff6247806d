"""`python -m llm_perf_opt.analytic.validate` agrees with FlopCounterMode for every case."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.analytic import validate


def test_validate_passes_and_lists_every_case(capsys):
    assert validate.main([]) == 0
    out = capsys.readouterr().out
    for case in validate.cases():
        assert case.name in out
    assert {"tiny", "small", "base", "large", "gundam 1x2", "gundam 2x2", "gundam 2x3", "gundam 3x3"} == {
        c.name for c in validate.cases()
    }
    assert "SAM, 1024^2 view" in out and "lm_head per token" in out
    assert "PASS" in out and "False" not in out


def test_bad_argument_is_one_line_and_non_zero(capsys):
    assert validate.main(["--text-tokens", "0"]) != 0
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "text-tokens" in err


@pytest.mark.parametrize(
    ("assignments", "experts", "split"),
    [(10, 4, [3, 3, 2, 2]), (8, 4, [2, 2, 2, 2]), (3, 4, [1, 1, 1, 0]), (0, 2, [0, 0])],
)
def test_even_split_spreads_the_assignments(assignments, experts, split):
    # Meta tensors carry no expert ids: only the number of T·k assignments matters.
    flat = torch.empty(assignments, dtype=torch.long, device="meta")
    assert validate.even_split(flat, experts) == split


def test_meta_model_runs_its_moe_layers_without_values(tiny_arch):
    model = validate.build_meta_model(tiny_arch)
    assert all(layer.count_tokens is validate.even_split for layer in model.moe_layers().values())
    lm, t = tiny_arch.lm, 10
    d, k, e = lm.hidden_size, lm.num_experts_per_tok, lm.n_routed_experts
    x = torch.empty(1, t, d, device="meta", dtype=torch.bfloat16)
    with validate.flop_counter() as counter:
        y = model.model.layers[1].mlp(x)
    assert y.shape == x.shape and y.is_meta
    # The gate, T·k routed SwiGLUs and T shared ones; a SwiGLU of width f is 3 matmuls of 2·d·f per token.
    gate = 2 * t * d * e
    routed = t * k * 3 * 2 * d * lm.moe_intermediate_size
    shared = t * 3 * 2 * d * lm.shared_intermediate_size
    assert counter.get_total_flops() == gate + routed + shared
