"""Calibration: the cache (hit, miss, software change, corrupt file), emulation flags, a real quick run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import subprocess

import pytest
import torch

from llm_perf_opt.hardware.calibration import (
    Calibration,
    cache_path,
    cached_calibration,
    calibrate,
    default_cache_dir,
    device_key,
    emulated_flags,
)

CPU = torch.device("cpu")


class CountingMeasure:
    """Stands in for `calibrate`: returns a fixed calibration for the current key, counts calls."""

    def __init__(self, make):
        self.make = make
        self.calls = 0

    def __call__(self, device):
        self.calls += 1
        return self.make(key=device_key(device), byte_s=1e9 * self.calls)


def test_second_call_reuses_the_cached_figures(tmp_path, fake_calibration):
    measure = CountingMeasure(fake_calibration)
    first = cached_calibration(CPU, tmp_path, measure=measure)
    second = cached_calibration(CPU, tmp_path, measure=measure)
    assert measure.calls == 1
    assert second == first
    assert cache_path(CPU, tmp_path).is_file()


def test_miss_measures_and_stores(tmp_path, fake_calibration):
    measure = CountingMeasure(fake_calibration)
    path = cache_path(CPU, tmp_path)
    assert not path.exists()
    result = cached_calibration(CPU, tmp_path, measure=measure)
    assert measure.calls == 1
    assert Calibration.from_json(json.loads(path.read_text())) == result


def test_refresh_measures_again(tmp_path, fake_calibration):
    measure = CountingMeasure(fake_calibration)
    cached_calibration(CPU, tmp_path, measure=measure)
    refreshed = cached_calibration(CPU, tmp_path, refresh=True, measure=measure)
    assert measure.calls == 2
    assert refreshed.byte_s == 2e9
    assert cached_calibration(CPU, tmp_path, measure=measure).byte_s == 2e9  # the new figures were stored


def test_a_software_change_is_a_miss(tmp_path, fake_calibration, monkeypatch):
    measure = CountingMeasure(fake_calibration)
    old = cached_calibration(CPU, tmp_path, measure=measure)
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    new = cached_calibration(CPU, tmp_path, measure=measure)
    assert measure.calls == 2
    assert "torch 99.0.0" in new.key and new.key != old.key
    assert len(list((tmp_path / "calibration").iterdir())) == 2  # the old entry stays for the old torch


def test_a_different_thread_count_is_another_key():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        other = device_key(CPU)
    finally:
        torch.set_num_threads(threads)
    assert other != device_key(CPU)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        b"\xff\xfe\x00garbage",
        "[1, 2, 3]",
        '{"device_type": "cpu"}',
    ],
)
def test_corrupt_file_is_measured_again_and_overwritten(tmp_path, fake_calibration, content):
    measure = CountingMeasure(fake_calibration)
    path = cache_path(CPU, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.warns(UserWarning, match="unreadable"):
        result = cached_calibration(CPU, tmp_path, measure=measure)
    assert measure.calls == 1
    assert Calibration.from_json(json.loads(path.read_text())) == result


def test_invalid_figures_in_the_file_are_measured_again(tmp_path, fake_calibration):
    measure = CountingMeasure(fake_calibration)
    path = cache_path(CPU, tmp_path)
    path.parent.mkdir(parents=True)
    bad = dataclasses.asdict(fake_calibration(byte_s=-1.0))
    path.write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="byte_s"):
        cached_calibration(CPU, tmp_path, measure=measure)
    assert measure.calls == 1


def test_a_file_with_another_key_is_not_reused(tmp_path, fake_calibration):
    measure = CountingMeasure(fake_calibration)
    path = cache_path(CPU, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dataclasses.asdict(fake_calibration(key="some other machine"))))
    assert cached_calibration(CPU, tmp_path, measure=measure).key == device_key(CPU)
    assert measure.calls == 1


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLM_PERF_OPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "llm_perf_opt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "llm_perf_opt"
    monkeypatch.setenv("LLM_PERF_OPT_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert cache_path(CPU).parent == tmp_path / "mine" / "calibration"


def test_emulation_is_a_rate_below_a_quarter_of_float32():
    # float32 100 GFLOP/s -> the threshold is 100 / 4 = 25 GFLOP/s
    flags = emulated_flags({"float32": 100e9, "bfloat16": 24.9e9, "float16": 25e9})
    assert flags == {"float32": False, "bfloat16": True, "float16": False}
    assert emulated_flags({"bfloat16": 1e9}) == {}


def test_calibrated_roof(fake_calibration):
    roof = fake_calibration().roof()
    assert roof.label == "calibrated"
    assert roof.peak("float32") == 123.4e9
    assert roof.byte_s == 30e9
    assert "Test CPU" in roof.source


def test_quick_cpu_calibration_gives_finite_positive_figures():
    result = calibrate("cpu", quick=True)
    assert set(result.flop_s) == {"bfloat16", "float16", "float32"}
    for rate in [*result.flop_s.values(), result.byte_s]:
        assert math.isfinite(rate) and rate > 0
    assert result.launch_overhead_s is None
    assert set(result.emulated) == set(result.flop_s) and result.emulated["float32"] is False
    assert set(result.matmul_sizes.values()) <= {128, 256}
    assert result.key == device_key(CPU)
    assert Calibration.from_json(json.loads(json.dumps(dataclasses.asdict(result)))) == result


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="int8"):
        calibrate("cpu", ("int8",), quick=True)


@contextlib.contextmanager
def read_only(folder):
    """The folder as a read-only bind mount (permission bits do not stop root); skips where
    mounting is not allowed."""
    try:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot bind-mount here (needs root and mount)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


def _unwritable_cache(kind, tmp_path):
    if kind == "a file in the cache dir's place":
        (tmp_path / "calibration").write_text("not a folder\n")
        return contextlib.nullcontext(tmp_path)
    return read_only(tmp_path)


@pytest.mark.parametrize("kind", ["a file in the cache dir's place", "a read-only cache dir"])
def test_an_unwritable_cache_is_one_warning_and_the_figures_are_still_given(
    tmp_path, fake_calibration, caplog, kind
):
    measure = CountingMeasure(fake_calibration)
    with _unwritable_cache(kind, tmp_path) as folder, caplog.at_level("WARNING"):
        result = cached_calibration(CPU, folder, measure=measure)
        again = cached_calibration(CPU, folder, measure=measure)
        left = sorted(p.name for p in tmp_path.rglob("*"))
    assert result == fake_calibration(byte_s=1e9) and again.byte_s == 2e9  # measured, not cached
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert warnings[0].startswith("warning: the calibration cache cannot be written")
    assert "going on without it" in warnings[0]
    assert left == (["calibration"] if kind.startswith("a file") else [])  # no temporary file
