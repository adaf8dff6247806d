"""Composing conf/ with Hydra and validating it into Settings."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from llm_perf_opt.config import CONF_DIR, load_mode, mode_names, register_configs, resolve
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec

register_configs()

MODES = {
    "tiny": ModeSpec("tiny", 512, 512, False),
    "small": ModeSpec("small", 640, 640, False),
    "base": ModeSpec("base", 1024, 1024, False),
    "large": ModeSpec("large", 1280, 1280, False),
    "gundam": ModeSpec("gundam", 1024, 640, True, min_tiles=2, max_tiles=9),
}


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_the_mode_files_are_the_documented_modes():
    assert sorted(MODES) == mode_names()


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_mode_composes_and_resolves(name):
    settings = resolve(composed(f"mode={name}", "device=cpu"))
    assert settings.mode == MODES[name]
    assert load_mode(name) == MODES[name]


def test_defaults():
    settings = resolve(composed("device=cpu"))
    assert settings.model_name == "deepseek_ocr"
    assert settings.arch == DeepSeekOCRConfig()
    assert settings.mode.name == "base"
    assert settings.checkpoint is None and settings.ignore_eos is True
    assert settings.device == torch.device("cpu")
    assert settings.dtype == torch.bfloat16
    assert (settings.warmup, settings.repeats, settings.trace, settings.granularity) == (1, 3, True, "stage")


def test_tiny_model_gives_the_small_architecture():
    settings = resolve(composed("model=deepseek_ocr_tiny", "device=cpu"))
    arch = settings.arch
    assert settings.model_name == "deepseek_ocr_tiny"
    assert (arch.sam.width, arch.sam.depth, arch.sam.global_attn_indexes) == (64, 4, (1, 3))
    assert arch.sam.downsample_channels == (64, 128)
    assert (arch.clip.width, arch.clip.layers) == (128, 2)
    assert (arch.lm.hidden_size, arch.lm.num_hidden_layers, arch.lm.n_routed_experts) == (128, 3, 8)
    assert arch.lm.num_experts_per_tok == 2
    # Everything not overridden keeps the official value (same code path, same tokenizer).
    assert arch.lm.vocab_size == DeepSeekOCRConfig().lm.vocab_size


def test_quick_profiling_and_overrides():
    settings = resolve(composed("profiling=quick", "max_new_tokens=4", "dtype=float32", "device=cpu",
                                "profiling.granularity=module", "image=/some/page.png"))
    assert (settings.warmup, settings.repeats) == (1, 1)
    assert settings.max_new_tokens == 4
    assert settings.dtype == torch.float32
    assert settings.granularity == "module"
    assert str(settings.image) == "/some/page.png"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("dtype=float8", "dtype"),
        ("model.attn_impl=foo", "model.attn_impl"),
        ("max_new_tokens=0", "max_new_tokens"),
        ("profiling.repeats=0", "profiling.repeats"),
        ("profiling.granularity=foo", "profiling.granularity"),
        ("device=tpu", "tpu"),
    ],
)
def test_bad_values_are_one_line_user_errors(override, fragment):
    cfg = composed("device=cpu", override)
    with pytest.raises(UserError) as info:
        resolve(cfg)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA GPU") as info:
        resolve(composed("device=cuda"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override", ["max_new_tokens=abc", "profiling.repeats=many", "profiling.trace=maybe"])
def test_wrong_types_are_rejected_while_composing(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        composed(override)


def test_unknown_mode_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown mode 'huge'") as info:
        load_mode("huge")
    assert "gundam" in str(info.value)  # lists the known modes
