"""What the harness needs from a model, and nothing more.

A model plugs in with three things:

* a config dataclass, a subclass of :class:`llm_perf_opt.config.ModelConfig`, named by the
  `_target_` of its `conf/model/<name>.yaml`; it holds the model's typed options and names
  the two classes below (`session`, `analytic`) by their dotted paths;
* a :class:`ModelSession` subclass that builds the model and runs one request (one page, or a
  batch of pages where the model overrides `prepare_batch`) stage by stage,
  each stage inside `stage_range(name)` (the session owns the ranges; the model knows nothing
  of profiling). A model whose stages can only be reached from outside (a transformers
  model) opens the ranges from forward hooks on the modules that make up each stage;
* an analytic model (:class:`AnalyticModel`) that gives the FLOPs and bytes of a request from
  its shapes, following how the session ran it (:meth:`ModelSession.execution`), as typed
  values: :class:`StageCosts` (per stage, per step, optional nested ranges, families and MoE
  routing figures) and :class:`Footprint` (weights, KV cache, largest transients, logits).

The harness (measurement passes, attribution, analytic check, report) uses only what this
module declares.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from llm_perf_opt.errors import UserError


@dataclass(frozen=True)
class Stage:
    """One stage of a request. `per_step` stages run once per generated token after the first
    (decode); the others run once per request and together make the time to first token."""

    name: str
    per_step: bool = False


class Request(Protocol):
    """A prepared request: the model's inputs for one image and prompt, or for a batch of pages."""

    @property
    def prompt_tokens(self) -> int:
        """Positions of the prompt as the model runs it (a batch: its longest, after padding)."""
        ...

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


#: Observed routing: stage -> one entry per call of that stage -> per routed layer -> tokens per expert.
RoutingCounts = dict[str, list[list[list[int]]]]


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes of some work: a stage over a run, one step, a nested range, a family.

    FLOPs count 2 per multiply-add. *Executed* FLOPs are what dense kernels run (FlopCounterMode
    counts the matmul part); *useful* FLOPs leave out what a causal mask discards. Bytes are
    split by what they move: weights, activations read and written, KV cache read and written.
    """

    matmul_flops: float = 0  # executed matrix products and convolutions
    useful_matmul_flops: float = 0
    other_flops: float = 0  # executed elementwise and reduction work
    useful_other_flops: float = 0
    weight_bytes: float = 0
    act_read_bytes: float = 0
    act_write_bytes: float = 0
    kv_read_bytes: float = 0
    kv_write_bytes: float = 0

    @property
    def flops(self) -> float:
        """Executed FLOPs: matmul + other."""
        return self.matmul_flops + self.other_flops

    @property
    def useful_flops(self) -> float:
        """Useful FLOPs (what the roofline uses): matmul + other a causal mask keeps."""
        return self.useful_matmul_flops + self.useful_other_flops

    @property
    def bytes(self) -> float:
        return (
            self.weight_bytes
            + self.act_read_bytes
            + self.act_write_bytes
            + self.kv_read_bytes
            + self.kv_write_bytes
        )

    @property
    def act_bytes(self) -> float:
        return self.act_read_bytes + self.act_write_bytes

    @property
    def kv_bytes(self) -> float:
        return self.kv_read_bytes + self.kv_write_bytes

    def as_dict(self) -> dict[str, float]:
        """Every figure, derived totals included, under run.json's names."""
        return {
            "matmul_flops": self.matmul_flops,
            "useful_matmul_flops": self.useful_matmul_flops,
            "other_flops": self.other_flops,
            "useful_other_flops": self.useful_other_flops,
            "flops": self.flops,
            "useful_flops": self.useful_flops,
            "weight_bytes": self.weight_bytes,
            "act_read_bytes": self.act_read_bytes,
            "act_write_bytes": self.act_write_bytes,
            "kv_read_bytes": self.kv_read_bytes,
            "kv_write_bytes": self.kv_write_bytes,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class FamilyWork:
    """One module family's work inside a stage, over the run (scope "run") or its first step ("step")."""

    stage: str
    scope: str
    family: str
    work: Work


@dataclass(frozen=True)
class ExpertUsage:
    """Distinct routed experts one MoE layer reads in `scope` (e.g. prefill, one decode step, the
    decode run): expected under uniform routing, and observed (None when not recorded)."""

    layer: int
    scope: str
    tokens: float
    experts: int
    top_k: int
    expected_distinct: float
    observed_distinct: float | None


@dataclass(frozen=True)
class StageCosts:
    """The analytic FLOPs and bytes of one run, per stage: what the report, run.json and the
    analytic check read. Stages without analytic work (host preprocessing) are left out."""

    stages: dict[str, Work]  # stage -> its work over the whole run, in run order
    steps: dict[str, Work]  # per-step stage -> the work of its first step
    ranges: dict[str, Work] = field(default_factory=dict)  # nested "stage/family" range -> over the run
    families: tuple[FamilyWork, ...] = ()  # the per-family breakdown, for run.json
    experts: tuple[ExpertUsage, ...] | None = None  # a mixture-of-experts model's routing figures
    note: str = ""  # which FLOPs the roofline uses, and why (report.md)


@dataclass(frozen=True)
class StageMemory:
    """The weights a stage's modules hold and its largest transient tensor."""

    stage: str
    weight_params: int
    weight_bytes: float
    transient: str  # what the tensor is, for people
    transient_bytes: float


@dataclass(frozen=True)
class Footprint:
    """Memory of one run from shapes alone: per stage, and for the whole run."""

    stages: tuple[StageMemory, ...]
    total_weight_bytes: float  # the whole model resident
    kv_cache_bytes: float = 0  # as allocated for the run
    kv_bytes_per_token: float = 0
    logits_bytes: float = 0  # one call's logits

    @property
    def largest_transient(self) -> StageMemory:
        """The stage with the largest transient (the first of equals)."""
        return max(self.stages, key=lambda s: s.transient_bytes)


@dataclass(frozen=True)
class CheckCase:
    """One run on which `python -m llm_perf_opt.analytic.validate` checks a model's formulas
    against the costs counted on its meta-device model: config overrides (e.g. `mode=gundam`)
    and the size of a blank page to read (None: the model's bundled image)."""

    name: str
    overrides: tuple[str, ...] = ()
    image_size: tuple[int, int] | None = None


class AnalyticModel(Protocol):
    """The analytic side of a model, built from its config (named by the config's `analytic`).

    Optionally also `check_cases(impl) -> list[CheckCase]`, the runs the analytic check covers
    for an implementation (default: the config as composed), and `reference_checks() ->
    list[tuple[str, float, float]]`, published figures (what, analytic, reference) it must
    reproduce within 1%.
    """

    def stage_model(
        self,
        request: Any,
        decode_steps: int,
        dtype: str,
        routing: RoutingCounts | None,
        execution: Execution | None = None,
    ) -> StageCosts:
        """FLOPs and bytes of exactly this run: its request, decode steps, observed routing
        (None: the model's expectation) and the way it ran (None: its reference way)."""
        ...

    def footprint(
        self, request: Any, max_new_tokens: int, dtype: str, execution: Execution | None = None
    ) -> Footprint:
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


def even_split(flat: torch.Tensor, n_experts: int) -> list[int]:
    """Tokens per expert on the meta device, where the router's choice has no values: the T·k
    assignments spread evenly. A session built on meta feeds its routed experts this way, and
    the count of its costs (analytic.counted) records the same routing for its analytic model."""
    total = flat.numel()
    return [total // n_experts + (e < total % n_experts) for e in range(n_experts)]


@dataclass
class Result:
    """Generated token ids, left on the device: reading them forces a device→host copy,
    which happens when `tokens` (or `lengths`) is first read, after the measured region."""

    ids: torch.Tensor  # [n] for one sequence, [B, n] for a batch
    #: Set where generation stops at EOS: each sequence's tokens end at its first EOS (kept).
    eos_id: int | None = None

    @functools.cached_property
    def tokens(self) -> list:
        """The ids as lists: [n] ints, or B lists of n for a batch (past a sequence's EOS too)."""
        return self.ids.tolist()

    @property
    def batch_size(self) -> int:
        return 1 if self.ids.dim() == 1 else self.ids.shape[0]

    @property
    def steps(self) -> int:
        """Decode steps the request ran (each produced one token for every sequence)."""
        return self.ids.shape[-1] - 1

    @functools.cached_property
    def lengths(self) -> tuple[int, ...]:
        """Real tokens each sequence generated: up to and including its first EOS, or all."""
        rows = [self.tokens] if self.ids.dim() == 1 else self.tokens
        if self.eos_id is None:
            return tuple(len(row) for row in rows)
        return tuple(row.index(self.eos_id) + 1 if self.eos_id in row else len(row) for row in rows)

    @property
    def generated_tokens(self) -> int:
        """Real tokens over the batch: what throughput counts."""
        return sum(self.lengths)

    @property
    def decode_tokens(self) -> int:
        """Real tokens that decode steps produced (each sequence's first comes from prefill)."""
        return sum(max(n - 1, 0) for n in self.lengths)


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

    def prepare_batch(self, images: Sequence[Path | None], prompt: str) -> Request:
        """Host-side preparation of one request of len(images) pages, each with the prompt
        (None: the model's bundled page). A model that batches overrides it; by default a
        request holds one page."""
        if len(images) != 1:
            raise UserError(f"{type(self).__name__} runs one page per request; use batch_size=1")
        return self.prepare(images[0], prompt)

    @abstractmethod
    def check(self, request: Request, max_new_tokens: int) -> None:
        """Raise UserError if the request cannot run (e.g. it exceeds the context window)."""

    @abstractmethod
    def load(self) -> None:
        """Build the model: dummy weights or a local checkpoint (the expensive part). On the meta
        device (`options.device`), every shape and no storage: `generate` then runs without
        values, for counting its FLOPs and bytes (analytic.counted); routed layers feed their
        experts `even_split`, and nothing reads a value on the host."""

    @abstractmethod
    def generate(self, request: Request, max_new_tokens: int) -> Result:
        """Every stage after preparation, each inside its stage range; greedy, every page of the
        request together."""

    def fit_dummy_weights(self, request: Request) -> None:
        """Adjust dummy weights to this request where they would behave unlike trained ones
        (e.g. MoE routing). Runs before anything is measured; nothing by default."""

    def setup(self, request: Request, max_new_tokens: int) -> None:
        """Untimed work that later requests of this size reuse (e.g. capturing a CUDA graph of a
        decode step), done here, outside every stage range, so that no stage and no timed run
        (with no warm-up, the first) pays for it. Runs after `fit_dummy_weights`, before
        anything is measured; nothing by default."""

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

    def kv_buffers(self) -> list[torch.Tensor]:
        """The KV-cache buffers of the request running now (from the moment it allocates them),
        so that a byte count tells KV reads and writes from activations; none by default."""
        return []

    def execution(self) -> Execution | None:
        """How the last `generate` ran where the model has more than one way (None: the one
        way). The harness records it and hands it to the analytic model."""
        return None
