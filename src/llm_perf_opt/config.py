"""The run configuration: one structured schema, composed by Hydra and validated once.

`conf/` (shipped inside the package) holds the values; the dataclasses here give them types.
Each model brings its own typed config, a subclass of :class:`ModelConfig`, declared as an
entry point in the `llm_perf_opt.models` group (pyproject.toml) and registered here as the
Hydra schema `schema/model/<entry point name>` that its `conf/model/*.yaml` extends. This module
names no model.

    run = load(["model=deepseek_ocr_tiny", "mode=gundam"])   # RunConfig, every field typed
    run.model.mode.name                                       # "gundam"

Every problem a user can fix (an unknown option, a wrong type, a bad value) surfaces as one
:class:`UserError` line, from Hydra's and OmegaConf's own errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import tomllib
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm_perf_opt.allocator import DEFAULT as DEFAULT_ALLOCATOR
from llm_perf_opt.allocator import check as check_allocator
from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.ceilings import HardwareConfig

CONFIG_MODULE = "llm_perf_opt.conf"
CONFIG_NAME = "config"
MODEL_ENTRY_POINTS = "llm_perf_opt.models"
#: The project file of a source tree this package runs from (a bare copy has no metadata).
SOURCE_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
DTYPES = ("auto", "bfloat16", "float16", "float32")
GRANULARITIES = ("stage", "module")


@dataclass
class ModelConfig:
    """What every model's config has; a model subclasses it with its own typed fields and
    names, by dotted path, the session class that runs it and its analytic model."""

    session: ClassVar[str]
    analytic: ClassVar[str]

    name: str = MISSING
    weights: str = "dummy"  # dummy, or a local checkpoint folder

    @property
    def dummy_weights(self) -> bool:
        return self.weights == "dummy"


@dataclass
class ProfilingConfig:
    warmup: int = 1  # untimed runs before measuring (the first also records MoE routing)
    repeats: int = 3  # timed runs; every raw sample is kept in run.json
    trace: bool = True  # one extra run under torch.profiler, attributed to stages
    granularity: str = "stage"  # stage | module (nested ranges per module family, trace pass only)
    # torch.profiler's own options for the trace pass: more detail in the trace, more overhead in that pass only.
    record_shapes: bool = False  # each op's input shapes
    profile_memory: bool = False  # tensor allocations and frees
    with_stack: bool = False  # the Python source line of each op
    # Timed runs beyond `repeats`, one at a time, until the spread (stdev / mean) of the end-to-end
    # time and of every stage over 5 % of it is at most until_cv; at most max_repeats runs in all.
    until_cv: float | None = None  # e.g. 0.05; null = exactly `repeats` runs
    max_repeats: int = 20

    def __post_init__(self) -> None:
        _check_choice("profiling.granularity", self.granularity, GRANULARITIES)
        _check_at_least("profiling.repeats", self.repeats, 1)
        _check_at_least("profiling.warmup", self.warmup, 0)
        if self.until_cv is not None:
            if not 0 < self.until_cv < 1:
                raise UserError(
                    f"config: profiling.until_cv must be between 0 and 1 (0.05 = 5 %), got {self.until_cv}"
                )
            _check_at_least("profiling.max_repeats", self.max_repeats, self.repeats)

    def profiler_options(self) -> dict[str, bool]:
        """The keyword arguments of torch.profiler.profile that these options set."""
        return {
            "record_shapes": self.record_shapes,
            "profile_memory": self.profile_memory,
            "with_stack": self.with_stack,
        }


@dataclass
class CpuConfig:
    """How the host runs: its memory allocator (set when the process starts: `llm_perf_opt.allocator`)
    and the intra-op threads (`hardware.host`). Both apply on a GPU run too, to its host side."""

    allocator: str = DEFAULT_ALLOCATOR  # tuned | system | jemalloc | tcmalloc
    threads: int | None = None  # None = OMP_NUM_THREADS where set, else the cores of this process's affinity

    def __post_init__(self) -> None:
        check_allocator(self.allocator)
        if self.threads is not None:
            _check_at_least("cpu.threads", self.threads, 1)


@dataclass
class RunConfig:
    model: Any = MISSING  # the model's own ModelConfig subclass
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    image: str | None = None  # None = the model's bundled sample input
    # The pages of a batch: a list of files, a directory or a glob; the first batch_size of them
    # (repeated when fewer). None = `image` (or the bundled page) batch_size times.
    images: Any | None = None
    batch_size: int = 1  # pages per request, run together
    prompt: str = MISSING
    max_new_tokens: int = 32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    seed: int = 0
    ignore_eos: bool | None = None  # None = true with dummy weights (every run decodes max_new_tokens)

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_at_least("max_new_tokens", self.max_new_tokens, 1)
        _check_at_least("batch_size", self.batch_size, 1)
        if self.image is not None and self.images is not None:
            raise UserError(
                "config: give image= (one page) or images= (a list, a directory or a glob), not both"
            )

    @property
    def stops_at_eos(self) -> bool:
        return not self.model.dummy_weights if self.ignore_eos is None else not self.ignore_eos


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"config: {key}={value!r} is not one of {', '.join(choices)}")


def _check_at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise UserError(f"config: {key} must be >= {low}, got {value}")


def register_configs() -> None:
    """The run schema and every installed model's schema, in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for name, schema in model_schemas().items():
        store.store(group="schema/model", name=name, node=schema)


def model_schemas(pyproject: Path = SOURCE_PYPROJECT) -> dict[str, type]:
    """Entry point name -> model config class: the installed entry points, and those declared
    in the pyproject.toml of the source tree this module runs from, so that a copy of the tree
    used without `pip install` (only src/ on sys.path, no package metadata) finds its models.
    An installed entry point wins over the tree's of the same name."""
    declared = {}
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        declared = project.get("entry-points", {}).get(MODEL_ENTRY_POINTS, {})
    schemas = {name: _load_object(target) for name, target in declared.items()}
    schemas.update({entry.name: entry.load() for entry in entry_points(group=MODEL_ENTRY_POINTS)})
    return schemas


def _load_object(target: str) -> Any:
    """`package.module:attr`, as an entry point names its object."""
    module, _, attr = target.partition(":")
    obj = import_module(module.strip())
    for part in attr.strip().split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: DictConfig) -> RunConfig:
    """The composed config as a typed RunConfig (every __post_init__ check runs here)."""
    unknown = _unknown_keys(cfg)
    if unknown:
        raise UserError(f"config: unknown key(s) {', '.join(unknown)}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise UserError(f"config: {one_line(exc)}") from None


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that no schema declares. Hydra's `+key=value` appends keys even to typed nodes."""
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    unknown = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if declared is not None and key not in declared:
            unknown.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            unknown += _unknown_keys(child, path + ".")
    return unknown


def compose(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """The composed (not yet validated) config for these overrides, through Hydra's compose API."""
    GlobalHydra.instance().clear()
    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(
                config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config
            )
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(one_line(exc)) from None


def group_options(group: str) -> list[str]:
    """The options of a config group as Hydra sees them (`mode` -> base, gundam, ...)."""
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def load(overrides: Sequence[str] = ()) -> RunConfig:
    """compose + validate: what tests, benchmarks and tools use instead of the CLI."""
    return validate(compose(overrides))


def one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's messages on one line: the first line, the key concerned, and the
    available options when Hydra lists them (an unknown `mode=huge`)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    key = getattr(exc, "full_key", None)
    if key:
        text += f" (at {key})"
    if (
        exc.__cause__ is not None
    ):  # Hydra's "Error merging override x=y" names the override, the cause says why
        text = text.rstrip(".") + ": " + one_line(exc.__cause__)
    header = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
    if header is not None:
        options = []
        for line in lines[header + 1 :]:
            if line.endswith(":"):  # the next section (Hydra's search path)
                break
            options.append(line)
        text += "; " + lines[header].rstrip(":").lower() + ": " + ", ".join(options)
    return text
