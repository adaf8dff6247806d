"""Run configuration: the Hydra schema (registered once) and its validation into typed settings.

conf/*.yaml holds the values; `RunConf` and friends give OmegaConf the types, so a wrong
type is rejected while composing; `resolve` then checks what types cannot express and
returns a frozen `Settings` that the rest of the code receives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from llm_perf_opt.errors import UserError
from llm_perf_opt.models.deepseek_ocr.attention import BACKENDS
from llm_perf_opt.models.deepseek_ocr.config import (
    ClipConfig,
    DeepSeekOCRConfig,
    LMConfig,
    SamConfig,
    lists_to_tuples,
)
from llm_perf_opt.models.deepseek_ocr.modes import ModeSpec

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GRANULARITIES = ("stage", "module")


@dataclass
class ModelConf:
    name: str = MISSING
    weights: str = "dummy"
    attn_impl: str = "sdpa"
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModeConf:
    name: str = MISSING
    base_size: int = MISSING
    image_size: int = MISSING
    crop_mode: bool = MISSING
    min_tiles: int = 2
    max_tiles: int = 9


@dataclass
class HardwareConf:
    name: str = "auto"


@dataclass
class ProfilingConf:
    warmup: int = 1
    repeats: int = 3
    trace: bool = True
    granularity: str = "stage"


@dataclass
class RunConf:
    model: ModelConf = field(default_factory=ModelConf)
    mode: ModeConf = field(default_factory=ModeConf)
    hardware: HardwareConf = field(default_factory=HardwareConf)
    profiling: ProfilingConf = field(default_factory=ProfilingConf)
    image: Optional[str] = None
    prompt: str = MISSING
    max_new_tokens: int = 32
    device: str = "auto"
    dtype: str = "bfloat16"
    seed: int = 0
    ignore_eos: Optional[bool] = None


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConf)


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, validated and typed."""

    model_name: str
    arch: DeepSeekOCRConfig
    checkpoint: Path | None  # None = dummy weights
    attn_impl: str
    mode: ModeSpec
    image: Path | None  # None = bundled sample page
    prompt: str
    max_new_tokens: int
    device: torch.device
    dtype: torch.dtype
    seed: int
    ignore_eos: bool
    warmup: int
    repeats: int
    trace: bool
    granularity: str
    hardware: str


def resolve(cfg: DictConfig) -> Settings:
    """Validate a composed config once; every problem becomes a one-line UserError."""
    _check_choice("model.attn_impl", cfg.model.attn_impl, BACKENDS)
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("profiling.granularity", cfg.profiling.granularity, GRANULARITIES)
    for key, low in (("max_new_tokens", 1), ("profiling.repeats", 1), ("profiling.warmup", 0)):
        if OmegaConf.select(cfg, key) < low:
            raise UserError(f"config: {key} must be >= {low}, got {OmegaConf.select(cfg, key)}")
    checkpoint = None if cfg.model.weights == "dummy" else Path(cfg.model.weights).expanduser()
    return Settings(
        model_name=cfg.model.name,
        arch=build_arch(OmegaConf.to_container(cfg.model.arch)),
        checkpoint=checkpoint,
        attn_impl=cfg.model.attn_impl,
        mode=ModeSpec(**OmegaConf.to_container(cfg.mode)),
        image=None if cfg.image is None else Path(cfg.image).expanduser(),
        prompt=cfg.prompt,
        max_new_tokens=cfg.max_new_tokens,
        device=resolve_device(cfg.device),
        dtype=DTYPES[cfg.dtype],
        seed=cfg.seed,
        ignore_eos=checkpoint is None if cfg.ignore_eos is None else cfg.ignore_eos,
        warmup=cfg.profiling.warmup,
        repeats=cfg.profiling.repeats,
        trace=cfg.profiling.trace,
        granularity=cfg.profiling.granularity,
        hardware=cfg.hardware.name,
    )


def build_arch(arch: dict) -> DeepSeekOCRConfig:
    """Architecture from `model.arch` overrides (sam / clip / lm) over the official values."""
    unknown = set(arch) - {"sam", "clip", "lm"}
    if unknown:
        raise UserError(f"config: model.arch has unknown section(s) {sorted(unknown)}; use sam, clip, lm")
    for section, values in arch.items():
        if not isinstance(values, dict):
            raise UserError(f"config: model.arch.{section} must be a mapping of fields, got {values!r}")
    try:
        return DeepSeekOCRConfig(
            sam=SamConfig(**lists_to_tuples(arch.get("sam", {}))),
            clip=ClipConfig(**arch.get("clip", {})),
            lm=LMConfig(**arch.get("lm", {})),
        )
    except TypeError as exc:
        raise UserError(f"config: bad model.arch field: {exc}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config: device={name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config: device={name} requested but no CUDA GPU is available here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"config: device={name!r} is not supported (use cpu or cuda)")
    return device


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"config: {key}={value!r} is not one of {', '.join(choices)}")


def load_mode(name: str) -> ModeSpec:
    """A built-in mode from conf/mode/<name>.yaml, for code that runs without Hydra."""
    path = CONF_DIR / "mode" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "mode").glob("*.yaml"))
        raise UserError(f"unknown mode {name!r}; choose one of {', '.join(known)}")
    conf = OmegaConf.merge(OmegaConf.structured(ModeConf), OmegaConf.load(path))
    return ModeSpec(**OmegaConf.to_container(conf))


def mode_names() -> list[str]:
    return group_options("mode")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = ("model", "mode", "hardware", "profiling")
_CHOICE = re.compile(r"^(?P<group>" + "|".join(GROUPS) + r")=(?P<names>[\w.-]+(,[\w.-]+)*)$")


def check_group_overrides(overrides: list[str]) -> None:
    """Unknown config-group options (`mode=foo`, `-m mode=tiny,foo`) as one line, before Hydra
    composes anything (Hydra's own message lists its whole search path). Sweep expressions
    other than plain comma lists are left to Hydra."""
    for override in overrides:
        match = _CHOICE.match(override)
        if not match:
            continue
        group, known = match["group"], group_options(match["group"])
        for name in match["names"].split(","):
            if name not in known:
                raise UserError(f"unknown {group} {name!r}; choose one of {', '.join(known)}")
