"""Shared fixtures: the reduced DeepSeek-OCR architecture of conf/model/deepseek_ocr_tiny.yaml,
composed through Hydra like any run."""

from __future__ import annotations

import os

import pytest
import torch

from llm_perf_opt.config import load
from llm_perf_opt.models.deepseek_ocr.config import DeepSeekOCRConfig


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """Hardware calibrations of this test session go to a temporary cache (subprocesses inherit it),
    never into the user's cache."""
    folder = tmp_path_factory.mktemp("calibration-cache")
    previous = os.environ.get("LLM_PERF_OPT_CACHE")
    os.environ["LLM_PERF_OPT_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["LLM_PERF_OPT_CACHE"]
    else:
        os.environ["LLM_PERF_OPT_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_arch() -> DeepSeekOCRConfig:
    """Same structure and code paths as the official model, with small widths and depths."""
    return load(["model=deepseek_ocr_tiny"]).model.arch


@pytest.fixture(scope="session")
def tiny_model(tiny_arch):
    """The tiny model with seeded dummy weights, float32, sdpa, on CPU.

    Shared by the whole session: tests must not modify it (deep-copy it first).
    """
    from llm_perf_opt.models.deepseek_ocr import weights

    return weights.dummy_model(tiny_arch, "cpu", torch.float32)
