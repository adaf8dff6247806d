"""Composing the packaged conf/ with Hydra and validating it into a typed RunConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from hydra.core.config_store import ConfigStore

from hydra_plugins.llm_perf_opt_presets.presets import PACKAGED_DIR, is_packaged_conf
from llm_perf_opt.config import ModelConfig, RunConfig, compose, group_options, load, one_line, validate
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig, DeepSeekOCRModelConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_typed():
    run = load()
    assert isinstance(run, RunConfig)
    assert isinstance(run.model, DeepSeekOCRModelConfig)
    assert run.model.name == "deepseek_ocr" and run.model.weights == "dummy" and run.model.dummy_weights
    assert run.model.arch == DeepSeekOCRConfig()  # no YAML copy of the architecture: the dataclass defaults
    assert run.model.mode.name == "base"
    assert (run.device, run.dtype, run.max_new_tokens) == ("auto", "auto", 32)
    assert not run.stops_at_eos  # dummy weights decode the full budget
    p = run.profiling
    assert (p.warmup, p.repeats, p.trace, p.granularity) == (1, 3, True, "stage")


def test_config_groups_list_their_options():
    assert group_options("mode") == ["base", "gundam", "large", "small", "tiny"]
    assert group_options("model") == [
        "deepseek_ocr",
        "deepseek_ocr2",
        "deepseek_ocr2_tiny",
        "deepseek_ocr_tiny",
    ]


def test_the_mode_lands_in_the_model_config():
    cfg = compose(["mode=gundam"])
    assert cfg.model.mode.name == "gundam"
    assert "mode" not in cfg  # nested under the model it belongs to


def test_tiny_model_overrides_only_what_it_names():
    arch = load(["model=deepseek_ocr_tiny"]).model.arch
    assert (arch.sam.width, arch.sam.depth, arch.sam.global_attn_indexes) == (64, 4, (1, 3))
    assert arch.sam.downsample_channels == (64, 128)  # YAML lists become the dataclass's tuples
    assert (arch.clip.width, arch.clip.layers) == (128, 2)
    assert (arch.lm.hidden_size, arch.lm.num_hidden_layers, arch.lm.n_routed_experts) == (128, 3, 8)
    # Everything not overridden keeps the official value (same code path, same tokenizer).
    assert arch.lm.vocab_size == 129280 and arch.sam.window_size == 14


def test_architecture_fields_are_typed_overrides():
    arch = load(["model.arch.lm.num_hidden_layers=2", "model.arch.sam.global_attn_indexes=[1,3]"]).model.arch
    assert arch.lm.num_hidden_layers == 2
    assert arch.sam.global_attn_indexes == (1, 3)


def test_quick_profiling_and_overrides():
    run = load(
        [
            "profiling=quick",
            "max_new_tokens=4",
            "dtype=float32",
            "profiling.granularity=module",
            "image=/some/page.png",
            "ignore_eos=false",
        ]
    )
    assert (run.profiling.warmup, run.profiling.repeats) == (1, 1)
    assert (run.max_new_tokens, run.dtype, run.profiling.granularity) == (4, "float32", "module")
    assert run.image == "/some/page.png"
    assert run.stops_at_eos


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("mode=huge", ["mode/huge", "base, gundam, large, small, tiny"]),
        ("model=gpt5", ["model/gpt5", "deepseek_ocr, deepseek_ocr2, deepseek_ocr2_tiny, deepseek_ocr_tiny"]),
        ("max_new_tokens=abc", ["max_new_tokens", "Integer"]),
        ("profiling.trace=maybe", ["profiling.trace", "not a valid bool"]),
        ("model.arch.sam.foo=1", ["model.arch.sam.foo", "SamConfig"]),
        ("dtype=float8", ["dtype", "auto, bfloat16, float16, float32"]),
        ("model.attn_impl=foo", ["model.attn_impl", "sdpa"]),
        ("max_new_tokens=0", ["max_new_tokens must be >= 1"]),
        ("profiling.repeats=0", ["profiling.repeats must be >= 1"]),
        ("profiling.granularity=foo", ["profiling.granularity"]),
        ("model.arch.clip.width=512", ["SAM output channels", "CLIP width"]),
        ("+model.arch.lm.no_such_field=1", ["unknown key", "model.arch.lm.no_such_field"]),
        ("+profiling.typo=3", ["unknown key", "profiling.typo"]),
        ("profiling.until_cv=5", ["profiling.until_cv must be between 0 and 1", "got 5.0"]),
        ("profiling.until_cv=0", ["profiling.until_cv must be between 0 and 1"]),
    ],
)
def test_mistakes_are_one_line_user_errors(override, fragments):
    with pytest.raises(UserError) as info:
        load([override])
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_one_line_keeps_the_cause_of_a_hydra_error():
    try:
        compose(["max_new_tokens=abc"])
    except UserError as exc:
        assert str(exc).startswith("Error merging override max_new_tokens=abc: ")
    cause = ValueError("first\nsecond")
    outer = RuntimeError("outer.")
    outer.__cause__ = cause
    assert one_line(outer) == "outer: first"


def test_validate_is_where_post_init_checks_run():
    cfg = compose(["profiling.repeats=0"])  # composing accepts it: the type is right
    with pytest.raises(UserError, match="profiling.repeats"):
        validate(cfg)


def test_the_default_mode_is_the_base_option():
    """Without `mode=...` a DeepSeek-OCR run gets conf/mode/base.yaml, the same values as asking for it."""
    assert load().model.mode == load(["mode=base"]).model.mode


@dataclass
class _ModelWithoutModes(ModelConfig):
    session: ClassVar[str] = "unused.Session"
    analytic: ClassVar[str] = "unused.Analytic"


@pytest.fixture
def model_without_modes():
    store = ConfigStore.instance()
    store.store(group="model", name="without_modes", node=_ModelWithoutModes(name="without_modes"))
    yield
    del store.repo["model"]["without_modes.yaml"]


def test_a_model_without_resolution_modes_composes(model_without_modes):
    """The root config names no mode: a model that has none composes with no `~mode`."""
    run = load(["model=without_modes"])
    assert isinstance(run.model, _ModelWithoutModes) and not hasattr(run.model, "mode")
    with pytest.raises(UserError, match="mode"):  # its config has no place for one
        load(["model=without_modes", "mode=gundam"])


PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_the_checkout_presets_are_on_the_search_path(monkeypatch):
    monkeypatch.chdir(REPO)
    assert PRESETS == ["gpu", "nightly_cpu", "nightly_gpu", "throughput"]
    assert group_options("experiment") == PRESETS
    cfg = compose(["+experiment=nightly_cpu"], return_hydra_config=True)
    assert (cfg.model.name, cfg.device, cfg.profiling.repeats) == ("deepseek_ocr_tiny", "cpu", 5)
    assert cfg.hydra.sweeper.params == {"mode": "tiny,small,base,large,gundam"}
    gpu = load(["+experiment=gpu", "mode=gundam"])
    assert (gpu.model.name, gpu.device, gpu.dtype, gpu.model.mode.name) == (
        "deepseek_ocr",
        "cuda",
        "bfloat16",
        "gundam",
    )
    batches = compose(["+experiment=throughput", "model=deepseek_ocr_tiny"], return_hydra_config=True)
    assert (
        batches.hydra.sweeper.params == {"mode": "tiny", "batch_size": "1,2,4,8,16,32"}
        and batches.model.name == "deepseek_ocr_tiny"
    )


def test_without_a_conf_dir_there_are_no_presets_and_no_warning(monkeypatch, tmp_path, recwarn):
    monkeypatch.chdir(tmp_path)
    assert group_options("experiment") == []
    assert load().model.name == "deepseek_ocr"
    assert not [w for w in recwarn if "search" in str(w.message).lower()]


def test_the_presets_plugin_recognises_only_the_packaged_config():
    assert is_packaged_conf("pkg://llm_perf_opt.conf")
    assert is_packaged_conf(str(PACKAGED_DIR)) and is_packaged_conf(f"file://{PACKAGED_DIR}")
    assert not is_packaged_conf("pkg://some_other_app.conf") and not is_packaged_conf("/some/other/app/conf")


def test_until_cv_needs_room_beyond_the_repeats():
    run = load(["profiling.until_cv=0.05"])
    assert (run.profiling.until_cv, run.profiling.max_repeats) == (0.05, 20)
    with pytest.raises(UserError, match="profiling.max_repeats must be >= 5"):
        load(["profiling.until_cv=0.05", "profiling.repeats=5", "profiling.max_repeats=4"])
    assert (
        load(["profiling.repeats=5", "profiling.max_repeats=4"]).profiling.until_cv is None
    )  # unused without it


def test_models_resolve_from_the_source_tree_without_package_metadata(monkeypatch):
    """A bare copy of the tree (src/ on sys.path, no pip install) has no entry points: the
    models come from its pyproject.toml."""
    import llm_perf_opt.config as config

    monkeypatch.setattr(config, "entry_points", lambda group: [])
    from llm_perf_opt.models.deepseek_ocr2.config import DeepSeekOCR2ModelConfig

    assert config.model_schemas() == {
        "deepseek_ocr": DeepSeekOCRModelConfig,
        "deepseek_ocr2": DeepSeekOCR2ModelConfig,
    }
    assert isinstance(load(["model=deepseek_ocr2"]).model, DeepSeekOCR2ModelConfig)


def test_without_metadata_or_a_source_tree_no_model_is_found(monkeypatch, tmp_path):
    import llm_perf_opt.config as config

    monkeypatch.setattr(config, "entry_points", lambda group: [])
    assert config.model_schemas(tmp_path / "pyproject.toml") == {}
