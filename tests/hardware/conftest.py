"""Shared fixtures of the hardware tests: a Calibration with chosen figures, no measuring."""

from __future__ import annotations

import pytest
import torch

from llm_perf_opt.hardware.calibration import Calibration, device_key


@pytest.fixture
def fake_calibration():
    """Factory: a CPU Calibration for the current key, with given figures."""

    def make(**overrides) -> Calibration:
        fields = dict(
            device_type="cpu",
            device_name="Test CPU",
            flop_s={"bfloat16": 300e9, "float16": 2e9, "float32": 123.4e9},
            byte_s=30e9,
            launch_overhead_s=None,
            emulated={"bfloat16": False, "float16": True, "float32": False},
            matmul_sizes={"bfloat16": 2048, "float16": 256, "float32": 2048},
            copy_bytes=256 << 20,
            key=device_key(torch.device("cpu")),
            measured_at="2025-01-01T00:00:00+00:00",
        )
        fields.update(overrides)
        return Calibration(**fields)

    return make
