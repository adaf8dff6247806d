"""The session: stages opened from forward hooks and around prefill and each decode step,
greedy tokens, routing observed through the MoE gates."""

from __future__ import annotations

import dataclasses

import torch

from llm_perf_opt.config import load
from llm_perf_opt.models.deepseek_ocr2.session import DeepSeekOCR2Session
from llm_perf_opt.profiling.trackers import RoutingRecorder
from llm_perf_opt.runners.ranges import listening

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


class Heard:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def stage_entered(self, name: str) -> None:
        self.events.append(("enter", name))

    def stage_exited(self, name: str) -> None:
        self.events.append(("exit", name))


def dynamic_session(options) -> DeepSeekOCR2Session:
    cfg = load(["model=deepseek_ocr2_tiny", "+ocr2_mode=dynamic"]).model
    return DeepSeekOCR2Session(cfg, options)


def test_stages_open_in_order_and_close_before_the_next(tiny_session, options, wide_page):
    session = dynamic_session(options)
    session.load()
    heard = Heard()
    with listening(heard):
        request = session.prepare(wide_page, PROMPT)
        session.generate(request, 3)
    assert request.views.tiles == 2 and request.views.grid == (2, 1)
    entered = [name for kind, name in heard.events if kind == "enter"]
    # the global view, then the two tiles as one batch; two decode steps for three tokens
    assert entered == [
        "preprocess",
        "sam",
        "vision",
        "projector",
        "sam",
        "vision",
        "projector",
        "prefill",
        "decode",
        "decode",
    ]
    # strictly one range at a time: every entry is followed by its own exit
    assert all(heard.events[i] == ("exit", heard.events[i - 1][1]) for i in range(1, len(heard.events), 2))
    sam = session.model.model.vision_tower.sam_encoder
    assert not sam._forward_pre_hooks and not sam._forward_hooks  # hooks detached after the call


def test_greedy_tokens_are_deterministic(tiny_cfg, tiny_session, options):
    request = tiny_session.prepare(None, PROMPT)
    first = tiny_session.generate(request, 5).tokens
    assert len(first) == 5
    assert tiny_session.generate(request, 5).tokens == first
    again = DeepSeekOCR2Session(tiny_cfg, options)
    again.load()
    assert again.generate(again.prepare(None, PROMPT), 5).tokens == first


def test_the_request_counts_image_and_text_tokens(tiny_session):
    request = tiny_session.prepare(None, PROMPT)
    ids = request.input_ids[0].tolist()
    assert request.views.image_tokens == 257  # base mode: 16 x 16 queries + the separator
    assert ids.count(tiny_session.hf_config.image_token_id) == 257
    assert request.describe()["tokens"] == {"image": 257, "text": len(ids) - 257, "prompt": len(ids)}
    assert request.describe()["tokenizer"] == "builtin"


def test_routing_is_recorded_per_stage_call(tiny_session):
    request = tiny_session.prepare(None, PROMPT)
    text = tiny_session.hf_config.text_config
    with RoutingRecorder(tiny_session.routed_layers()) as recorder:
        tiny_session.generate(request, 3)
    moe_layers = text.mlp_layer_types.count("sparse")
    assert sorted(recorder.counts) == ["decode", "prefill"]
    assert len(recorder.counts["prefill"]) == 1 and len(recorder.counts["decode"]) == 2
    (prefill,) = recorder.counts["prefill"]
    assert len(prefill) == moe_layers
    assert all(sum(layer) == request.prompt_tokens * text.num_experts_per_tok for layer in prefill)
    assert all(sum(layer) == text.num_experts_per_tok for step in recorder.counts["decode"] for layer in step)
    assert all(layer.on_route is None for layer in tiny_session.routed_layers())


def test_module_stages_cover_every_parameter(tiny_session):
    prefixes = tiny_session.module_stages()
    names = [n for n, _ in tiny_session.meta_module().named_parameters()]
    assert all(any(n == p or n.startswith(p + ".") for p in prefixes) for n in names)
    assert dataclasses.asdict(tiny_session.execution())["attn_impl"] == "sdpa"


def test_rotary_tables_are_computed_not_left_uninitialised(tiny_session):
    text = tiny_session.hf_config.text_config
    rotary = tiny_session.model.model.language_model.rotary_emb
    d = text.head_dim
    expected = 1.0 / (text.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    assert torch.equal(rotary.inv_freq, expected) and torch.equal(rotary.original_inv_freq, expected)
