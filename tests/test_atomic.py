"""Atomic artifact writers."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import errno
import json
import math
import multiprocessing
import os
import resource
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llm_perf_opt import atomic
from llm_perf_opt.atomic import atomic_path, write_csv, write_json, write_text


@dataclasses.dataclass
class Result:
    stage: str
    ms: float
    shape: tuple


class Basis(enum.Enum):
    DEVICE = "device"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_json_serialises_project_types(tmp_path):
    obj = {
        "np_float": np.float32(1.5),
        "np_int": np.int64(7),
        "np_array": np.array([1.0, np.nan]),
        "tensor_scalar": torch.tensor(2.5),
        "tensor": torch.tensor([[1, 2]]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "path": Path("/tmp/x"),
        "basis": Basis.DEVICE,
        "result": Result("prefill", float("nan"), (1, 2)),
        "nan": float("nan"),
        "inf": [float("inf"), -math.inf, np.float64("nan")],
    }
    path = write_json(tmp_path / "sub" / "result.json", obj)
    assert path == tmp_path / "sub" / "result.json"
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "np_float": 1.5,
        "np_int": 7,
        "np_array": [1.0, None],
        "tensor_scalar": 2.5,
        "tensor": [[1, 2]],
        "dtype": "torch.bfloat16",
        "device": "cpu",
        "path": "/tmp/x",
        "basis": "device",
        "result": {"stage": "prefill", "ms": None, "shape": [1, 2]},
        "nan": None,
        "inf": [None, None, None],
    }


def test_write_json_rejects_unknown_types(tmp_path):
    with pytest.raises(TypeError, match="object"):
        write_json(tmp_path / "x.json", {"x": object()})
    assert _files(tmp_path) == []


def test_write_csv_round_trip(tmp_path):
    df = pd.DataFrame({"stage": ["prefill", "decode"], "busy_ms": [1.5, float("nan")]})
    back = pd.read_csv(write_csv(tmp_path / "stages.csv", df))
    pd.testing.assert_frame_equal(back, df)


def test_write_text_replaces_existing_file(tmp_path):
    path = tmp_path / "report.md"
    write_text(path, "old")
    write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert _files(tmp_path) == ["report.md"]


def test_new_file_gets_umask_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    mode = write_text(tmp_path / "a.txt", "x").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask


def test_failure_mid_csv_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "stages.csv"
    path.write_text("old,content\n")

    def half_written(self, f, **kwargs):
        f.write("stage,busy_ms\nprefill,")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_csv(path, pd.DataFrame({"stage": ["prefill"]}))
    assert path.read_text() == "old,content\n"
    assert _files(tmp_path) == ["stages.csv"]


def test_failure_before_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"run": 1})

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1}
    assert _files(tmp_path) == ["result.json"]


def test_atomic_path_keeps_suffix_and_cleans_up(tmp_path):
    with atomic_path(tmp_path / "trace.json.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("trace.json.gz")
        assert not tmp.exists()
        tmp.write_bytes(b"data")
    assert (tmp_path / "trace.json.gz").read_bytes() == b"data"

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "other.txt") as tmp:
        tmp.write_text("partial")
        raise RuntimeError
    assert _files(tmp_path) == ["trace.json.gz"]


def test_a_writer_that_makes_no_file_fails_and_its_staging_file_is_removed(tmp_path):
    # torch.profiler's exporter writes `<name>.tmp` and renames it; on a full disk it only logs,
    # leaving the staging file and no output.
    target = tmp_path / "trace.json"
    with pytest.raises(OSError) as info, atomic.atomic_path(target) as tmp:
        tmp.with_name(tmp.name + ".tmp").write_text('{"partial')
    assert info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def _write_past_the_limit(path):
    # In a child: a file-size limit of 4 KiB, then a 64 KiB artifact. Python ignores SIGXFSZ,
    # so the write fails with EFBIG instead of killing the process.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        atomic.write_text(path, "x" * 65536)
    except OSError as exc:
        return atomic.storage_fault(exc)
    return None


def test_the_file_size_limit_is_named_and_no_temp_file_is_left(tmp_path):
    target = tmp_path / "big.txt"
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        message = pool.submit(_write_past_the_limit, target).result(timeout=60)
    assert message == f"the file-size limit (ulimit -f: 4096 bytes) was reached writing {target}"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_named_and_other_errors_are_not_storage_faults():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run.json")
    assert atomic.storage_fault(full) == "the disk is full writing /data/run.json (No space left on device)"
    assert atomic.storage_fault(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert atomic.storage_fault(ValueError("no")) is None
