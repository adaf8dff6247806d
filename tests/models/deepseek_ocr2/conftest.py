"""Fixtures for DeepSeek-OCR-2: its entry point visible to this process and its children, the
reduced model of conf/model/deepseek_ocr2_tiny.yaml, and a small page that tiles 2x1."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import tomllib
import torch
from PIL import Image

from llm_perf_opt.config import MODEL_ENTRY_POINTS, load
from llm_perf_opt.models.interface import SessionOptions

ENTRY_POINT = "deepseek_ocr2"
PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


@pytest.fixture(scope="session", autouse=True)
def entry_point(tmp_path_factory):
    """The `deepseek_ocr2` entry point as pyproject.toml declares it, or None where installed.

    An install made before it existed (an older `pip install -e .`) lacks it; then a temporary
    distribution declaring just this entry point is put on this process's path (yielded, for
    the runs a test starts; the environment of other tests' runs is left alone).
    """
    if any(e.name == ENTRY_POINT for e in entry_points(group=MODEL_ENTRY_POINTS)):
        yield None
        return
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"][MODEL_ENTRY_POINTS]
    folder = tmp_path_factory.mktemp("entry-point")
    info = folder / "llm_perf_opt_deepseek_ocr2_test-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: llm-perf-opt-deepseek-ocr2-test\nVersion: 0.0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{MODEL_ENTRY_POINTS}]\n{ENTRY_POINT} = {declared[ENTRY_POINT]}\n"
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


TINY = ("model=deepseek_ocr2_tiny", "device=cpu", "dtype=float32")


@pytest.fixture(scope="session")
def tiny_cfg(entry_point):
    return load(list(TINY)).model


@pytest.fixture(scope="session")
def options() -> SessionOptions:
    return SessionOptions(torch.device("cpu"), torch.float32, seed=0)


@pytest.fixture(scope="session")
def wide_page(tmp_path_factory) -> Path:
    """A 1536x768 page: in mode dynamic, 2 columns x 1 row of 768 tiles."""
    path = tmp_path_factory.mktemp("ocr2-pages") / "wide.png"
    Image.new("RGB", (1536, 768), "white").save(path)
    return path


@pytest.fixture(scope="session")
def tiny_session(tiny_cfg, options):
    """The tiny model with seeded dummy weights, loaded once: tests must not modify it."""
    from llm_perf_opt.models.deepseek_ocr2.session import DeepSeekOCR2Session

    session = DeepSeekOCR2Session(tiny_cfg, options)
    session.load()
    return session
