"""What the harness needs from a model, and nothing more.

A model plugs in with three things:

* a config dataclass, a subclass of :class:`llm_perf_opt.config.ModelConfig`, named by the
  `_target_` of its `conf/model/<name>.yaml`; it holds the model's typed options and names
  the two classes below (`session`, `analytic`) by their dotted paths;
* a :class:`ModelSession` subclass that builds the model and runs one request stage by stage,
  each stage inside `stage_range(name)` (the session owns the ranges; the model knows nothing
  of profiling). A model whose stages can only be reached from outside (a transformers
  model) opens the ranges from forward hooks on the modules that make up each stage;
* an analytic model (:class:`AnalyticModel`) that gives the FLOPs and bytes of a request from
  its shapes, following how the session ran it (:meth:`ModelSession.execution`).

The harness (measurement passes, attribution, report) uses only what this module declares.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn



@dataclass(frozen=True)
class Stage:
    """One stage of a request. `per_step` stages run once per generated token after the first
    (decode); the others run once per request and together make the time to first token."""

    name: str
    per_step: bool = False


class Request(Protocol):
    """A prepared request: the model's inputs for one image and prompt."""

    @property
    def prompt_tokens(self) -> int: ...

    def describe(self) -> dict[str, Any]:
        """Facts about the request for run.json (image size, token counts, ...)."""
        ...

    def summary(self) -> str:
        """The same facts in one line for people (report.md)."""
        ...


class Execution(Protocol):
    """How a model ran where it has more than one way to run (which formulation each part took
    on this device): recorded in run.json and report.md, read by the model's analytic model."""

    def as_dict(self) -> dict[str, Any]:
        """Plain values for run.json."""
        ...

    def summary(self) -> str:
        """One line for people (report.md)."""
        ...


class AnalyticModel(Protocol):
    """The analytic side of a model, built from its config (named by the config's `analytic`)."""

    def stage_model(
        self, request: Any, decode_steps: int, dtype: str, routing: Any, execution: Execution | None
    ) -> Any:
        """FLOPs and bytes of exactly this run: an object with `totals()`, `breakdown()`,
        `experts()` and `range_totals()` tables (see analytic/deepseek_ocr.StageModel)."""
        ...

    def footprint(self, request: Any, max_new_tokens: int, dtype: str, execution: Execution | None = None) -> Any:
        """Weights, KV cache and largest transients of the run: before anything is built (the
        memory check, execution None), and of the way it ran (execution given) for the report."""
        ...


@dataclass(frozen=True)
class OpNote:
    """What a model knows about some ops of one of its stages: what they are doing there and
    what avoids them. A verdict quotes the note when these ops are among the stage's longest."""

    stage: str
    ops: tuple[str, ...]  # op or kernel names as the trace has them, e.g. ("aten::copy_", "aten::add")
    note: str  # e.g. "the materialised relative-position bias; model.impl=fast avoids it"

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "ops": list(self.ops), "note": self.note}


class RoutedLayer(Protocol):
    """A mixture-of-experts layer whose routing can be observed: it calls `on_route` with the
    expert ids [tokens, k] it chose, on every forward."""

    on_route: Any

    @property
    def n_experts(self) -> int: ...


#: Observed routing: stage -> one entry per call of that stage -> per routed layer -> tokens per expert.
RoutingCounts = dict[str, list[list[list[int]]]]


@dataclass
class Result:
    """Generated token ids, left on the device: reading them forces a device→host copy,
    which happens when `tokens` is first read, after the measured region."""

    ids: torch.Tensor  # [n]

    @functools.cached_property
    def tokens(self) -> list[int]:
        return self.ids.tolist()


@dataclass(frozen=True)
class SessionOptions:
    """How a session runs, whatever the model."""

    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    stops_at_eos: bool = False  # False: decode max_new_tokens whatever comes (dummy weights)


class ModelSession(ABC):
    """One model on one device, running one request at a time, stage by stage.

    Constructed cheaply from the model's config and the options (tokenizer, checkpoint
    config); `load` builds the weights.
    """

    #: The stages of a request in the order they run; names are defined once, by the model.
    stages: ClassVar[tuple[Stage, ...]]
    #: Stage groups of the report's headline: FLOP utilisation of each compute group and
    #: memory-bandwidth utilisation of each bandwidth group (e.g. {"decode": ("decode",)}).
    compute_groups: ClassVar[dict[str, tuple[str, ...]]] = {}
    bandwidth_groups: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, cfg: Any, options: SessionOptions) -> None:
        self.cfg = cfg
        self.options = options

    @classmethod
    def stage_names(cls) -> tuple[str, ...]:
        return tuple(stage.name for stage in cls.stages)

    @abstractmethod
    def prepare(self, image: Path | None, prompt: str) -> Request:
        """Host-side preparation of one request (image decoding, tokenising), inside its stage
        range(s). Needs no weights, so a request can be checked before the model is built."""

    @abstractmethod
    def check(self, request: Request, max_new_tokens: int) -> None:
        """Raise UserError if the request cannot run (e.g. it exceeds the context window)."""

    @abstractmethod
    def load(self) -> None:
        """Build the model: dummy weights or a local checkpoint (the expensive part)."""

    @abstractmethod
    def generate(self, request: Request, max_new_tokens: int) -> Result:
        """Every stage after preparation, each inside its stage range; greedy, batch 1."""

    def fit_dummy_weights(self, request: Request) -> None:
        """Adjust dummy weights to this request where they would behave unlike trained ones
        (e.g. MoE routing). Runs before anything is measured; nothing by default."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The model's root module, for hooks attached from outside."""

    def meta_module(self) -> nn.Module:
        """The model's root module built on the meta device: every shape, no storage, no `load`.
        For inspecting the structure (module tree, parameter counts) of any size of model."""
        raise NotImplementedError(f"{type(self).__name__} does not build its model on the meta device")

    def module_stages(self) -> dict[str, str]:
        """Qualified-name prefix -> stage tag of the modules and parameters that belong to one
        stage (`model.vision_model` -> `clip`); the longest matching prefix wins. Names may be
        parameters held directly by a module. None by default."""
        return {}

    def module_families(self) -> dict[str, str]:
        """Qualified module name -> family, for nested `stage/family` ranges (none by default)."""
        return {}

    def routed_layers(self) -> list[RoutedLayer]:
        """The MoE layers whose routing the harness records, in execution order (none by default)."""
        return []

    def op_notes(self) -> tuple[OpNote, ...]:
        """The model's words on ops that take a stage's time in the way it runs now (none by
        default), for the verdicts of the report."""
        return ()

    def execution(self) -> Execution | None:
        """How the last `generate` ran where the model has more than one way (None: the one
        way). The harness records it and hands it to the analytic model."""
        return None
