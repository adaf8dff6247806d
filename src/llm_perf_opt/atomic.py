"""Atomic artifact writers: a reader sees either the old file or the complete new one.

Each writer writes a fresh temporary file in the destination folder (same file system, so
``os.replace`` is an atomic rename) and renames it over the destination only after the
write succeeded. An interrupted or failed write leaves the previous artifact untouched and
removes its temporary file.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import math
import os
import resource
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd
import torch


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an unused temporary path next to ``path``; move it onto ``path`` if the block succeeds.

    The block must create the file at the yielded path (any writer will do, e.g. a profiler's
    exporter). Missing parent folders are created. On any exception the temporary file is
    removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique name instead of tempfile.mkstemp: mkstemp creates the file with mode 0600,
    # whereas opening a new name lets the artifact get the usual umask-derived permissions.
    # The name keeps the target's suffix because some writers act on it (".json.gz" is
    # gzipped by torch.profiler's exporter).
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
    try:
        yield tmp
        if not tmp.exists():
            # A writer that reports no error of its own (torch.profiler's exporter only logs
            # one) and left no file: a full disk or a file-size limit, most likely; say which.
            raise _unwritten(target)
        os.replace(tmp, target)
    except BaseException as exc:
        # The writer's own staging files too (the exporter writes `<name>.tmp`, then renames):
        # the unique prefix makes every file that starts with it ours.
        for staged in target.parent.glob(f"{tmp.name}*"):
            staged.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno and exc.filename is None:  # write() names no file
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise


#: What a write fails with for want of room: the disk (or quota) full, or the file-size limit.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_fault(exc: BaseException) -> str | None:
    """One line for a write that failed for want of room (`error: ...` material), else None."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    if exc.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        shown = f"{limit} bytes" if limit != resource.RLIM_INFINITY else "the file system's"
        return f"the file-size limit (ulimit -f: {shown}) was reached{where}"
    return f"the disk is full{where} ({exc.strerror})"


def _unwritten(target: Path) -> OSError:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        code = errno.EFBIG
    elif shutil.disk_usage(target.parent).free == 0:
        code = errno.ENOSPC
    else:
        code = errno.EIO
    return OSError(code, f"{os.strerror(code)} (the writer made no file)", str(target))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
        _flush_to_disk(f)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; return the path.

    Besides plain JSON types this serialises numpy and torch scalars/arrays (as numbers and
    lists), torch dtypes and devices (as strings), paths (as strings), enums (as their
    values) and dataclass instances (as objects). NaN and infinities become ``null``, so the
    output is strict JSON that any parser accepts.
    """
    text = json.dumps(_finite(obj), default=_to_json, allow_nan=False, indent=2)
    return write_text(path, text + "\n")


def write_csv(path: str | os.PathLike[str], df: pd.DataFrame, *, index: bool = False) -> Path:
    """Write ``df`` as CSV to ``path`` atomically (without the index unless asked); return the path."""
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8", newline="") as f:
        df.to_csv(f, index=index)
        _flush_to_disk(f)
    return Path(path)


def _flush_to_disk(f: Any) -> None:
    # Without fsync a crash shortly after the rename can leave an empty file under the new name.
    f.flush()
    os.fsync(f.fileno())


def _finite(obj: Any) -> Any:
    """Copy of ``obj`` with non-finite floats replaced by ``None`` in dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def _to_json(obj: Any) -> Any:
    """``json.dumps`` hook for the non-JSON types this project writes."""
    # The hook's result is encoded as is, so it must be cleaned of NaN here as well.
    if isinstance(obj, (np.generic, np.ndarray, torch.Tensor)):
        return _finite(obj.tolist())
    if isinstance(obj, (torch.dtype, torch.device, PurePath)):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return _finite(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _finite(dataclasses.asdict(obj))
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r:.80}")
