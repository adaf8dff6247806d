"""DeepSeekOCRSession on the tiny architecture (CPU): the ModelSession interface, decoding,
stage ranges in a real torch.profiler trace, the context-window check, and loading a saved
checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.stages import DECODE
from llm_perf_opt.models.deepseek_ocr.weights import save_checkpoint
from llm_perf_opt.models.interface import SessionOptions
from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT
from llm_perf_opt.profiling.trackers import ModuleRanges, RoutingRecorder
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession
from llm_perf_opt.runners.ranges import is_range_name, stage_of

MAX_NEW_TOKENS = 3
EPS_US = 1.0  # slack for containment checks on trace timestamps (µs)
NAMES = DeepSeekOCRSession.stage_names()
CPU_FP32 = SessionOptions(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Behaviour, not speed: one intra-op thread keeps run times steady on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(*overrides: str):
    # mode=tiny: one 512×512 view, the fastest path through every stage.
    return load(["model=deepseek_ocr_tiny", "mode=tiny", *overrides]).model


@pytest.fixture(scope="module")
def session():
    s = DeepSeekOCRSession(tiny_config(), CPU_FP32)
    s.load()
    s.fit_dummy_weights(s.prepare(None, DEFAULT_PROMPT))
    return s


def run(session, max_new_tokens=MAX_NEW_TOKENS):
    return session.generate(session.prepare(None, DEFAULT_PROMPT), max_new_tokens)


def test_stages_are_declared_once_in_run_order():
    assert NAMES == ("preprocess", "sam", "clip", "projector", "prefill", "decode")
    assert [s.name for s in DeepSeekOCRSession.stages if s.per_step] == ["decode"]


def test_prepare_needs_no_weights_and_checks_the_context_window():
    s = DeepSeekOCRSession(tiny_config(), CPU_FP32)
    request = s.prepare(None, DEFAULT_PROMPT)  # no load(): preparing is host work
    # tiny mode: a 512x512 view is 8x8 tokens plus a newline per row and the separator.
    assert request.views.image_tokens == 8 * 9 + 1
    assert request.prompt_tokens == request.views.image_tokens + request.text_tokens
    window = s.arch.lm.max_position_embeddings
    s.check(request, window - request.prompt_tokens)
    with pytest.raises(UserError, match="context window") as err:
        s.check(request, window - request.prompt_tokens + 1)
    assert "\n" not in str(err.value)


def test_the_model_is_built_only_by_load():
    s = DeepSeekOCRSession(tiny_config(), CPU_FP32)
    with pytest.raises(RuntimeError, match="load"):
        _ = s.module


def traced_ranges(fn, tmp_path) -> list[dict]:
    """Run fn under torch.profiler, export the Chrome trace, return its stage-range events
    (user annotations named like stages) sorted by start time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    ranges = [
        e
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") == "user_annotation"
        and is_range_name(e.get("name", ""), NAMES)
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
    assert names == [s for s in NAMES if s != DECODE] + [DECODE] * decode_steps
    for before, after in zip(stages, stages[1:]):  # sequential, never overlapping
        assert float(before["ts"]) + float(before["dur"]) <= float(after["ts"]) + EPS_US
    assert len({(r["pid"], r["tid"]) for r in stages}) == 1


def test_generate_decodes_exactly_max_new_tokens(session):
    for n in (1, MAX_NEW_TOKENS):
        result = run(session, n)
        assert len(result.tokens) == n
        assert all(0 <= t < session.model.cfg.lm.vocab_size for t in result.tokens)
    # Dummy weights: the stop token never ends a run early.
    assert not session.options.stops_at_eos


def test_stage_ranges_in_a_profiler_trace(session, tmp_path):
    def one_request():
        request = session.prepare(None, DEFAULT_PROMPT)
        session.generate(request, MAX_NEW_TOKENS)

    ranges = traced_ranges(one_request, tmp_path)
    check_stage_sequence(ranges, MAX_NEW_TOKENS - 1)
    assert all("/" not in r["name"] for r in ranges)  # no module ranges attached: no nested ranges


def test_module_ranges_nest_family_ranges_in_their_stage(session, tmp_path):
    def one_request():
        request = session.prepare(None, DEFAULT_PROMPT)
        with ModuleRanges(session.module, session.module_families()):
            session.generate(request, MAX_NEW_TOKENS)

    ranges = traced_ranges(one_request, tmp_path)
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
    arch = session.arch
    assert sum(r["name"] == "prefill/attn" for r in nested) == arch.lm.num_hidden_layers
    assert sum(r["name"] == "prefill/moe" for r in nested) == len(session.routed_layers())
    assert sum(r["name"] == "sam/attn" for r in nested) == arch.sam.depth


def test_routing_is_recorded_per_stage_call(session):
    request = session.prepare(None, DEFAULT_PROMPT)
    layers = session.routed_layers()
    with RoutingRecorder(layers) as recorder:
        session.generate(request, MAX_NEW_TOKENS)
    lm = session.arch.lm
    k, experts = lm.num_experts_per_tok, lm.n_routed_experts
    # tiny: 3 layers, the first dense, so 2 routed layers.
    assert len(layers) == 2
    (prefill,) = recorder.counts["prefill"]
    assert [len(c) for c in prefill] == [experts, experts]
    assert [sum(c) for c in prefill] == [request.prompt_tokens * k] * 2
    assert len(recorder.counts["decode"]) == MAX_NEW_TOKENS - 1
    for step in recorder.counts["decode"]:
        assert [sum(c) for c in step] == [k, k]
    assert set(recorder.counts) == {"prefill", "decode"}
    # Balanced dummy routing: the prompt's tokens reach every expert.
    assert all(min(c) > 0 for c in prefill)


def test_a_saved_checkpoint_loads_and_gives_the_same_tokens(session, tmp_path):
    folder = save_checkpoint(session.model, tmp_path / "ckpt")
    loaded = DeepSeekOCRSession(tiny_config(f"model.weights={folder}"), CPU_FP32)
    loaded.load()
    assert loaded.arch == session.arch
    reference = session.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    # Same weights (the saved gates are the balanced ones): same tokens, and nothing is refitted.
    request = loaded.prepare(None, DEFAULT_PROMPT)
    loaded.fit_dummy_weights(request)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert loaded.generate(request, MAX_NEW_TOKENS).tokens == run(session).tokens


def test_a_missing_checkpoint_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        DeepSeekOCRSession(tiny_config(f"model.weights={tmp_path / 'nope'}"), CPU_FP32)


#: Every fast path named (nothing tuned), with a decode that graphs a step of one sequence.
GRAPH_PATHS = (
    "model.impl=fast",
    "model.paths.sam_attention=blocked",
    "model.paths.moe_prefill=grouped",
    "model.paths.moe_decode=gathered",
    "model.paths.moe_batch=looped",
    "model.paths.decode=graph",
    "model.paths.linear=split",
    "model.paths.rows=plain",
)


def test_the_decode_graph_is_captured_in_setup_outside_every_stage(monkeypatch):
    """The CUDA-graph decode's capture (eager warm-up steps, the capture, its first replay) is
    setup, not prefill: with no warm-up run it would otherwise land in the first timed TTFT.
    On CPU a stand-in graph logs the stage open at capture and at each replay, and replays by
    running the captured step eagerly."""
    from llm_perf_opt.models.deepseek_ocr.fast import model as fast_model
    from llm_perf_opt.profiling.passes import RunInputs, measure
    from llm_perf_opt.runners.ranges import current_stage

    log = []

    class LoggedGraph:
        def __init__(self, step, device):
            log.append(("capture", current_stage()))
            self.step = step

        def replay(self):
            log.append(("replay", current_stage()))
            return self.step()

    monkeypatch.setattr(fast_model, "DecodeGraph", LoggedGraph)
    monkeypatch.setattr(fast_model.FastDeepSeekOCR, "captures_graphs", lambda self, batch: True)
    session = DeepSeekOCRSession(tiny_config(*GRAPH_PATHS), CPU_FP32)
    session.load()
    m = measure(session, RunInputs((None,), DEFAULT_PROMPT, 4), warmup=0, repeats=2, trace_path=None)
    assert log[0] == ("capture", None)  # outside every stage range, before the first timed run
    assert log[1:] == [("replay", DECODE)] * 3 * 2  # 3 decode steps per run, no second capture
    assert len(m.runs) == 2 and all(run.decode_steps == 3 for run in m.runs)
