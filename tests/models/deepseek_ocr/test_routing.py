"""MoE routing under dummy weights: gate balancing and the routing record."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_perf_opt.config import load
from llm_perf_opt.hardware.precision import choose_dtype
from llm_perf_opt.models import pages
from llm_perf_opt.models.deepseek_ocr import preprocess, routing, weights
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord, balanced_gate_weight
from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT, build_input_ids, load_tokenizer

# Acceptance bound: the busiest expert gets at most this multiple of the mean load.
MAX_OVER_MEAN = 3.0


def topk_loads(x: torch.Tensor, gate: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens per expert under softmax top-k routing of the rows of x."""
    experts = (x.float() @ gate.float().T).softmax(-1).topk(k, dim=-1).indices
    return torch.bincount(experts.flatten(), minlength=gate.shape[0])


def clustered_tokens(tokens: int = 2048, dim: int = 96, seed: int = 0) -> torch.Tensor:
    """Hidden-state-like data: one large component shared by every token plus small,
    anisotropic per-token variation."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=gen)
    shared = 20 * shared / shared.norm()
    spread = torch.linspace(0.05, 0.5, dim)  # per-direction scale of the variation
    mixing = torch.linalg.qr(torch.randn(dim, dim, generator=gen)).Q
    return shared + (torch.randn(tokens, dim, generator=gen) * spread) @ mixing.T


def test_balanced_gate_spreads_clustered_tokens_where_a_random_gate_concentrates():
    x = clustered_tokens()
    n_experts, k = 64, 6
    mean_load = x.shape[0] * k / n_experts

    balanced = balanced_gate_weight(x, n_experts, torch.Generator().manual_seed(0))
    assert balanced.shape == (n_experts, x.shape[1])
    loads = topk_loads(x, balanced, k)
    assert int(loads.sum()) == x.shape[0] * k
    assert int(loads.min()) > 0, loads
    assert float(loads.max()) <= MAX_OVER_MEAN * mean_load, loads

    # Why balancing exists: a plain random gate maps the shared component to one fixed
    # logit vector, so nearly every token picks the same few experts.
    gen = torch.Generator().manual_seed(1)
    random_gate = torch.randn(n_experts, x.shape[1], generator=gen) / x.shape[1] ** 0.5
    random_loads = topk_loads(x, random_gate, k)
    assert float(random_loads.max()) > 2 * MAX_OVER_MEAN * mean_load, random_loads
    assert int((random_loads > 0).sum()) < n_experts // 2, random_loads


def test_balanced_gate_ignores_the_shared_component_and_is_seeded():
    x = clustered_tokens(tokens=512, dim=32, seed=2)
    a = balanced_gate_weight(x, 16, torch.Generator().manual_seed(5))
    b = balanced_gate_weight(x, 16, torch.Generator().manual_seed(5))
    c = balanced_gate_weight(x, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    direction = x.mean(0) / x.mean(0).norm()
    assert float((a @ direction).abs().max()) < 1e-4 * float(a.norm(dim=1).max())
    # Logits have about unit spread across tokens, the same for every expert.
    spread = (x @ a.T).std(0)
    assert float(spread.min()) > 0.5 and float(spread.max()) < 2.0


# --- the tiny model: only the gates change ---------------------------------------------------


def tiny_prompt(arch: DeepSeekOCRConfig, n_image: int = 24, n_text: int = 16):
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, 128000, (n_text,), generator=gen).tolist()
    ids = torch.tensor([[0] + [arch.image_token_id] * n_image + text])
    return ids, torch.randn(n_image, arch.lm.hidden_size, generator=gen)


def test_balance_router_only_changes_moe_gate_weights(tiny_arch, tiny_model):
    model = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, embeds = tiny_prompt(tiny_arch)
    routing.balance_router(model, ids, embeds)
    after = model.state_dict()

    gates = {f"model.layers.{i}.mlp.gate.weight" for i in model.moe_layers()}
    assert len(gates) == tiny_arch.lm.num_hidden_layers - tiny_arch.lm.first_k_dense_replace
    assert set(after) == set(before)
    for key, tensor in after.items():
        assert tensor.dtype == before[key].dtype and tensor.shape == before[key].shape, key
        if key in gates:
            assert not torch.equal(tensor, before[key]), key
        else:
            assert torch.equal(tensor, before[key]), key
    # No hooks are left behind.
    assert all(not moe._forward_pre_hooks for moe in model.moe_layers().values())


def test_balance_router_is_seeded(tiny_arch, tiny_model):
    ids, embeds = tiny_prompt(tiny_arch)
    gates = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(tiny_model)
        routing.balance_router(model, ids, embeds, seed=seed)
        gates.append(model.model.layers[1].mlp.gate.weight.clone())
    assert torch.equal(gates[0], gates[1]) and not torch.equal(gates[0], gates[2])


# --- the full-size acceptance check -----------------------------------------------------------


@pytest.fixture(scope="module")
def full_size_routing():
    """Per-expert token counts of every MoE layer of the full-size dummy model, prefilling
    the bundled sample page in base mode after balance_router."""
    cfg = DeepSeekOCRConfig()
    # The dtype a run would pick here: bf16 where the CPU computes it natively, else fp32 (bf16
    # emulated on such a CPU would make this prefill of the full model take many minutes).
    model = weights.dummy_model(cfg, "cpu", choose_dtype("auto", torch.device("cpu")).dtype)
    base = load(["mode=base"]).model.mode
    views = preprocess.preprocess_image(pages.load_image(pages.SAMPLE_PAGE), base)
    assert views.tiles is None and views.image_tokens == 273
    ids = torch.tensor([build_input_ids(load_tokenizer(None), DEFAULT_PROMPT, views.image_tokens)])
    with torch.no_grad():
        sam = model.sam(views.global_view)
        embeds = model.layout(model.project(sam, model.clip(sam)), None, views.grid)
    routing.balance_router(model, ids, embeds)

    counts: dict[int, torch.Tensor] = {}

    def recorder(layer: int):
        def hook(experts: torch.Tensor) -> None:
            counts[layer] = torch.bincount(experts.flatten(), minlength=cfg.lm.n_routed_experts)

        return hook

    moes = model.moe_layers()
    for layer, moe in moes.items():
        moe.on_route = recorder(layer)
    with torch.no_grad():
        model.prefill(ids, embeds, model.new_cache(ids.shape[1]))
    for moe in moes.values():
        moe.on_route = None
    return cfg, ids.shape[1], counts


def test_full_size_dummy_routing_is_balanced_on_the_sample_page(full_size_routing):
    cfg, tokens, counts = full_size_routing
    lm = cfg.lm
    assert sorted(counts) == list(range(lm.first_k_dense_replace, lm.num_hidden_layers))
    mean = tokens * lm.num_experts_per_tok / lm.n_routed_experts
    for layer, c in counts.items():
        assert int(c.sum()) == tokens * lm.num_experts_per_tok, layer
        assert int(c.min()) > 0, f"layer {layer}: an expert got no tokens: {c.tolist()}"
        assert float(c.max()) <= MAX_OVER_MEAN * mean, f"layer {layer}: max {int(c.max())} vs mean {mean:.1f}"
    # The record built from these counts is consistent with the run.
    record = RoutingRecord(prefill=[tuple(counts[i].tolist()) for i in sorted(counts)])
    record.check(lm, tokens, decode_steps=0)


# --- RoutingRecord ------------------------------------------------------------------------------


def test_routing_record_accepts_consistent_counts(tiny_arch):
    lm = tiny_arch.lm  # 2 MoE layers, 8 experts, top-2
    # 5 prompt tokens x 2 = 10 assignments per layer: spread over all experts, then all to expert 7.
    prefill = [(2, 2, 1, 1, 1, 1, 1, 1), (0, 0, 0, 0, 0, 0, 0, 10)]
    # 2 decode steps, 1 token x 2 = 2 assignments per layer.
    decode = [
        [(0, 0, 0, 1, 1, 0, 0, 0), (1, 1, 0, 0, 0, 0, 0, 0)],
        [(0, 0, 0, 0, 0, 1, 1, 0), (0, 0, 0, 0, 0, 0, 1, 1)],
    ]
    RoutingRecord(prefill=prefill, decode=decode).check(lm, prompt_tokens=5, decode_steps=2)
    RoutingRecord(prefill=prefill).check(lm, prompt_tokens=5, decode_steps=7)  # decode not recorded


@pytest.mark.parametrize(
    ("prefill", "decode", "tokens", "steps", "match"),
    [
        ([[1] * 8, [1] * 8], (), 5, 0, "sum to 5 x 2"),  # 8 assignments, 10 expected
        ([[3, -1, 1, 1, 1, 1, 1, 1], [2] * 4 + [0] * 4], (), 4, 0, ">= 0"),
        ([[2] * 8], (), 8, 0, "2 MoE layers"),  # one layer missing
        ([[2] * 8 + [0], [2] * 8 + [0]], (), 8, 0, "8 expert counts"),  # too many experts
        ([[2] * 8, [2] * 8], [[[1, 1] + [0] * 6] * 2], 8, 2, "1 decode steps recorded"),
        ([[2] * 8, [2] * 8], [[[2, 1] + [0] * 6] * 2], 8, 1, "decode step 0"),
    ],
    ids=["bad-total", "negative", "layers", "experts", "steps", "decode-total"],
)
def test_routing_record_rejects_inconsistent_counts(tiny_arch, prefill, decode, tokens, steps, match):
    # The counts come from the run's own recorder: a mismatch is a bug, not a user's mistake.
    with pytest.raises(ValueError, match=match):
        RoutingRecord(prefill=prefill, decode=decode).check(tiny_arch.lm, tokens, steps)
