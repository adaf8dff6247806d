"""DeepSeekOCRSession on the tiny architecture (CPU): decoding, stage ranges in a real
torch.profiler trace, routing records, and loading a saved checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.config import load_mode
from llm_perf_opt.models.deepseek_ocr.routing import RoutingRecord
from llm_perf_opt.models.deepseek_ocr.weights import save_checkpoint
from llm_perf_opt.profiling.ranges import STAGES, is_range_name, stage_of
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

# tiny_arch comes from tests/conftest.py (conf/model/deepseek_ocr_tiny.yaml).
MAX_NEW_TOKENS = 3
EPS_US = 1.0  # slack for containment checks on trace timestamps (µs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Behaviour, not speed: one intra-op thread keeps run times steady on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mode():
    return load_mode("tiny")  # one 512×512 view: the fastest path through every stage


@pytest.fixture(scope="module")
def session(tiny_arch, mode):
    s = DeepSeekOCRSession.from_local(None, arch=tiny_arch, device="cpu")
    s.run(None, mode, max_new_tokens=2)  # balances the router, so later runs are plain runs
    return s


@pytest.fixture(scope="module")
def module_session(tiny_arch, mode):
    s = DeepSeekOCRSession.from_local(None, arch=tiny_arch, device="cpu", granularity="module")
    s.run(None, mode, max_new_tokens=2)
    return s


def traced_ranges(fn, tmp_path) -> list[dict]:
    """Run fn under torch.profiler, export the Chrome trace, return its stage-range events
    (user annotations named like stages) sorted by start time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    ranges = [
        e for e in events
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and is_range_name(e.get("name", ""))
    ]
    return sorted(ranges, key=lambda e: (float(e["ts"]), -float(e["dur"])))


def inside(inner: dict, outer: dict) -> bool:
    start, end = float(inner["ts"]), float(inner["ts"]) + float(inner["dur"])
    o_start, o_end = float(outer["ts"]), float(outer["ts"]) + float(outer["dur"])
    return o_start - EPS_US <= start and end <= o_end + EPS_US


def top_level(ranges: list[dict]) -> list[dict]:
    return [r for r in ranges if "/" not in r["name"]]


def check_stage_sequence(ranges: list[dict], decode_steps: int) -> None:
    stages = top_level(ranges)
    names = [r["name"] for r in stages]
    assert names == [s for s in STAGES if s != "decode"] + ["decode"] * decode_steps
    for before, after in zip(stages, stages[1:]):  # sequential, never overlapping
        assert float(before["ts"]) + float(before["dur"]) <= float(after["ts"]) + EPS_US
    assert len({(r["pid"], r["tid"]) for r in stages}) == 1


def test_run_decodes_exactly_max_new_tokens(session, mode):
    for n in (1, MAX_NEW_TOKENS):
        result = session.run(None, mode, max_new_tokens=n)
        assert len(result.tokens) == n
        assert all(0 <= t < session.model.cfg.lm.vocab_size for t in result.tokens)
    # Dummy weights: the stop token never ends a run early.
    assert session.dummy_weights and session.ignore_eos


def test_stage_ranges_in_a_profiler_trace(session, mode, tmp_path):
    ranges = traced_ranges(lambda: session.run(None, mode, max_new_tokens=MAX_NEW_TOKENS), tmp_path)
    check_stage_sequence(ranges, MAX_NEW_TOKENS - 1)
    assert all("/" not in r["name"] for r in ranges)  # granularity "stage": no nested ranges


def test_module_granularity_nests_family_ranges_in_their_stage(module_session, mode, tmp_path):
    ranges = traced_ranges(lambda: module_session.run(None, mode, max_new_tokens=MAX_NEW_TOKENS), tmp_path)
    check_stage_sequence(ranges, MAX_NEW_TOKENS - 1)
    stages = top_level(ranges)
    nested = [r for r in ranges if "/" in r["name"]]
    names = {r["name"] for r in nested}
    for expected in ("prefill/attn", "prefill/moe", "decode/lm_head", "sam/attn", "decode/attn", "clip/attn"):
        assert expected in names
    for r in nested:  # every nested range lies inside one range of its own stage
        assert any(s["name"] == stage_of(r["name"]) and inside(r, s) for s in stages), r["name"]
    # One lm_head per forward of the LM: prefill once, each decode step once.
    assert sum(r["name"] == "prefill/lm_head" for r in nested) == 1
    assert sum(r["name"] == "decode/lm_head" for r in nested) == MAX_NEW_TOKENS - 1
    layers = module_session.model.cfg.lm.num_hidden_layers
    moe_layers = len(module_session.model.moe_layers())
    assert sum(r["name"] == "prefill/attn" for r in nested) == layers
    assert sum(r["name"] == "prefill/moe" for r in nested) == moe_layers
    assert sum(r["name"] == "sam/attn" for r in nested) == module_session.model.cfg.sam.depth


def test_record_routing_counts_every_token_k_times(session, mode):
    request = session.prepare(None, mode)
    with session.record_routing() as recorder:
        session.run(None, mode, max_new_tokens=MAX_NEW_TOKENS)
    record = recorder.record
    assert isinstance(record, RoutingRecord)
    lm = session.model.cfg.lm
    k, experts = lm.num_experts_per_tok, lm.n_routed_experts
    moe_layers = len(session.model.moe_layers())
    assert moe_layers >= 1
    assert len(record.prefill) == moe_layers
    for counts in record.prefill:
        assert len(counts) == experts and min(counts) >= 0
        assert sum(counts) == request.prompt_tokens * k
    assert len(record.decode) == MAX_NEW_TOKENS - 1
    for step in record.decode:
        assert [sum(counts) for counts in step] == [k] * moe_layers
    record.check(lm, request.prompt_tokens, MAX_NEW_TOKENS - 1)
    # Balanced dummy routing: the prompt's tokens reach every expert.
    assert all(min(counts) > 0 for counts in record.prefill)
    # The hooks are gone after the block.
    assert all(moe.on_route is None for moe in session.model.moe_layers().values())


def test_from_local_loads_a_saved_checkpoint(session, mode, tmp_path):
    folder = save_checkpoint(session.model, tmp_path / "ckpt")
    loaded = DeepSeekOCRSession.from_local(folder, device="cpu", ignore_eos=True)
    assert not loaded.dummy_weights
    assert loaded.model.cfg == session.model.cfg
    reference = session.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    # Same weights (the saved gates are the balanced ones): same tokens, no re-balancing.
    expected = session.run(None, mode, max_new_tokens=MAX_NEW_TOKENS).tokens
    assert loaded.run(None, mode, max_new_tokens=MAX_NEW_TOKENS).tokens == expected
    assert loaded._balanced_for is None
    # A checkpoint stops at its stop token by default.
    assert DeepSeekOCRSession.from_local(folder, device="cpu").ignore_eos is False
