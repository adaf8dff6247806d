"""DeepSeek-OCR-2's configs compose through Hydra beside DeepSeek-OCR's, with its own modes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import llm_perf_opt
from llm_perf_opt.config import load
from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr2.config import DeepSeekOCR2ModelConfig, Ocr2Mode, image_token_count

CONF = Path(llm_perf_opt.__file__).parent / "conf"


def test_the_full_model_composes_with_its_default_mode():
    model = load(["model=deepseek_ocr2"]).model
    assert isinstance(model, DeepSeekOCR2ModelConfig)
    assert model.mode == Ocr2Mode()  # no mode named: the config class's default
    assert (model.arch.text.hidden_size, model.arch.encoder.hidden_size) == (1280, 896)


def test_the_default_mode_is_the_base_mode_file():
    base = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(Ocr2Mode), OmegaConf.load(CONF / "ocr2_mode" / "base.yaml"))
    )
    assert base == Ocr2Mode()


def test_own_modes_and_the_shared_base_mode_compose():
    dynamic = load(["model=deepseek_ocr2", "+ocr2_mode=dynamic"]).model.mode
    assert (dynamic.base_size, dynamic.image_size, dynamic.crop_mode, dynamic.max_tiles) == (
        1024,
        768,
        True,
        6,
    )
    shared = load(["model=deepseek_ocr2", "mode=base"]).model.mode
    assert (shared.name, shared.global_size, shared.crop_mode) == ("base", 1024, False)
    assert load(["model=deepseek_ocr", "mode=base"]).model.mode.name == "base"


def test_a_view_size_without_learnt_queries_is_one_user_error():
    with pytest.raises(UserError, match="768 or 1024 pixels only, not 640") as info:
        load(["model=deepseek_ocr2", "mode=gundam"])
    assert "\n" not in str(info.value)


def test_tiny_keeps_the_structure_at_small_widths(tiny_cfg):
    full = load(["model=deepseek_ocr2"]).model.arch
    assert tiny_cfg.arch.text.num_hidden_layers < full.text.num_hidden_layers
    assert tiny_cfg.arch.sam.downsample_channels[-1] == tiny_cfg.arch.encoder.hidden_size
    assert dataclasses.asdict(tiny_cfg.mode) == dataclasses.asdict(Ocr2Mode())


def test_image_tokens_match_the_processor_formula():
    # 16x16 global queries + separator; with tiles, 12x12 per 768 tile.
    assert image_token_count(1024, 1024, 0) == 257
    assert image_token_count(1024, 768, 6) == 256 + 6 * 144 + 1
