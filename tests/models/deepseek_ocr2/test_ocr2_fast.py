"""model.impl=fast against the reference (transformers' code as it is) on the tiny model: same
image features, prefill logits and greedy tokens within fp32 rounding; the same FLOPs, fewer
SAM and decode bytes; tiles of whole grid rows."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr2 import fast
from llm_perf_opt.models.deepseek_ocr2.analytic import DeepSeekOCR2Analytic
from llm_perf_opt.models.deepseek_ocr2.session import DeepSeekOCR2Session, StagedRun

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


def tiny(impl: str, *mode: str):
    return load(["model=deepseek_ocr2_tiny", f"model.impl={impl}", *mode]).model


def loaded(cfg, options) -> DeepSeekOCR2Session:
    """The session with SAM's relative-position tables drawn at random: dummy weights leave them
    zero (as transformers initialises them), which would hide any misplaced bias term."""
    session = DeepSeekOCR2Session(cfg, options)
    session.load()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in session.model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                param.copy_(torch.randn(param.shape, generator=gen))
    return session


def outputs(session: DeepSeekOCR2Session, image=None):
    """Image features, prefill logits of the last position, and 6 greedy tokens."""
    request = session.prepare(image, PROMPT)
    with torch.inference_mode():
        encoded = StagedRun(session.model).encode_images(request.views)
        logits = session.model(
            input_ids=request.input_ids, mm_encoder_outputs={"image": encoded}, logits_to_keep=1
        ).logits[0, -1]
    return encoded.pooler_output[0], logits, session.generate(request, 6).tokens


@pytest.mark.parametrize("tile", [fast.BIAS_TILE_ELEMENTS, 1 << 21], ids=["one-tile", "8-tiles"])
def test_fast_matches_the_reference(options, monkeypatch, tile):
    reference = outputs(loaded(tiny("reference"), options))
    monkeypatch.setattr(fast, "BIAS_TILE_ELEMENTS", tile)  # 2^21: the global block in 8 tiles of 8 rows
    features, logits, tokens = outputs(loaded(tiny("fast"), options))
    torch.testing.assert_close(features, reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, reference[1], rtol=1e-4, atol=1e-4)
    assert tokens == reference[2]


def test_fast_matches_the_reference_with_tiles(options, wide_page, monkeypatch):
    """Mode dynamic: the tiles go through SAM as one batch of 2 (windowed blocks: 2 x 25 windows)."""
    reference = outputs(loaded(tiny("reference", "+ocr2_mode=dynamic"), options), wide_page)
    monkeypatch.setattr(fast, "BIAS_TILE_ELEMENTS", 1 << 21)
    features, logits, tokens = outputs(loaded(tiny("fast", "+ocr2_mode=dynamic"), options), wide_page)
    torch.testing.assert_close(features, reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, reference[1], rtol=1e-4, atol=1e-4)
    assert tokens == reference[2]


def test_only_the_sam_forwards_are_replaced(options):
    session = loaded(tiny("fast"), options)
    replaced = {type(m).__name__ for m in session.model.modules() if "forward" in vars(m)}
    assert replaced == {fast.SAM_ATTENTION, fast.SAM_MLP, fast.EXPERTS}
    execution = session.execution().as_dict()
    assert execution["impl"] == "fast"
    assert execution["notes"][1:] == [fast.DESCRIPTIONS[kind] for kind in session.execution().replaced]
    assert set(session.execution().replaced) == replaced


def test_eager_attention_keeps_transformers_sam_attention(options):
    """model.attn_impl=eager builds another SAM attention class, which fast.py leaves alone."""
    session = DeepSeekOCR2Session(
        load(["model=deepseek_ocr2_tiny", "model.impl=fast", "model.attn_impl=eager"]).model, options
    )
    session.load()
    assert fast.SAM_ATTENTION not in session.execution().replaced


def test_fast_counts_the_same_flops_and_fewer_sam_bytes(options):
    request = DeepSeekOCR2Session(tiny("reference"), options).prepare(None, PROMPT)
    ref = DeepSeekOCR2Analytic(tiny("reference")).stage_model(request, 3, "float32", None).stages
    fst = DeepSeekOCR2Analytic(tiny("fast")).stage_model(request, 3, "float32", None).stages
    assert {s: w.flops for s, w in fst.items()} == {s: w.flops for s, w in ref.items()}
    # the reference writes the whole bias, then copies it (read + write) into SDPA's layout;
    # here it is written once, straight into that layout: one bias fewer read and written
    grid = 1024 // 16
    bias_bytes = 2 * grid**4 * 4  # the tiny SAM's one global block: 2 heads x N x N, fp32
    assert ref["sam"].bytes - fst["sam"].bytes >= 2 * bias_bytes
    for stage in ("vision", "projector", "prefill"):
        assert fst[stage].bytes == ref[stage].bytes
    # decode: k experts' weights read either way, without the sort, gather and reorder
    assert fst["decode"].weight_bytes == ref["decode"].weight_bytes
    assert fst["decode"].bytes < ref["decode"].bytes


def test_an_unknown_impl_is_one_user_error():
    with pytest.raises(UserError, match="model.impl"):
        load(["model=deepseek_ocr2_tiny", "model.impl=turbo"])


def test_the_host_read_experts_are_installed_only_where_they_were_measured_to_win(options):
    """On CUDA each host read of the ids is a device sync, once per MoE layer per step: there the
    experts keep transformers' forward, the SAM forwards are still replaced."""
    assert fast.reads_ids_on_host(torch.device("cpu")) and fast.reads_ids_on_host(torch.device("meta"))
    assert not fast.reads_ids_on_host(torch.device("cuda", 0))
    session = loaded(tiny("reference"), options)
    assert set(fast.install_fast(session.model, torch.device("cuda", 0))) == {
        fast.SAM_ATTENTION,
        fast.SAM_MLP,
    }
    experts = [m for m in session.model.modules() if type(m).__name__ == fast.EXPERTS]
    assert experts and not any("forward" in vars(m) for m in experts)
