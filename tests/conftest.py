"""Shared fixtures: the reduced DeepSeek-OCR architecture of conf/model/deepseek_ocr_tiny.yaml."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from llm_perf_opt.config import CONF_DIR, build_arch
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig


@pytest.fixture(scope="session")
def tiny_arch() -> DeepSeekOCRConfig:
    """Same structure and code paths as the official model, with small widths and depths."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "deepseek_ocr_tiny.yaml")
    return build_arch(OmegaConf.to_container(cfg.arch))


@pytest.fixture(scope="session")
def tiny_model(tiny_arch):
    """The tiny model with seeded dummy weights, float32, sdpa, on CPU.

    Shared by the whole session: tests must not modify it (deep-copy it first).
    """
    from llm_perf_opt.models.deepseek_ocr import weights

    return weights.dummy_model(tiny_arch, "cpu", torch.float32)
