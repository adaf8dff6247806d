"""Which formulation each fast module runs: chosen by device and dtype in one place, fixable for
checks, and followed by the modules and the session's record of the run."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.config import load
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.deepseek_ocr.fast import FastDeepSeekOCR
from llm_perf_opt.models.deepseek_ocr.fast.decoder import StaticKVCache
from llm_perf_opt.models.deepseek_ocr.fast.moe import FastMoE
from llm_perf_opt.models.deepseek_ocr.fast.paths import FastPaths, choose_paths
from llm_perf_opt.models.deepseek_ocr.fast.sam import FastSamAttention
from llm_perf_opt.models.interface import SessionOptions
from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession, Execution


def test_cpu_guesses_the_paths_measured_fastest_on_one_zen_4():
    for dtype in (torch.float32, torch.bfloat16):
        paths = choose_paths(torch.device("cpu"), dtype)
        assert (paths.sam_attention, paths.moe_prefill, paths.moe_decode, paths.decode, paths.linear) == (
            "blocked",
            "grouped",
            "one_by_one",
            "eager",
            "split",
        )


def test_meta_stands_in_for_a_gpu_with_the_grouped_kernel_in_bf16_only():
    bf16 = choose_paths(torch.device("meta"), torch.bfloat16)
    fp32 = choose_paths(torch.device("meta"), torch.float32)
    assert (bf16.sam_attention, bf16.moe_prefill, bf16.moe_decode, bf16.decode) == (
        "folded",
        "grouped",
        "grouped",
        "static",
    )
    # Without a sync-free grouped GEMM: gathered weights in decode, the reference loop in prefill.
    assert (fp32.moe_prefill, fp32.moe_decode) == ("looped", "gathered")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sam_attention", "dense"),
        ("moe_prefill", "one_by_one"),
        ("moe_decode", "loopy"),
        ("decode", "lazy"),
        ("linear", "fused"),
    ],
)
def test_an_unknown_path_is_refused(field, value):
    paths = {"sam_attention": "blocked", "moe_prefill": "grouped", "moe_decode": "grouped", "decode": "eager"}
    with pytest.raises(ValueError, match=field):
        FastPaths(**{**paths, field: value})


def test_fixed_paths_reach_every_fast_module_and_the_cache(tiny_arch):
    model = weights.dummy_model(tiny_arch, "cpu", torch.float32, impl="fast")
    assert model.paths == choose_paths(torch.device("cpu"), torch.float32)
    assert not isinstance(model.new_cache(8), StaticKVCache)
    fixed = FastPaths("folded", "looped", "gathered", "static", bias_tile_elements=123)
    model.use_paths(fixed)
    assert model.paths == fixed
    modules = [m for m in model.modules() if isinstance(m, (FastSamAttention, FastMoE))]
    assert modules and all(m.paths == fixed for m in modules)
    cache = model.new_cache(8)
    assert isinstance(cache, StaticKVCache) and cache.graph is None  # no CUDA graphs off CUDA
    model.use_paths(None)
    assert model.paths == choose_paths(torch.device("cpu"), torch.float32)


def test_fixed_cpu_paths_give_the_same_tokens_as_the_chosen_ones(tiny_arch):
    """The GPU's formulations (folded attention, gathered experts, static positioned decode) run
    on CPU too, and decode the same greedy tokens."""
    cfg = load(["model=deepseek_ocr_tiny", "mode=tiny", "model.impl=fast"]).model
    session = DeepSeekOCRSession(cfg, SessionOptions(torch.device("cpu"), torch.float32))
    session.load()
    request = session.prepare(None, DEFAULT_PROMPT)
    session.fit_dummy_weights(request)
    chosen = session.generate(request, 6).tokens
    assert isinstance(session.model, FastDeepSeekOCR)
    session.model.use_paths(FastPaths("folded", "looped", "gathered", "static"))
    assert session.generate(request, 6).tokens == chosen


def test_the_session_records_how_it_ran(tiny_arch):
    for impl in ("reference", "fast"):
        cfg = load(["model=deepseek_ocr_tiny", "mode=tiny", f"model.impl={impl}"]).model
        session = DeepSeekOCRSession(cfg, SessionOptions(torch.device("cpu"), torch.float32))
        session.load()
        request = session.prepare(None, DEFAULT_PROMPT)
        session.generate(request, 3)
        execution = session.execution()
        assert execution.impl == impl and execution.cache_len == request.prompt_tokens + 3
        record = execution.as_dict()
        if impl == "reference":
            assert execution.paths is None and record["paths"] is None
            assert "faithful" in execution.summary()
        else:
            # The paths measured fastest here at load, each choice with its candidates' times.
            assert execution.tuned is not None and execution.paths == execution.tuned.paths
            assert (
                record["paths"] == execution.paths.as_dict()
                and record["kv_cache_positions"] == execution.cache_len
            )
            fields = [c["field"] for c in record["path_choice"]["choices"]]
            assert sorted(fields) == [
                "decode",
                "linear",
                "moe_batch",
                "moe_decode",
                "moe_prefill",
                "rows",
                "sam_attention",
            ]
            assert len(record["notes"]) == 1 + len(fields)
            sam_words = {
                "reference": "with the reference's materialised bias",
                "blocked": "blocked over query tiles",
                "folded": "folded",
            }
            assert f"SAM attention {sam_words[execution.paths.sam_attention]}" in execution.summary()
            assert "one-token products" in execution.summary()


def test_the_record_of_a_gpu_run_says_what_its_trace_shows():
    execution = Execution("fast", FastPaths("folded", "grouped", "grouped", "graph"), 300)
    summary = execution.summary()
    assert "folded" in summary and "CUDA-graph replays over a static 300-position cache" in summary
    # Module ranges need forward hooks, which a replay does not fire: that trace decodes eagerly.
    assert "profiling.granularity=module" in summary and "reference's eager steps" in summary


def test_the_reference_formulations_of_each_choice_are_the_reference(tiny_arch):
    """Each choice's "reference" option runs the released code's way: SAM's materialised bias
    and the experts' loop give the reference model's values exactly; plain one-token products
    are F.linear itself."""
    cfg = load(["model=deepseek_ocr_tiny", "mode=tiny"]).model
    reference = weights.dummy_model(tiny_arch, "cpu", torch.float32, seed=3)
    fast = weights.dummy_model(tiny_arch, "cpu", torch.float32, seed=3, impl="fast")
    fast.use_paths(FastPaths("reference", "looped", "looped", "eager", "plain", "plain", "looped"))
    session = DeepSeekOCRSession(cfg, SessionOptions(torch.device("cpu"), torch.float32))
    pixels = session.prepare(None, DEFAULT_PROMPT).views.global_view
    with torch.inference_mode():
        assert torch.equal(fast.sam(pixels), reference.sam(pixels))
        ids = torch.randint(0, tiny_arch.lm.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
        ids[ids == tiny_arch.image_token_id] = 0
        no_image = torch.zeros(0, tiny_arch.lm.hidden_size)
        expected = reference.prefill(ids, no_image, reference.new_cache(12))
        fast_cache = fast.new_cache(12)
        assert torch.equal(fast.prefill(ids, no_image, fast_cache), expected)
        step = fast.decode_step(ids[:, :1], fast_cache)
        reference_cache = reference.new_cache(12)
        reference.prefill(ids, no_image, reference_cache)
        assert torch.equal(step, reference.decode_step(ids[:, :1], reference_cache))
