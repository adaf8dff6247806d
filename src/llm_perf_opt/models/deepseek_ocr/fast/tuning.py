"""The fast paths chosen by measuring their candidates here: this device, dtype and model.

A formulation tuned on one machine can lose on another (the split one-token products: 2.9x
faster than F.linear on a 2-core Zen 4, 1.8x slower on an Intel Xeon with AMX), so each choice
of `paths.FastPaths` is timed on the loaded model's own modules and weights at the shapes of
the run's mode, and the fastest candidate is taken. Every choice has the reference's own
formulation among its candidates, and a fast candidate replaces it only when faster by more
than `TIE` (a tie goes to the reference: it is the faithful one).

The choices are timed in dependency order, each with the winners before it in place:
linear (one-token products; only CPU fp32 has two), few-row products (likewise; timed at
BATCH_ROWS rows, a decode step of a batch), decode experts for one token, then for BATCH_ROWS
tokens, prefill experts, SAM attention (its tile size too), decode form (CUDA graphs only
where the decode experts take no host read). Each candidate runs once untimed, then `REPS`
times interleaved with the others; its figure is the median. Timed on the whole model's
structure where it matters: the linears
of one decoder layer and lm_head; a decode MoE layer per call, in turn over all layers (a
token's experts are never in cache); SAM attention as one global block plus one windowed
block, weighted by how many of each the encoder has; decode as whole steps.

The result is cached beside the calibration (`hardware.calibration.default_cache_dir()/paths`),
one file per device and software fingerprint, dtype, model shapes, mode and forced choices;
`refresh` measures again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llm_perf_opt.hardware.calibration import default_cache_dir, device_key, store_in_cache
from llm_perf_opt.models.kernels.blocked_attention import BIAS_TILE_ELEMENTS
from llm_perf_opt.models.kernels.linear import FastLinear

from ..modes import ModeSpec, image_token_count
from .paths import FastPaths, choose_paths, grouped_mm_without_sync

#: A fast candidate must beat the reference's formulation by more than this fraction.
TIE = 0.05
REPS = 3
#: The reference's own formulation of each choice.
REFERENCE = {
    "linear": "plain",
    "rows": "plain",
    "moe_decode": "looped",
    "moe_batch": "looped",
    "moe_prefill": "looped",
    "sam_attention": "reference",
    "decode": "eager",
}
#: Rows of the few-row choices (`rows`, `moe_batch`): a decode step of this many sequences.
BATCH_ROWS = 8
#: Bias tiles (elements) tried for the blocked SAM attention besides the default.
TILES = (24, BIAS_TILE_ELEMENTS.bit_length() - 1)  # as powers of two: "blocked/2^24"
#: Text tokens assumed beside the image's when sizing prefill (the default prompt has ~10).
TEXT_TOKENS = 16
CACHE_VERSION = 2


@dataclass(frozen=True)
class Choice:
    """One FastPaths field: the option taken, why ("measured", "forced", "only option") and, when
    measured, each candidate's median time in ms."""

    field: str
    chosen: str
    source: str
    times_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        if self.source != "measured":
            return f"{self.field} {self.chosen} ({self.source} here)"
        times = ", ".join(
            f"{name} {ms:,.3g} ms" for name, ms in sorted(self.times_ms.items(), key=lambda kv: kv[1])
        )
        return f"{self.field} {self.chosen} ({times})"


@dataclass(frozen=True)
class TunedPaths:
    """The paths a session runs, and how each was chosen."""

    paths: FastPaths
    choices: tuple[Choice, ...]
    measured_at: str  # ISO 8601, UTC
    seconds: float  # time spent measuring
    cache_file: str | None = None
    cached: bool = False  # read from the cache rather than measured in this process

    def as_dict(self) -> dict[str, Any]:
        return {
            "paths": self.paths.as_dict(),
            "choices": [dataclasses.asdict(c) for c in self.choices],
            "measured_at": self.measured_at,
            "seconds": self.seconds,
            "cache_file": self.cache_file,
            "cached": self.cached,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TunedPaths:
        return cls(
            paths=FastPaths(**data["paths"]),
            choices=tuple(Choice(**c) for c in data["choices"]),
            measured_at=str(data["measured_at"]),
            seconds=float(data["seconds"]),
            cache_file=data.get("cache_file"),
        )

    def notes(self) -> list[str]:
        """One line per choice, for report.md."""
        where = "read from the cache" if self.cached else f"measured in {self.seconds:.1f} s"
        head = f"fast paths chosen on this device at {self.measured_at} ({where}; faster first)"
        return [head, *(c.summary() for c in self.choices)]


def pick(times_ms: Mapping[str, float], reference: str | None, tie: float = TIE) -> str:
    """The fastest candidate, unless the reference's formulation is within `tie` of it."""
    if not times_ms:
        raise ValueError("pick: no candidate was timed")
    best = min(times_ms, key=times_ms.__getitem__)
    if reference in times_ms and times_ms[reference] <= times_ms[best] * (1 + tie):
        return reference
    return best


def tune_paths(
    model,
    mode: ModeSpec,
    forced: Mapping[str, str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
) -> TunedPaths:
    """The cached choice for this model, device, dtype and mode, measured (and stored) on a miss;
    `forced` fixes fields (FastPaths field → option) without measuring them."""
    forced = dict(forced or {})
    device = model.device
    key = _cache_key(model, mode, forced)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / "paths" / f"{device.type}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not refresh:
        cached = _load(path, key)
        if cached is not None:
            return cached
    start = time.perf_counter()
    choices = _measure(model, mode, forced)
    tuned = TunedPaths(
        paths=_paths_of(choices),
        choices=tuple(choices.values()),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - start,
        cache_file=str(path),
    )
    store_in_cache(path, {"version": CACHE_VERSION, "key": key, **tuned.as_dict()}, "fast-path")
    return tuned


def _cache_key(model, mode: ModeSpec, forced: Mapping[str, str]) -> str:
    arch = hashlib.sha256(repr(model.cfg).encode()).hexdigest()[:12]
    return " | ".join(
        [
            device_key(model.device),
            f"dtype {model.dtype}",
            f"arch {arch}",
            f"views {mode.global_size}/{mode.image_size}",
            f"forced {sorted(forced.items())}",
        ]
    )


def _load(path: Path, key: str) -> TunedPaths | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION or data.get("key") != key:
            return None
        return dataclasses.replace(TunedPaths.from_dict(data), cached=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        warnings.warn(f"fast-path cache {path} is unreadable ({exc}); measuring again", stacklevel=3)
        return None


# -- the measurements -------------------------------------------------------------------------


def _paths_of(choices: Mapping[str, Choice]) -> FastPaths:
    fields: dict[str, object] = {}
    for field, choice in choices.items():
        fields.update(_fields(field, choice.chosen))
    return FastPaths(**fields)


@torch.inference_mode()
def _measure(model, mode: ModeSpec, forced: Mapping[str, str]) -> dict[str, Choice]:
    """Each choice in dependency order, the earlier winners fixed in the model meanwhile."""
    device, dtype = model.device, model.dtype
    current = dataclasses.asdict(choose_paths(device, dtype))
    prompt = image_token_count(mode.global_size, mode.image_size, (1, 1)) + TEXT_TOKENS
    grouped = ("grouped",) if grouped_mm_without_sync(device, dtype) else ()
    cpu_fp32 = device.type == "cpu" and dtype == torch.float32
    measured: dict[str, tuple[tuple[str, ...], Callable[[int], Calls]]] = {
        "linear": (("split", "plain") if cpu_fp32 else ("plain",), lambda rep: _linear_calls(model)),
        "rows": (
            ("weight_major", "plain") if cpu_fp32 else ("plain",),
            lambda rep: _linear_calls(model, BATCH_ROWS),
        ),
        "moe_decode": (("one_by_one", "looped", *grouped, "gathered"), lambda rep: _moe_calls(model, 1, rep)),
        "moe_batch": (("one_by_one", "looped", *grouped), lambda rep: _moe_calls(model, BATCH_ROWS, rep)),
        "moe_prefill": ((*grouped, "looped"), lambda rep: _moe_calls(model, prompt, rep)),
        "sam_attention": (
            ("reference", *(f"blocked/2^{t}" for t in TILES), "folded"),
            lambda rep: _sam_calls(model, mode.global_size),
        ),
        "decode": ((), lambda rep: _decode_calls(model, prompt)),
    }
    choices: dict[str, Choice] = {}
    for field, (names, calls) in measured.items():
        if field == "decode":  # a CUDA graph cannot hold experts whose ids are read on the host
            host_read = device.type == "cuda" and current["moe_decode"] in ("looped", "one_by_one")
            names = ("eager", "static") + (("graph",) if device.type == "cuda" and not host_read else ())
        if field in forced:
            choices[field] = Choice(field, forced[field], "forced")
        elif len(names) == 1:
            choices[field] = Choice(field, names[0], "only option")
        else:
            times = _time_candidates(model, current, field, names, calls)
            choices[field] = Choice(field, pick(times, REFERENCE[field]), "measured", times)
        current.update(_fields(field, choices[field].chosen))
    model.use_paths(FastPaths(**current))
    return choices


def _fields(field: str, option: str) -> dict[str, object]:
    """The FastPaths fields of one choice's option ("blocked/2^<n>" sets tiles of 2^n elements)."""
    if field != "sam_attention":
        return {field: option}
    name, _, tile = option.partition("/2^")
    return {"sam_attention": name, "bias_tile_elements": 1 << int(tile) if tile else BIAS_TILE_ELEMENTS}


@dataclass(frozen=True)
class Calls:
    """What one candidate's timing runs: (weight, call) pairs, after `prepare` (untimed)."""

    items: list[tuple[float, Callable[[], Any]]]
    prepare: Callable[[], None] = lambda: None


def _time_candidates(
    model, current: dict, field: str, names, calls_for: Callable[[int], Calls]
) -> dict[str, float]:
    """Median ms of each candidate, the candidates interleaved (a load trend on a shared machine
    hits them all alike); round 0 warms up (page faults, kernel selection, graph capture)."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(REPS + 1):
        for name in names:
            model.use_paths(FastPaths(**{**current, **_fields(field, name)}))
            elapsed = _timed(model.device, calls_for(rep))
            if rep:
                samples[name].append(elapsed)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def _timed(device: torch.device, calls: Calls) -> float:
    """Σ weight · seconds of each call, the device synchronised around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    calls.prepare()
    total = 0.0
    for weight, call in calls.items:
        sync()
        start = time.perf_counter()
        call()
        sync()
        total += weight * (time.perf_counter() - start)
    return total


def _linear_calls(model, rows: int = 1) -> Calls:
    """`rows` tokens through every FastLinear of the first MoE layer, and lm_head."""
    layer = model.model.layers[min(model.moe_layers(), default=0)]
    linears = [m for m in (*layer.modules(), model.lm_head) if isinstance(m, FastLinear)]
    xs = [torch.randn(1, rows, m.in_features, device=model.device, dtype=model.dtype) for m in linears]
    return Calls([(1.0, lambda m=m, x=x: m(x)) for m, x in zip(linears, xs)])


def _moe_calls(model, tokens: int, rep: int) -> Calls:
    """The routed experts of `tokens` random tokens, each with top-k random distinct experts.
    One token: one call per MoE layer (a token's experts are then never in cache); many: one
    layer, another each round."""
    moes = list(model.moe_layers().values())
    if tokens > 1 and moes:
        moes = [moes[rep % len(moes)]]
    lm = model.cfg.lm
    gen = torch.Generator().manual_seed(rep * 1000 + tokens)
    x = torch.randn(tokens, lm.hidden_size, generator=gen).to(model.device, model.dtype)
    experts = torch.rand(tokens, lm.n_routed_experts, generator=gen).argsort(-1)[:, : lm.num_experts_per_tok]
    weights = torch.rand(tokens, lm.num_experts_per_tok, generator=gen).softmax(-1)
    experts, weights = experts.to(model.device), weights.to(model.device, model.dtype)
    return Calls([(1.0, lambda moe=moe: moe.routed(x, weights, experts)) for moe in moes])


def _sam_calls(model, size: int) -> Calls:
    """The attention of one global and one windowed SAM block at the mode's global view, each
    weighted by how many such blocks the encoder has."""
    sam = model.cfg.sam
    blocks = model.model.sam_model.blocks
    g = size // sam.patch_size
    global_blocks = [i for i in range(sam.depth) if i in sam.global_attn_indexes]
    window_blocks = [i for i in range(sam.depth) if i not in sam.global_attn_indexes]
    gen = torch.Generator().manual_seed(size)
    items = []
    for indexes, side in ((global_blocks, g), (window_blocks, min(sam.window_size, g))):
        if indexes:
            views = math.ceil(g / side) ** 2  # windows of the padded grid, or the one global view
            x = torch.randn(views, side, side, sam.width, generator=gen).to(model.device, model.dtype)
            items.append((float(len(indexes)), lambda attn=blocks[indexes[0]].attn, x=x: attn(x)))
    return Calls(items)


def _decode_calls(model, prompt: int) -> Calls:
    """Two decode steps after `prompt` cached positions (zeros: a step's time does not depend on
    what the cache holds)."""
    steps = 2
    cache = model.new_cache(prompt + steps + 1)
    for buffer in cache.keys + cache.values:
        buffer.zero_()
    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)

    def rewind() -> None:
        cache.length = prompt

    return Calls([(1.0, lambda: model.decode_step(token, cache)) for _ in range(steps)], rewind)
