"""Calibrated ceilings: what this device reaches on a matmul and on a copy, cached per device and software.

What is measured (`calibrate`):

- matmul FLOP/s per dtype: square ``C = A @ B`` of size n, ``2 n^3`` FLOPs (2 per multiply-add)
  over the best of a few timed reps after one warm-up rep. n doubles from a small size up to
  the plan's largest (CUDA 8192, CPU 2048) while the next size is predicted (8x the current
  rep time) to fit the per-dtype time budget, so a dtype that the CPU only emulates stops at a
  small size instead of running for minutes. The rate is the best over the sizes tried.
- copy bandwidth: ``dst.copy_(src)`` of a buffer far larger than the caches;
  ``2 x nbytes`` (read + write) over the best rep.
- on CUDA, launch overhead: time per tiny kernel (an in-place add on one element) when many are
  launched back to back, i.e. max(host launch cost, device minimum kernel time): what a
  launch-bound stage pays per kernel.
- emulated dtypes: rate below 1/4 of float32's (a CPU without native bf16/fp16 matmul kernels
  runs them orders of magnitude slower than fp32).

Timing: CUDA events on the current stream of the given device; ``time.perf_counter`` on CPU.

The cache (`cached_calibration`) keeps one JSON file per key; the key names the device, the
torch and CUDA versions, the fp32 matmul precision and, on CPU, a hash of the CPU flags, the
kernel ISA torch dispatches to and the thread count. Any change gives a new key, so a stale
figure is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.atomic import write_json
from llm_perf_opt.hardware.ceilings import DTYPE_NAMES, Roof, cpu_flags, device_name, gpu_properties

#: A dtype whose matmul rate is below this fraction of float32's is reported as emulated.
EMULATION_RATIO = 0.25
CACHE_ENV = "LLM_PERF_OPT_CACHE"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Measured ceilings of one device (see the module docstring for the method)."""

    device_type: str  # "cpu" or "cuda"
    device_name: str
    flop_s: dict[str, float]  # achievable matmul FLOP/s per dtype name
    byte_s: float  # achievable copy bandwidth, read + write bytes per second
    launch_overhead_s: float | None  # seconds per back-to-back tiny kernel; None on CPU
    emulated: dict[str, bool]  # dtype name -> rate below EMULATION_RATIO x float32's
    matmul_sizes: dict[str, int]  # dtype name -> n of the best n^3 matmul
    copy_bytes: int  # size of the copied buffer
    key: str  # device and software fingerprint, see device_key
    measured_at: str  # ISO 8601, UTC

    def roof(self) -> Roof:
        """These figures as the "calibrated" roof."""
        return Roof(
            label="calibrated",
            flop_s=dict(self.flop_s),
            byte_s=self.byte_s,
            source=f"measured on {self.device_name} at {self.measured_at}",
        )

    @classmethod
    def from_json(cls, data: Any) -> Calibration:
        """A Calibration from `dataclasses.asdict` output; ValueError/TypeError if malformed."""
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(data) != expected:
            raise ValueError(f"fields differ from the expected ones: {sorted(set(data) ^ expected)}")
        for name in ("device_type", "device_name", "key", "measured_at"):
            _require(isinstance(data[name], str), name)
        _require(_is_rate_map(data["flop_s"]), "flop_s")
        _require(_is_positive(data["byte_s"]), "byte_s")
        launch = data["launch_overhead_s"]
        _require(launch is None or _is_positive(launch), "launch_overhead_s")
        _require(_is_map(data["emulated"], lambda v: isinstance(v, bool)), "emulated")
        _require(_is_map(data["matmul_sizes"], lambda v: isinstance(v, int) and v > 0), "matmul_sizes")
        _require(isinstance(data["copy_bytes"], int) and data["copy_bytes"] > 0, "copy_bytes")
        return cls(**data)


def _require(ok: bool, name: str) -> None:
    if not ok:
        raise ValueError(f"field {name!r} has an invalid value")


def _is_positive(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _is_map(value: Any, check: Callable[[Any], bool]) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


def _is_rate_map(value: Any) -> bool:
    return _is_map(value, _is_positive) and bool(value)


@dataclass(frozen=True)
class _Plan:
    sizes: tuple[int, ...]  # matmul n, tried in order
    reps: int  # timed reps per measurement, after one warm-up rep
    budget_s: float  # rough time allowed per dtype
    copy_bytes: int


_PLANS = {
    ("cuda", False): _Plan(sizes=(1024, 2048, 4096, 8192), reps=5, budget_s=2.0, copy_bytes=512 << 20),
    ("cuda", True): _Plan(sizes=(512, 1024), reps=3, budget_s=0.5, copy_bytes=64 << 20),
    ("cpu", False): _Plan(sizes=(256, 512, 1024, 2048), reps=3, budget_s=2.0, copy_bytes=256 << 20),
    ("cpu", True): _Plan(sizes=(128, 256), reps=2, budget_s=0.5, copy_bytes=8 << 20),
}
_LAUNCHES = 1000


def calibrate(
    device: str | torch.device, dtypes: Sequence[str] = DTYPE_NAMES, *, quick: bool = False
) -> Calibration:
    """Measure this device's achievable ceilings; ``quick`` uses small sizes (rough, for tests)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"calibration supports cpu and cuda devices, not {device.type!r}")
    unknown = set(dtypes) - set(DTYPE_NAMES)
    if unknown:
        raise ValueError(f"unknown dtype name(s) {sorted(unknown)}; use {', '.join(DTYPE_NAMES)}")
    plan = _PLANS[(device.type, quick)]
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else nullcontext():
        flop_s, sizes = {}, {}
        for name in dtypes:
            flop_s[name], sizes[name] = _matmul_rate(device, getattr(torch, name), plan)
        byte_s = _copy_rate(device, plan)
        launch = _launch_overhead_s(device) if cuda else None
    return Calibration(
        device_type=device.type,
        device_name=device_name(device),
        flop_s=flop_s,
        byte_s=byte_s,
        launch_overhead_s=launch,
        emulated=emulated_flags(flop_s),
        matmul_sizes=sizes,
        copy_bytes=plan.copy_bytes,
        key=device_key(device),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def emulated_flags(flop_s: dict[str, float]) -> dict[str, bool]:
    """Per dtype: rate < EMULATION_RATIO x the float32 rate. Empty when float32 was not measured."""
    reference = flop_s.get("float32")
    if reference is None:
        return {}
    return {name: rate < EMULATION_RATIO * reference for name, rate in flop_s.items()}


def _matmul_rate(device: torch.device, dtype: torch.dtype, plan: _Plan) -> tuple[float, int]:
    """(best FLOP/s, its n) over the plan's sizes, FLOPs = 2 n^3."""
    best_rate, best_n = 0.0, plan.sizes[0]
    for n in plan.sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        seconds = _best_time(partial(torch.matmul, a, b, out=out), device, plan.reps)
        rate = 2 * n**3 / seconds
        if rate > best_rate:
            best_rate, best_n = rate, n
        # The next size does 8x the work; stop when that would exceed the budget.
        if 8 * seconds * (plan.reps + 1) > plan.budget_s:
            break
    return best_rate, best_n


def _copy_rate(device: torch.device, plan: _Plan) -> float:
    """Best bytes/s of a large copy, counting the bytes read and the bytes written."""
    src = torch.ones(plan.copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _best_time(partial(dst.copy_, src), device, plan.reps)
    return 2 * plan.copy_bytes / seconds


def _best_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Shortest of ``reps`` timed calls of ``fn``, in seconds, after one untimed warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _launch_overhead_s(device: torch.device, rounds: int = 3) -> float:
    """Seconds per kernel of _LAUNCHES back-to-back one-element adds (best of ``rounds``)."""
    x = torch.zeros(1, device=device)
    for _ in range(_LAUNCHES // 10):
        x.add_(1)
    best = math.inf
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(_LAUNCHES):
            x.add_(1)
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / _LAUNCHES)
    return best


def device_key(device: str | torch.device) -> str:
    """Fingerprint of the device and the software that decide the calibrated figures."""
    device = torch.device(device)
    parts = [device.type, device_name(device)]
    if device.type == "cuda":
        props = gpu_properties(device)
        parts += [
            f"sm {props['capability']} x{props['multi_processor_count']}",
            f"memory {props['total_memory']}",
        ]
    else:
        flags = hashlib.sha256(cpu_flags().encode()).hexdigest()[:12]
        isa = torch.backends.cpu.get_cpu_capability()
        parts += [f"flags {flags}", f"isa {isa}", f"threads {torch.get_num_threads()}"]
    parts += [
        f"torch {torch.__version__}",
        f"cuda {torch.version.cuda}",
        f"fp32 matmul {torch.get_float32_matmul_precision()}",
    ]
    return " | ".join(parts)


def default_cache_dir() -> Path:
    """$LLM_PERF_OPT_CACHE, else $XDG_CACHE_HOME/llm_perf_opt, else ~/.cache/llm_perf_opt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llm_perf_opt"


def cache_path(device: str | torch.device, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache file for this device's current key."""
    device = torch.device(device)
    return _cache_file(device_key(device), device.type, cache_dir)


def _cache_file(key: str, device_type: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / "calibration" / f"{device_type}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_calibration(
    device: str | torch.device,
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
    *,
    measure: Callable[[torch.device], Calibration] = calibrate,
) -> Calibration:
    """The cached calibration for this device and software, measured (and stored) on a miss.

    A miss is: no file, an unreadable or malformed file (warned about, then overwritten), a file
    with another key, or ``refresh``. ``measure`` is the measuring function (tests pass a fake).
    """
    device = torch.device(device)
    key = device_key(device)
    path = _cache_file(key, device.type, cache_dir)
    if not refresh:
        cached = _load(path)
        if cached is not None and cached.key == key:
            return cached
    calibration = measure(device)
    store_in_cache(path, dataclasses.asdict(calibration), "calibration")
    return calibration


def store_in_cache(path: Path, data: Any, what: str) -> bool:
    """Write a cache file; where the cache cannot take it (a read-only folder, a file in the
    folder's place, a full disk) the run goes on without it, after one warning line."""
    try:
        write_json(path, data)
    except OSError as exc:
        log.warning(
            f"warning: the {what} cache cannot be written ({exc.strerror or exc}: "
            f"{exc.filename or path}); going on without it, so the next run measures again"
        )
        return False
    return True


def _load(path: Path) -> Calibration | None:
    if not path.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"calibration cache {path} is unreadable ({exc}); measuring again", stacklevel=3)
        return None
