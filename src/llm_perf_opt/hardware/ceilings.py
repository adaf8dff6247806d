"""Hardware ceilings: datasheet figures of known GPUs, matching a device to them, the Roof type.

The datasheets are the packaged `hardware` config group (``conf/hardware/<key>.yaml``): dense
peaks (no sparsity) per dtype and memory bandwidth. ``auto`` and ``cpu`` carry no figures.

Matching a device name (as ``torch.cuda.get_device_name`` reports it) to a datasheet:

- names and patterns are compared as lower-case tokens split at spaces, ``-`` and ``_``, so
  "L4" never matches "L40S" and "A100-SXM4-80GB" equals "a100 sxm4 80gb";
- a pattern matches when its tokens occur as a contiguous run of the name's tokens and every
  other token of the name is a vendor word (NVIDIA, GeForce, Tesla) or a memory/packaging
  descriptor (80GB, HBM3, SXM5, PCIe). Any other leftover token names a different product
  (RTX 4090 D, RTX 3090 Ti, H200 NVL, laptop parts, MIG slices), which then gets calibrated
  ceilings only instead of a neighbour's datasheet;
- the pattern with the most tokens wins; when datasheets tie (a bare "H100" or "A100"), the
  device properties (SM count, memory size) keep those they agree with; a tie that remains is
  no match.
"""

from __future__ import annotations

import copy
import functools
import platform
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf

from llm_perf_opt.errors import UserError

DTYPE_NAMES = ("bfloat16", "float16", "float32")
TERA = 1e12
GIGA = 1e9
_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla"})
_DESCRIPTOR = re.compile(r"\d+gb|hbm\d*e?|gddr\d*x?|sxm\d*|pcie")
#: Nominal capacities are round marketing figures and the driver keeps some memory back
#: (an "80GB" H100 reports 79.6 GiB), so memory only has to agree within this fraction.
_MEMORY_TOLERANCE = 0.10


@dataclass
class HardwareConfig:
    """One option of the `hardware` config group: a GPU's dense datasheet ceilings.

    ``peak_tflops`` maps bfloat16/float16/float32 to TFLOP/s (fp16 = bf16 = the tensor-core
    rate with FP32 accumulate; fp32 = non-tensor). ``memory_gb`` and ``sm_count`` are only used
    to break ties between datasheets whose name patterns match a device equally well.
    """

    name: str = MISSING
    gpu_names: list[str] = field(default_factory=list)
    peak_tflops: dict[str, float] = field(default_factory=dict)
    memory_gbps: float | None = None
    l2_mb: float | None = None
    memory_gb: float | None = None
    sm_count: int | None = None
    source: str = ""


@dataclass(frozen=True)
class Roof:
    """Ceilings of one device: FLOP/s per dtype name and memory bytes/s."""

    label: str  # "datasheet" or "calibrated"
    flop_s: dict[str, float]
    byte_s: float
    source: str

    def peak(self, dtype_name: str) -> float:
        """Peak FLOP/s for a dtype name such as "bfloat16"."""
        try:
            return self.flop_s[dtype_name]
        except KeyError:
            known = ", ".join(self.flop_s)
            raise KeyError(f"{self.label} ceilings have no {dtype_name} rate (only {known})") from None


@dataclass(frozen=True)
class Selection:
    """Which ceilings a run uses and why."""

    key: str | None  # datasheet key, None when no datasheet applies
    how: str  # "explicit", "matched device name 'X'", "unknown GPU 'X'" or "cpu"
    device_name: str
    roof: Roof | None  # the datasheet roof, None on a CPU or an unknown GPU
    warning: str | None  # one line for the user, None when all is as expected


def hardware_options() -> dict[str, HardwareConfig]:
    """Every packaged option of the `hardware` group, including auto and cpu, by key."""
    # Copies, so that a caller that edits one cannot change what later callers see.
    return copy.deepcopy(_packaged_options())


@functools.cache
def _packaged_options() -> dict[str, HardwareConfig]:
    # Parsing and type-checking the YAML files costs tens of ms; they do not change in a process.
    folder = resources.files("llm_perf_opt").joinpath("conf", "hardware")
    options = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        key = entry.name.removesuffix(".yaml")
        values = OmegaConf.create(entry.read_text("utf-8"))
        merged = OmegaConf.merge(OmegaConf.structured(HardwareConfig), values)
        options[key] = _checked(key, OmegaConf.to_object(merged))
    return options


def datasheets() -> dict[str, HardwareConfig]:
    """The options that carry datasheet figures (every GPU; not auto or cpu), by key."""
    return {key: cfg for key, cfg in hardware_options().items() if cfg.peak_tflops}


def _checked(key: str, cfg: HardwareConfig) -> HardwareConfig:
    # A packaging mistake, not a user's: ordinary exceptions.
    if cfg.name != key:
        raise ValueError(f"conf/hardware/{key}.yaml: name is {cfg.name!r}, expected {key!r}")
    if cfg.peak_tflops:
        if set(cfg.peak_tflops) != set(DTYPE_NAMES):
            expected = ", ".join(DTYPE_NAMES)
            raise ValueError(f"conf/hardware/{key}.yaml: peak_tflops must have exactly {expected}")
        if cfg.memory_gbps is None or not cfg.gpu_names:
            raise ValueError(f"conf/hardware/{key}.yaml: a datasheet needs memory_gbps and gpu_names")
    return cfg


def datasheet_roof(key: str) -> Roof:
    """The datasheet ceilings of ``key`` in FLOP/s (TFLOP/s x 1e12) and bytes/s (GB/s x 1e9)."""
    sheets = datasheets()
    if key not in sheets:
        raise UserError(f"no datasheet ceilings for hardware {key!r}; known: {', '.join(sheets)}")
    cfg = sheets[key]
    return Roof(
        label="datasheet",  # the same column names in every report; the key is in the source
        flop_s={dtype: tflops * TERA for dtype, tflops in cfg.peak_tflops.items()},
        byte_s=cfg.memory_gbps * GIGA,
        source=f"{key}: {cfg.source}",
    )


def match_gpu(device_name: str, props: dict[str, Any] | None = None) -> str | None:
    """Datasheet key for a GPU name (see the module docstring for the rules), or None.

    ``props`` may carry ``multi_processor_count`` and ``total_memory`` (bytes), as in
    ``torch.cuda.get_device_properties``; they only break ties.
    """
    name = _tokens(device_name)
    sheets = datasheets()
    best_len, best = 0, set()
    for key, cfg in sheets.items():
        for pattern in map(_tokens, cfg.gpu_names):
            if len(pattern) < best_len or not _matches(pattern, name):
                continue
            if len(pattern) > best_len:
                best_len, best = len(pattern), set()
            best.add(key)
    if len(best) > 1 and props:
        best = {key for key in best if _agrees(sheets[key], props)}
    return best.pop() if len(best) == 1 else None


def _tokens(name: str) -> list[str]:
    return [token for token in re.split(r"[\s_-]+", name.lower()) if token]


def _matches(pattern: list[str], name: list[str]) -> bool:
    n = len(pattern)
    for start in range(len(name) - n + 1):
        if name[start : start + n] == pattern:
            rest = name[:start] + name[start + n :]
            if all(token in _VENDOR_WORDS or _DESCRIPTOR.fullmatch(token) for token in rest):
                return True
    return False


def _agrees(cfg: HardwareConfig, props: dict[str, Any]) -> bool:
    sms = props.get("multi_processor_count")
    if cfg.sm_count is not None and sms is not None and sms != cfg.sm_count:
        return False
    memory = props.get("total_memory")
    if cfg.memory_gb is not None and memory is not None:
        return abs(memory / 2**30 - cfg.memory_gb) <= _MEMORY_TOLERANCE * cfg.memory_gb
    return True


def select(hardware_name: str, device: str | torch.device) -> Selection:
    """The ceilings for ``hardware_name`` (an option of the `hardware` group) on ``device``."""
    device = torch.device(device)
    props = gpu_properties(device) if device.type == "cuda" else None
    return select_for(hardware_name, device.type, device_name(device), props)


def select_for(hardware_name: str, device_type: str, name: str, props: dict[str, Any] | None) -> Selection:
    """`select` on a described device: pure, so every case can be tested without a GPU."""
    options = hardware_options()
    if hardware_name not in options:
        raise UserError(f"unknown hardware {hardware_name!r}; choose one of {', '.join(options)}")
    if device_type == "cpu":
        if hardware_name not in ("auto", "cpu"):
            raise UserError(
                f"hardware={hardware_name} is a GPU datasheet but the run is on the CPU; use auto or cpu"
            )
        return Selection(None, "cpu", name, None, None)
    if hardware_name == "cpu":
        raise UserError(f"hardware=cpu but the run is on the GPU {name!r}; use auto or a GPU datasheet")
    matched = match_gpu(name, props)
    if hardware_name != "auto":
        warning = None
        if matched != hardware_name:
            found = f"which matches {matched}" if matched else "which matches no datasheet"
            warning = f"hardware={hardware_name} chosen explicitly, but the device reports {name!r} ({found})"
        return Selection(hardware_name, "explicit", name, datasheet_roof(hardware_name), warning)
    if matched is None:
        warning = f"unknown GPU '{name}': no datasheet ceilings, using calibrated ones only"
        return Selection(None, f"unknown GPU '{name}'", name, None, warning)
    return Selection(matched, f"matched device name '{name}'", name, datasheet_roof(matched), None)


def device_name(device: str | torch.device) -> str:
    """The GPU's reported name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def gpu_properties(device: torch.device) -> dict[str, Any]:
    """The properties of a CUDA device that matching and reports use."""
    props = torch.cuda.get_device_properties(device)
    return {
        "total_memory": props.total_memory,
        "multi_processor_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        # Older torch versions do not expose the L2 size.
        "L2_cache_size": getattr(props, "L2_cache_size", None),
    }


def cpu_flags() -> str:
    """The CPU feature flags as the kernel lists them ("" where there is no /proc/cpuinfo)."""
    return _cpuinfo_field("flags")


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                field_name, _, value = line.partition(":")
                if field_name.strip() == name:
                    return value.strip()
    except OSError:
        return ""
    return ""
