"""Batched requests on the tiny model (CPU, fp32): pages of different sizes left-padded into one
batch must generate, sequence by sequence, the greedy tokens of their own batch-1 runs, with
the reference and with the fast implementation (its positioned decode over a static cache)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llm_perf_opt.config import load
from llm_perf_opt.models.deepseek_ocr.decoder import KVCache
from llm_perf_opt.models.interface import SessionOptions
from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

NEW_TOKENS = 5
#: Every path the fast implementation has a choice of, named: nothing is tuned in a test.
FAST_PATHS = (
    "model.paths.sam_attention=blocked",
    "model.paths.moe_prefill=grouped",
    "model.paths.moe_decode=grouped",
    "model.paths.decode=static",
    "model.paths.linear=split",
)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Three pages whose gundam tilings differ, so their prompts differ in length."""
    folder = tmp_path_factory.mktemp("pages")
    paths = []
    for i, (size, colour) in enumerate(
        (((800, 1000), (250, 250, 240)), ((1400, 600), (200, 230, 250)), ((640, 640), (255, 200, 200)))
    ):
        paths.append(folder / f"page{i}.png")
        Image.new("RGB", size, colour).save(paths[-1])
    return paths


def session_for(impl: str, stops_at_eos: bool = False) -> DeepSeekOCRSession:
    extra = FAST_PATHS if impl == "fast" else ()
    cfg = load(["model=deepseek_ocr_tiny", "mode=gundam", f"model.impl={impl}", *extra]).model
    session = DeepSeekOCRSession(
        cfg, SessionOptions(torch.device("cpu"), torch.float32, stops_at_eos=stops_at_eos)
    )
    session.load()  # seeded dummy weights: every session of the tests holds the same
    return session


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_each_sequence_of_a_padded_batch_generates_its_batch_1_tokens(pages, impl):
    session = session_for(impl)
    alone = [session.generate(session.prepare(page, DEFAULT_PROMPT), NEW_TOKENS).tokens for page in pages]
    batch = session.prepare_batch(pages, DEFAULT_PROMPT)
    lengths = [session.prepare(page, DEFAULT_PROMPT).prompt_tokens for page in pages]
    assert len(set(lengths)) == 3, "the pages must give prompts of different lengths"
    assert batch.pads == tuple(max(lengths) - n for n in lengths)
    result = session.generate(batch, NEW_TOKENS)
    assert result.tokens == alone
    assert result.lengths == (NEW_TOKENS,) * 3
    assert session.execution().cache_len == max(lengths) + NEW_TOKENS


def test_a_batch_stops_counting_a_sequence_at_its_eos(pages):
    session = session_for("reference")
    alone = [session.generate(session.prepare(page, DEFAULT_PROMPT), NEW_TOKENS).tokens for page in pages]
    # Dummy weights never emit the real EOS: take a token one sequence produces as its EOS.
    eos = alone[0][1]
    stopping = session_for("reference", stops_at_eos=True)
    stopping.tokenizer.eos_id = eos
    result = stopping.generate(stopping.prepare_batch(pages, DEFAULT_PROMPT), NEW_TOKENS)
    expected = [row.index(eos) + 1 if eos in row else NEW_TOKENS for row in alone]
    assert result.lengths == tuple(expected)
    assert result.generated_tokens == sum(expected)
    # Decoding ends once every sequence has stopped, or after max_new_tokens.
    assert result.steps == max(expected) - 1


def test_the_padding_bias_hides_padded_keys_and_keeps_the_causal_mask(tiny_arch):
    cache = KVCache(tiny_arch.lm, 4, 2, torch.float32, torch.device("cpu"), pads=(2, 0))
    allowed = cache.attention_bias(0, 3, torch.float32)[:, 0] == 0  # [B, 3 queries, 3 keys]
    assert allowed[0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert allowed[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # Positions start after each sequence's padding.
    assert cache.positions(0, 3).tolist() == [[0, 0, 0], [0, 1, 2]]
    assert cache.positions(3, 1).tolist() == [[1], [3]]
    # Without padding, the batch-1 path: no bias, shared positions.
    plain = KVCache(tiny_arch.lm, 4, 2, torch.float32, torch.device("cpu"), pads=(0, 0))
    assert plain.attention_bias(0, 3, torch.float32) is None and plain.positions(0, 2).tolist() == [0, 1]
