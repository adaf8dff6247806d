"""Which dtype a run computes in: `dtype=auto` picks the fastest one this device does natively.

On a CPU, torch's bf16 matmuls and linears go through oneDNN, which has bf16 kernels only on
CPUs it considers bf16-capable; elsewhere bf16 falls back to a generic path (on an AVX2-only
Zen 3: a 2048^3 matmul at 0.3 GFLOP/s, against 93 GFLOP/s in fp32). So `auto` asks torch the
question it asks before handing bf16 to oneDNN (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`:
AVX-512 BW/VL/DQ on x86), not the CPU's model name.

The CPU flags (``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo) are a cross-check only. When the
two disagree torch's answer wins, because it is the one that selects the kernels: on an AVX-512
CPU without ``avx512_bf16`` (Skylake-SP, Cascade Lake) torch still sends bf16 to oneDNN, which
emulates the bf16 dot products with AVX-512 instructions. The flags decide only where torch's
probe does not exist.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_perf_opt.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CHOICES = ("auto", *DTYPES)

# /proc/cpuinfo names: x86 "flags" line, Arm "Features" line.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags_include(wanted: frozenset[str], cpuinfo: Path = CPUINFO) -> bool | None:
    """Whether the first flags/Features line of `cpuinfo` names any of `wanted`; None where the
    file or such a line is absent (not Linux, or an unknown layout)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return not wanted.isdisjoint(value.split())
    return None


def _torch_probe(op: str) -> bool | None:
    """A `torch.ops.mkldnn` capability probe, or None where this torch build lacks it."""
    try:
        probe = getattr(torch.ops.mkldnn, op)
    except AttributeError:
        return None
    return bool(probe())


def _native(op: str, flags: frozenset[str]) -> bool:
    answer = _torch_probe(op)
    if answer is None:
        answer = cpu_flags_include(flags)
    return bool(answer)


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether torch computes bf16 natively on this CPU (oneDNN's own check; flags as fallback)."""
    return _native("_is_mkldnn_bf16_supported", BF16_FLAGS)


@functools.cache
def cpu_fp16_native() -> bool:
    """Whether torch computes fp16 natively on this CPU (AVX512-FP16 / AMX-FP16 class hardware)."""
    return _native("_is_mkldnn_fp16_supported", FP16_FLAGS)


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (compute capability >= 8.0 on NVIDIA).

    `is_bf16_supported` asks about the current device, hence the device context; emulation is
    excluded because pre-Ampere GPUs only store bf16 and compute it through fp32.
    """
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run uses, why, and a one-line warning when the request will run slowly."""

    dtype: torch.dtype
    reason: str
    warning: str | None = None


SHORT = {"bfloat16": "bf16", "float16": "fp16"}


def _emulated(name: str, where: str, fallback: str) -> str:
    return (
        f"{name} on this {where} is emulated (no native {SHORT[name]}): expect it to run many times "
        f"slower than {fallback}; dtype=auto picks {fallback}"
    )


def choose_dtype(
    requested: str,
    device: torch.device,
    *,
    bf16_native: Callable[[], bool] = cpu_bf16_native,
    cuda_bf16: Callable[[], bool] | None = None,
    fp16_native: Callable[[], bool] = cpu_fp16_native,
) -> DtypeChoice:
    """Resolve `requested` (auto, bfloat16, float16, float32) for `device`.

    auto: CUDA -> bf16 where the GPU computes it natively, else fp16; CPU -> bf16 where the CPU
    computes it natively, else fp32. An explicit half type the device only emulates is honoured,
    with a warning. The probes are parameters so that both answers can be tested anywhere;
    `cuda_bf16` defaults to asking `device` itself.
    """
    if requested not in CHOICES:
        raise UserError(f"config: dtype={requested!r} is not one of {', '.join(CHOICES)}")
    if device.type == "cuda":
        bf16_ok = cuda_bf16 if cuda_bf16 is not None else functools.partial(cuda_bf16_native, device)
        return _choose_cuda(requested, bf16_ok)
    if device.type == "cpu":
        return _choose_cpu(requested, bf16_native, fp16_native)
    raise ValueError(f"no dtype policy for device type {device.type!r}")


def _choose_cuda(requested: str, bf16_ok: Callable[[], bool]) -> DtypeChoice:
    if requested == "auto":
        if bf16_ok():
            return DtypeChoice(torch.bfloat16, "auto: CUDA with bf16 support")
        return DtypeChoice(torch.float16, "auto: this GPU has no native bf16")
    warning = None
    if requested == "bfloat16" and not bf16_ok():
        warning = _emulated("bfloat16", "GPU", fallback="float16")
    return DtypeChoice(DTYPES[requested], "requested", warning)


def _choose_cpu(requested: str, bf16_ok: Callable[[], bool], fp16_ok: Callable[[], bool]) -> DtypeChoice:
    if requested == "auto":
        if bf16_ok():
            return DtypeChoice(torch.bfloat16, "auto: this CPU computes bf16 natively")
        return DtypeChoice(torch.float32, "auto: this CPU has no native bf16")
    native = {"bfloat16": bf16_ok, "float16": fp16_ok}.get(requested)
    warning = None
    if native is not None and not native():
        warning = _emulated(requested, "CPU", fallback="bfloat16" if bf16_ok() else "float32")
    return DtypeChoice(DTYPES[requested], "requested", warning)


def header_text(choice: DtypeChoice) -> str:
    """The header line: ``dtype float32 (auto: this CPU has no native bf16)``."""
    return f"dtype {str(choice.dtype).removeprefix('torch.')} ({choice.reason})"
