"""Fast paths chosen by measurement: the rule on given timings, and the whole choice on the
tiny model's real CPU tensors (every candidate timed, forced choices kept, cached per key)."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr import weights
from llm_perf_opt.models.deepseek_ocr.fast import tuning
from llm_perf_opt.models.deepseek_ocr.fast.paths import OPTIONS, FastPaths


def test_the_fastest_candidate_wins():
    assert tuning.pick({"split": 30.0, "plain": 20.0}, "plain") == "plain"
    assert tuning.pick({"split": 10.0, "plain": 20.0}, "plain") == "split"
    assert tuning.pick({"grouped": 5.0, "gathered": 4.0, "looped": 9.0}, "looped") == "gathered"


def test_a_tie_goes_to_the_reference_formulation():
    # 4 % faster is within the 5 % tie: not worth leaving the faithful formulation for.
    assert tuning.pick({"blocked/2^24": 96.0, "reference": 100.0}, "reference") == "reference"
    assert tuning.pick({"blocked/2^24": 94.0, "reference": 100.0}, "reference") == "blocked/2^24"
    # Without the reference among the candidates, the fastest wins however close.
    assert tuning.pick({"eager": 100.0, "static": 99.0}, None) == "static"


def test_nothing_timed_is_an_error():
    with pytest.raises(ValueError):
        tuning.pick({}, "plain")


def mode():
    return load(["model=deepseek_ocr_tiny", "mode=gundam"]).model.mode


@pytest.fixture(scope="module")
def fast_fp32(tiny_arch):
    return weights.dummy_model(tiny_arch, "cpu", torch.float32, impl="fast")


def test_every_candidate_is_timed_and_the_rule_picks_among_them(fast_fp32, tmp_path):
    tuned = tuning.tune_paths(fast_fp32, mode(), cache_dir=tmp_path)
    choices = {c.field: c for c in tuned.choices}
    assert set(choices) == set(OPTIONS)
    for field, choice in choices.items():
        assert choice.source == "measured"  # CPU fp32 has two candidates or more for each
        assert all(ms > 0 for ms in choice.times_ms.values())
        assert choice.chosen == tuning.pick(choice.times_ms, tuning.REFERENCE[field])
        # The reference's formulation is always a candidate.
        assert tuning.REFERENCE[field] in choice.times_ms
    assert set(choices["linear"].times_ms) == {"split", "plain"}
    assert set(choices["moe_decode"].times_ms) == {"one_by_one", "looped", "grouped", "gathered"}
    assert set(choices["decode"].times_ms) == {"eager", "static"}  # no CUDA graphs off CUDA
    assert fast_fp32.paths == tuned.paths  # left in place
    sam = choices["sam_attention"].chosen
    assert tuned.paths.sam_attention == sam.partition("/")[0]
    if sam.startswith("blocked/2^"):
        assert tuned.paths.bias_tile_elements == 2 ** int(sam.rpartition("^")[2])


def test_bf16_on_cpu_has_one_linear_formulation(tiny_arch, tmp_path):
    model = weights.dummy_model(tiny_arch, "cpu", torch.bfloat16, impl="fast")
    tuned = tuning.tune_paths(model, mode(), {"sam_attention": "blocked"}, cache_dir=tmp_path)
    linear = next(c for c in tuned.choices if c.field == "linear")
    assert (linear.chosen, linear.source, linear.times_ms) == ("plain", "only option", {})


def test_forced_choices_are_kept_untimed(fast_fp32, tmp_path):
    forced = {
        "linear": "split",
        "moe_decode": "gathered",
        "sam_attention": "folded",
        "decode": "static",
        "moe_prefill": "looped",
        "rows": "plain",
        "moe_batch": "grouped",
    }
    tuned = tuning.tune_paths(fast_fp32, mode(), forced, cache_dir=tmp_path)
    assert tuned.paths == FastPaths("folded", "looped", "gathered", "static", "split", "plain", "grouped")
    assert all(c.source == "forced" and not c.times_ms for c in tuned.choices)


def test_the_choice_is_cached_per_key_and_refreshed_on_request(fast_fp32, tmp_path, monkeypatch):
    first = tuning.tune_paths(fast_fp32, mode(), {"sam_attention": "blocked"}, cache_dir=tmp_path)
    assert not first.cached and first.cache_file is not None

    def no_measuring(*args):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(tuning, "_measure", no_measuring)
    again = tuning.tune_paths(fast_fp32, mode(), {"sam_attention": "blocked"}, cache_dir=tmp_path)
    assert again.cached and again.paths == first.paths and again.choices == first.choices
    # Another key (other forced choices, another dtype) or refresh: measured again.
    for call in (
        lambda: tuning.tune_paths(fast_fp32, mode(), {"sam_attention": "folded"}, cache_dir=tmp_path),
        lambda: tuning.tune_paths(
            fast_fp32, mode(), {"sam_attention": "blocked"}, cache_dir=tmp_path, refresh=True
        ),
    ):
        with pytest.raises(AssertionError, match="measured although cached"):
            call()


def test_an_unreadable_cache_is_measured_again(fast_fp32, tmp_path):
    first = tuning.tune_paths(fast_fp32, mode(), {"sam_attention": "blocked"}, cache_dir=tmp_path)
    with open(first.cache_file, "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        again = tuning.tune_paths(fast_fp32, mode(), {"sam_attention": "blocked"}, cache_dir=tmp_path)
    assert not again.cached


def test_paths_options_are_validated_at_start_up():
    assert load(["model.impl=fast", "model.paths.linear=plain"]).model.paths.forced() == {"linear": "plain"}
    with pytest.raises(UserError, match="model.paths.moe_decode='fastest' is not one of auto"):
        load(["model.impl=fast", "model.paths.moe_decode=fastest"])
