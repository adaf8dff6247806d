"""Does the run fit? Memory this process may still use, and a one-line refusal when it does not.

Host memory available = min(MemAvailable, headroom of every memory cgroup above this process),
where a cgroup's headroom = limit - (usage - inactive_file). Inactive file pages are page cache
the kernel reclaims before it kills anything, like the cache MemAvailable already counts as
available; without subtracting them, reading a checkpoint would make the machine look full.
Device memory available on CUDA = the driver's free bytes for that device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.errors import UserError

PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; v2 writes "max".
NO_LIMIT = 2**62
GB = 1e9

# (limit file, usage file, inactive page-cache key in memory.stat) per cgroup version.
V2_FILES = ("memory.max", "memory.current", "inactive_file")
V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def meminfo_available_bytes(proc: Path = PROC) -> int | None:
    """MemAvailable from /proc/meminfo (given in kB, i.e. KiB), in bytes; None without it."""
    try:
        text = (proc / "meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "MemAvailable":
            return int(value.split()[0]) * 1024
    return None


def _own_cgroup_path(proc: Path, v1: bool) -> str:
    """This process's cgroup path from /proc/self/cgroup ("/" where the file is absent)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (v1 and "memory" in controllers.split(",")) or (not v1 and controllers == ""):
            return path
    return "/"


def _levels(mount: Path, path: str) -> list[Path]:
    """The cgroup folder of `path` and each ancestor up to the mount point.

    Without a cgroup namespace the path names the host's hierarchy, which the mount may not
    show; then only the mount point itself is read.
    """
    own = mount / path.strip("/")
    if not own.is_dir():
        return [mount]
    return [own, *(p for p in own.parents if p.is_relative_to(mount))]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _inactive_file(folder: Path, key: str) -> int:
    try:
        lines = (folder / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def cgroup_headroom_bytes(proc: Path = PROC, cgroup: Path = CGROUP) -> int | None:
    """Smallest limit - (usage - inactive_file) over this process's memory cgroups; None if unlimited."""
    if (cgroup / "cgroup.controllers").is_file():
        mount, files = cgroup, V2_FILES
    elif (cgroup / "memory").is_dir():
        mount, files = cgroup / "memory", V1_FILES
    else:
        return None
    limit_file, usage_file, inactive_key = files
    headrooms = []
    for folder in _levels(mount, _own_cgroup_path(proc, v1=files is V1_FILES)):
        limit = _read_int(folder / limit_file)
        usage = _read_int(folder / usage_file)
        if limit is None or limit >= NO_LIMIT or usage is None:
            continue
        headrooms.append(max(0, limit - (usage - _inactive_file(folder, inactive_key))))
    return min(headrooms, default=None)


def available_host_bytes(proc: Path = PROC, cgroup: Path = CGROUP) -> int | None:
    """Host memory this process may still use; None where neither /proc nor a cgroup tells."""
    known = [v for v in (meminfo_available_bytes(proc), cgroup_headroom_bytes(proc, cgroup)) if v is not None]
    return min(known, default=None)


def available_memory_bytes(
    device: torch.device, *, proc: Path = PROC, cgroup: Path = CGROUP, cuda: Any = torch.cuda
) -> int | None:
    """Memory the model can still be placed in on `device`: the device's free memory on CUDA,
    host memory otherwise (None where it cannot be told). `cuda` is a parameter for tests."""
    if device.type == "cuda":
        free, _total = cuda.mem_get_info(device)
        return free
    return available_host_bytes(proc, cgroup)


def release_freed_memory() -> None:
    """Return the memory this process has freed, so that the next job of an in-process sweep
    sees it as available: the CUDA caching allocator's unused blocks (else `mem_get_info`, the
    next job's memory check, counts them as taken), where CUDA was used, and the host heap
    (glibc's `malloc_trim`; a no-op where libc has none)."""
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


def _gb(n: float) -> str:
    x = n / GB
    return f"{x:.1f}" if x >= 0.95 else f"{x:.2g}"


def check_fits(
    required_bytes: int,
    available_bytes: int,
    *,
    what: str,
    dtype_name: str,
    suggestions: list[str],
    breakdown: Mapping[str, int] | None = None,
) -> None:
    """Raise a one-line UserError when `required_bytes` exceeds `available_bytes`.

    `breakdown` ({label: bytes}, summing to `required_bytes`) names the parts in the message:
    "not enough memory for deepseek_ocr in float32: needs ~14.1 GB (13.3 GB weights + 0.8 GB
    largest transient), 9.8 GB available; try dtype=bfloat16 or model=deepseek_ocr_tiny".
    """
    if breakdown is not None and sum(breakdown.values()) != required_bytes:
        total = sum(breakdown.values())
        raise ValueError(f"breakdown sums to {total} B, not the required {required_bytes} B")
    if required_bytes <= available_bytes:
        return
    parts = f" ({' + '.join(f'{_gb(b)} GB {label}' for label, b in breakdown.items())})" if breakdown else ""
    advice = f"; try {' or '.join(suggestions)}" if suggestions else ""
    raise UserError(
        f"not enough memory for {what} in {dtype_name}: needs ~{_gb(required_bytes)} GB{parts}, "
        f"{_gb(available_bytes)} GB available{advice}"
    )


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors a prepared request holds (in dataclass fields, tuples, lists and
    dicts, at any depth): what its pixels and token ids take in memory."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(item) for item in obj)
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(item) for item in obj.values())
    return 0
