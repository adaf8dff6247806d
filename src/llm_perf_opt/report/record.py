"""run.json as a typed value: :class:`RunRecord` and its parts.

The writer (:mod:`.run_record`) builds a RunRecord and writes its :meth:`~RunRecord.to_dict`;
every reader (report.md, the nsys rebuild, batch scaling, the sweep summary, compare) gets one
from :func:`read_record` or :meth:`RunRecord.from_dict`, which refuse, in one line, a file that
is no run record or has another ``schema_version``.

Field names are run.json's. Schema 1 grew fields without a new version (new fields keep it), so
every part but the status is optional: None where the run did not get that far (a failed run
has no timing) or the file is older than the field; a part's fields that an older file lacks
take their defaults, and fields newer than this version are ignored. Parts that are the
model's own or that one reader uses whole (``config``, ``execution``, ``routing``, the measured
memory, the calibration, the trace's ranges, the analytic experts) stay plain JSON values.
Top-level fields this version does not model (the model's facts about its request,
``Request.describe()``: image, mode, tiles, tokens, pages for DeepSeek-OCR), a device's
properties, versions and batch details beyond the modelled ones are kept (``request_facts``,
``extra``) and written back, so ``to_dict(from_dict(d)) == d`` for what the writer writes.

No torch here: compare and the sweep summary read records without importing it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_perf_opt.errors import UserError

#: Version of run.json's layout, raised when a field changes meaning or goes away (new fields keep it).
SCHEMA_VERSION = 1
#: The headline figures, as run.json's ``headline`` and ``timing.summary`` name them.
FIGURES = ("ttft_ms", "tpot_ms", "decode_tokens_per_s", "e2e_ms", "tokens_per_s", "pages_per_s")
#: Each of :data:`FIGURES` as tables name it.
FIGURE_LABELS = dict(
    zip(FIGURES, ("TTFT ms", "TPOT ms", "decode tok/s", "end-to-end ms", "tokens/s", "pages/s"), strict=True)
)

JSON = Any


def _plain(value: JSON) -> JSON:
    """A part as JSON values: parts through their to_dict, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Part:
    """to_dict of a part: each field under its name, then ``extra`` (the fields it does not model)."""

    def to_dict(self) -> dict[str, JSON]:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **_plain(getattr(self, "extra", {}))}


def _known(cls: type, data: Mapping[str, JSON]) -> dict[str, JSON]:
    """The fields of ``data`` that ``cls`` models (absent ones are left to its defaults)."""
    return {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data and f.name != "extra"}


def _rest(cls: type, data: Mapping[str, JSON]) -> dict[str, JSON]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k not in names}


def _part(cls: Any, data: JSON) -> Any:
    return None if data is None else cls.from_dict(data)


@dataclass(frozen=True)
class Versions(_Part):
    """What ran: the package, its git commit (``unknown`` outside a checkout), Python, torch, CUDA."""

    llm_perf_opt: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    transformers: str | None = None
    extra: Mapping[str, JSON] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Versions:
        return cls(**_known(cls, data), extra=_rest(cls, data))


@dataclass(frozen=True)
class Device(_Part):
    """The device the run measured: ``cpu`` or ``cuda``, its name; ``extra`` holds the rest
    (threads on a CPU; index, capability, SM count, memory and L2 bytes on a GPU)."""

    type: str
    name: str
    extra: Mapping[str, JSON] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Device:
        return cls(data["type"], data["name"], _rest(cls, data))


@dataclass(frozen=True)
class RoofRecord(_Part):
    """One set of ceilings as run.json keeps it (hardware.ceilings.Roof's fields; a RoofLike)."""

    label: str
    flop_s: Mapping[str, float]
    byte_s: float
    source: str

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> RoofRecord:
        return cls(data["label"], dict(data["flop_s"]), data["byte_s"], data["source"])

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for a dtype name such as "bfloat16"."""
        try:
            return self.flop_s[dtype]
        except KeyError:
            known = ", ".join(self.flop_s)
            raise KeyError(f"{self.label} ceilings have no {dtype} rate (only {known})") from None


@dataclass(frozen=True)
class Hardware(_Part):
    """The ceilings the run was judged against: the roofs (the one used for verdicts first), the
    datasheet matched and how, and the calibration behind the calibrated roof."""

    datasheet: str | None
    matched: str | None
    device_name: str | None
    calibration: Mapping[str, JSON] | None
    roofs: tuple[RoofRecord, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Hardware:
        return cls(
            data.get("datasheet"),
            data.get("matched"),
            data.get("device_name"),
            data.get("calibration"),
            tuple(RoofRecord.from_dict(r) for r in data.get("roofs") or ()),
        )

    @property
    def emulated(self) -> list[str]:
        """The dtypes the calibration found emulated (far below float32's matmul rate)."""
        flags = (self.calibration or {}).get("emulated") or {}
        return [dtype for dtype, slow in flags.items() if slow]


@dataclass(frozen=True)
class Batch(_Part):
    """The pages run together; ``extra``: a batched request's padding details."""

    size: int = 1
    padding: str | None = None
    extra: Mapping[str, JSON] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Batch:
        return cls(**_known(cls, data), extra=_rest(cls, data))


@dataclass(frozen=True)
class NoteRecord(_Part):
    """A model's note on some ops of a stage (models.interface.OpNote's fields)."""

    stage: str
    ops: tuple[str, ...]
    note: str

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> NoteRecord:
        return cls(data["stage"], tuple(data["ops"]), data["note"])


@dataclass(frozen=True)
class Headline(_Part):
    """The medians of the headline figures and the utilisation of the model's stage groups
    (report.roofline.headline: group → roof label → figures)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    decode_tokens_per_s: float | None = None
    e2e_ms: float | None = None
    tokens_per_s: float | None = None
    pages_per_s: float | None = None
    flop_utilisation_pct: Mapping[str, JSON] | None = None
    bandwidth_utilisation_pct: Mapping[str, JSON] | None = None
    roof_utilisation_pct: Mapping[str, JSON] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Headline:
        return cls(**_known(cls, data))

    def figure(self, name: str) -> float | None:
        """One of :data:`FIGURES`."""
        if name not in FIGURES:
            raise ValueError(f"{name!r} is no headline figure ({', '.join(FIGURES)})")
        return getattr(self, name)


@dataclass(frozen=True)
class StageLayout(_Part):
    """The model's stages: run order, the per-step ones, and the groups the headline sums."""

    order: tuple[str, ...] = ()
    per_step: tuple[str, ...] = ()
    compute_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    bandwidth_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> StageLayout:
        return cls(
            tuple(data.get("order") or ()),
            tuple(data.get("per_step") or ()),
            {g: tuple(s) for g, s in (data.get("compute_groups") or {}).items()},
            {g: tuple(s) for g, s in (data.get("bandwidth_groups") or {}).items()},
        )


@dataclass(frozen=True)
class Stats(_Part):
    """One figure over the timed runs (profiling.timing.summarize): median and spread, in its unit."""

    n: int
    median: float
    mean: float
    min: float
    max: float
    stdev: float
    cv: float | None = None  # stdev / mean; None in a record older than it
    p90: float | None = None  # None below 10 runs
    #: Positions of the runs above outlier_factor times the median; None in a record older than it.
    outliers: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Stats:
        outliers = data.get("outliers")
        return cls(**{**_known(cls, data), "outliers": None if outliers is None else tuple(outliers)})


@dataclass(frozen=True)
class Sample(_Part):
    """One timed run: each stage's ms per call, and its end-to-end figures; ``extra``: the
    OS counters of each stage call (``os``) and fields newer than this type."""

    stages: Mapping[str, tuple[float, ...]]
    e2e_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    pages: int | None = None
    generated_tokens: int | None = None
    decode_tokens: int | None = None
    extra: Mapping[str, JSON] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Sample:
        stages = {name: tuple(calls) for name, calls in (data.get("stages") or {}).items()}
        return cls(**{**_known(cls, data), "stages": stages}, extra=_rest(cls, data))

    @property
    def os(self) -> Mapping[str, JSON]:
        """Per stage, each OS counter's change per call (empty for a run recorded without them)."""
        return self.extra.get("os") or {}

    def stage_ms(self, stage: str) -> float | None:
        """The stage's total over this run, None where it did not run."""
        return sum(self.stages[stage]) if stage in self.stages else None


@dataclass(frozen=True)
class UntilCv(_Part):
    """How profiling.until_cv ended: its ``target`` stdev / mean, the runs taken of at most
    ``max_repeats``, whether every figure got there, and the ``widest`` figure with its ``cv``."""

    target: float
    max_repeats: int
    runs: int
    reached: bool
    widest: str
    cv: float

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> UntilCv:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Timing(_Part):
    """The timing pass: per-run samples, the headline figures' and stages' summaries, and how
    the figures are defined (``tpot``, ``throughput``: words for people)."""

    unit: str = "ms"
    tpot: str | None = None
    throughput: str | None = None
    summary: Mapping[str, Stats | None] = field(default_factory=dict)  # by :data:`FIGURES`
    stages: Mapping[str, Stats] = field(default_factory=dict)
    outlier_factor: float | None = None
    until_cv: UntilCv | None = None
    samples: tuple[Sample, ...] = ()
    #: The OS counters' summaries per stage (``os_stages``), their units (``os_unit``), and
    #: fields newer than this type.
    extra: Mapping[str, JSON] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Timing:
        return cls(
            **{
                **_known(cls, data),
                "summary": {k: _part(Stats, v) for k, v in (data.get("summary") or {}).items()},
                "stages": {k: Stats.from_dict(v) for k, v in (data.get("stages") or {}).items()},
                "until_cv": _part(UntilCv, data.get("until_cv")),
                "samples": tuple(Sample.from_dict(s) for s in data.get("samples") or ()),
                "extra": _rest(cls, data),
            }
        )


@dataclass(frozen=True)
class StageMemoryRecord(_Part):
    """The weights a stage holds and its largest transient (models.interface.StageMemory's fields)."""

    stage: str
    weight_params: int
    weight_bytes: float
    transient: str
    transient_bytes: float

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> StageMemoryRecord:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class AnalyticMemory(_Part):
    """The run's memory from shapes alone (models.interface.Footprint)."""

    total_weight_bytes: float
    kv_cache_bytes: float
    kv_bytes_per_token: float
    logits_bytes: float
    stages: tuple[StageMemoryRecord, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> AnalyticMemory:
        return cls(
            **{**_known(cls, data), "stages": tuple(StageMemoryRecord.from_dict(s) for s in data["stages"])}
        )

    @property
    def largest_transient(self) -> StageMemoryRecord:
        """The stage with the largest transient (the first of equals)."""
        return max(self.stages, key=lambda s: s.transient_bytes)


@dataclass(frozen=True)
class Memory(_Part):
    """Measured memory (figures in bytes and their ``sources``) and the analytic footprint."""

    measured: Mapping[str, JSON] | None = None
    analytic: AnalyticMemory | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Memory:
        return cls(data.get("measured"), _part(AnalyticMemory, data.get("analytic")))


#: The figures of an analytic row (models.interface.Work.as_dict), FLOPs 2 per multiply-add.
WORK_FIELDS = (
    "matmul_flops",
    "useful_matmul_flops",
    "other_flops",
    "useful_other_flops",
    "flops",
    "useful_flops",
    "weight_bytes",
    "act_read_bytes",
    "act_write_bytes",
    "kv_read_bytes",
    "kv_write_bytes",
    "bytes",
)


@dataclass(frozen=True)
class WorkRow:
    """Analytic FLOPs and bytes of a stage over the run (``scope`` "run") or its first step
    ("step"), of one module ``family`` in it, or of a nested range (no scope). Figures an older
    or hand-made record lacks are None."""

    stage: str
    scope: str | None = None
    family: str | None = None
    matmul_flops: float | None = None
    useful_matmul_flops: float | None = None
    other_flops: float | None = None
    useful_other_flops: float | None = None
    flops: float | None = None
    useful_flops: float | None = None
    weight_bytes: float | None = None
    act_read_bytes: float | None = None
    act_write_bytes: float | None = None
    kv_read_bytes: float | None = None
    kv_write_bytes: float | None = None
    bytes: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> WorkRow:
        return cls(**_known(cls, data))

    def to_dict(self) -> dict[str, JSON]:
        head = {"stage": self.stage}
        head |= {} if self.scope is None else {"scope": self.scope}
        head |= {} if self.family is None else {"family": self.family}
        return head | {name: getattr(self, name) for name in WORK_FIELDS}


@dataclass(frozen=True)
class Analytic(_Part):
    """The analytic model of the run: per stage, per family, per nested range; the experts."""

    note: str | None = None
    stages: tuple[WorkRow, ...] = ()
    families: tuple[WorkRow, ...] = ()
    ranges: tuple[WorkRow, ...] = ()
    experts: tuple[Mapping[str, JSON], ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Analytic:
        rows = {
            key: tuple(WorkRow.from_dict(r) for r in data.get(key) or ())
            for key in ("stages", "families", "ranges")
        }
        return cls(data.get("note"), **rows, experts=tuple(data.get("experts") or ()))

    def stage_rows(self, scope: str) -> list[WorkRow]:
        """The stage rows of one scope, "run" (whole run) or "step" (first step of per-step stages)."""
        return [row for row in self.stages if row.scope == scope]


@dataclass(frozen=True)
class Trace(_Part):
    """Where the busy times come from (a trace pass, or Nsight Systems) and its per-range table."""

    path: str
    basis: str
    coverage: float
    total_busy_ms: float
    unattributed_ms: float
    ranges: tuple[Mapping[str, JSON], ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, JSON]) -> Trace:
        return cls(**{**_known(cls, data), "ranges": tuple(data.get("ranges") or ())})


@dataclass(frozen=True)
class RunRecord:
    """Everything about one job (see the module docstring); ``status`` "ok" means every part
    the run measures is there."""

    schema_version: int
    status: str
    error: str | None = None
    config: Mapping[str, JSON] | None = None  # the resolved config
    versions: Versions | None = None
    device: Device | None = None
    hardware: Hardware | None = None
    dtype: str | None = None
    dtype_reason: str | None = None
    weights: str | None = None
    batch: Batch | None = None
    #: The model's facts about its request (Request.describe()), and top-level fields newer than this type.
    request_facts: Mapping[str, JSON] = field(default_factory=dict)
    request: str | None = None  # the same facts in one line
    execution: Mapping[str, JSON] | None = None
    generated_tokens: int | None = None
    op_notes: tuple[NoteRecord, ...] | None = None
    headline: Headline | None = None
    stage_layout: StageLayout | None = None
    timing: Timing | None = None
    memory: Memory | None = None
    routing: Mapping[str, JSON] | None = None
    analytic: Analytic | None = None
    trace: Trace | None = None

    _PARTS = {
        "versions": Versions,
        "device": Device,
        "hardware": Hardware,
        "batch": Batch,
        "headline": Headline,
        "stage_layout": StageLayout,
        "timing": Timing,
        "memory": Memory,
        "analytic": Analytic,
        "trace": Trace,
    }

    @classmethod
    def from_dict(cls, data: JSON, where: str = "run.json") -> RunRecord:
        """The record of a parsed run.json; :class:`UserError` for anything else or another schema."""
        if not isinstance(data, Mapping) or "status" not in data:
            raise UserError(f"{where}: not a run.json of llm_perf_opt (no status field)")
        version = data.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise UserError(
                f"{where}: run.json schema_version {version!r}, this llm_perf_opt reads {SCHEMA_VERSION}"
            )
        try:
            values = _known(cls, data)
            values |= {key: _part(part, data.get(key)) for key, part in cls._PARTS.items() if key in data}
            notes = data.get("op_notes")
            values["op_notes"] = None if notes is None else tuple(NoteRecord.from_dict(n) for n in notes)
            return cls(**values, request_facts=_rest(cls, data))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{where}: malformed run.json ({type(exc).__name__}: {exc})") from None

    def to_dict(self) -> dict[str, JSON]:
        """run.json: the fields in the writer's order, the model's request facts after ``batch``."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "request_facts":
                out |= _plain(self.request_facts)
            else:
                out[f.name] = _plain(getattr(self, f.name))
        return out

    # -- what readers ask of a record -----------------------------------------------------------
    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def cpu(self) -> Mapping[str, JSON]:
        """The host setup of the run (allocator, threads, affinity; empty for a run recorded
        without it), a top-level field kept with the request facts."""
        return self.request_facts.get("cpu") or {}

    @property
    def model_name(self) -> str | None:
        return _dig(self.config, "model", "name")

    @property
    def mode_name(self) -> str | None:
        """The mode's name from ``config.mode`` or, where the mode is part of the model, ``config.model.mode``."""
        return _dig(self.config, "mode", "name") or _dig(self.config, "model", "mode", "name")

    @property
    def batch_size(self) -> int:
        """Pages run together; a record without a batch ran one page at a time."""
        return 1 if self.batch is None else self.batch.size

    @property
    def samples(self) -> tuple[Sample, ...]:
        """The timed runs (none for a run that did not get that far)."""
        return () if self.timing is None else self.timing.samples

    @property
    def notes(self) -> tuple[NoteRecord, ...]:
        return self.op_notes or ()

    def median(self, figure: str) -> float | None:
        """A headline figure (:data:`FIGURES`): the headline's, else the median of ``timing.summary``."""
        value = None if self.headline is None else self.headline.figure(figure)
        if value is not None or self.timing is None:
            return value
        stats = self.timing.summary.get(figure)
        return None if stats is None else stats.median


def _dig(node: JSON, *keys: str) -> JSON:
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def read_json(path: Path) -> JSON:
    """The JSON file at ``path``; :class:`UserError` for one that cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None


def read_record(path: str | Path) -> RunRecord:
    """The run.json at ``path``; :class:`UserError` for a file that cannot be read or is none."""
    path = Path(path)
    return RunRecord.from_dict(read_json(path), str(path))
