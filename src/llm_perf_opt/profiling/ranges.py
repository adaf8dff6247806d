"""Stage names and the ranges that mark them for Nsight (NVTX) and torch.profiler.

Every stage of a run is wrapped in :class:`stage_range`, which opens an NVTX push/pop
range in the :data:`NVTX_DOMAIN` domain (seen by Nsight Systems / Nsight Compute) and a
``torch.profiler.record_function`` (seen by torch.profiler as a ``user_annotation``).
Module-family ranges nested inside a stage are named ``"<stage>/<family>"``
(see :func:`module_range_name`), so trace attribution can tell them apart from
unrelated annotations by name alone.

Cost with no profiler attached (measured on a development CPU): the NVTX push/pop is a
no-op stub (under 0.1 µs) and ``record_function`` costs about 6 µs per range.
:func:`ranges_enabled` turns both off, which the overhead benchmark uses as its baseline.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import nvtx
import torch

PREPROCESS = "preprocess"
SAM = "sam"
CLIP = "clip"
PROJECTOR = "projector"
PREFILL = "prefill"
DECODE = "decode"

#: The stages in the order a run executes them.
STAGES: tuple[str, ...] = (PREPROCESS, SAM, CLIP, PROJECTOR, PREFILL, DECODE)

#: NVTX domain of every range this package opens (``ncu --nvtx-include "llm_perf_opt@prefill/"``).
NVTX_DOMAIN = "llm_perf_opt"

#: Separates the stage from the module family in nested range names.
SEPARATOR = "/"

_enabled = True


def module_range_name(stage: str, family: str) -> str:
    """Name of the range for module family ``family`` inside ``stage``: ``"stage/family"``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if not family or SEPARATOR in family:
        raise ValueError(f"module family must be a non-empty name without {SEPARATOR!r}: {family!r}")
    return f"{stage}{SEPARATOR}{family}"


def is_range_name(name: str, stages: Collection[str] = STAGES) -> bool:
    """Whether ``name`` is one of ``stages`` or a ``"stage/family"`` range inside one."""
    stage, sep, family = name.partition(SEPARATOR)
    return stage in stages and (not sep or (bool(family) and SEPARATOR not in family))


def stage_of(name: str) -> str:
    """The top-level stage of a range name (``"prefill/attn"`` -> ``"prefill"``)."""
    return name.partition(SEPARATOR)[0]


@contextmanager
def ranges_enabled(flag: bool) -> Iterator[None]:
    """Turn all stage ranges on or off inside the block (process-wide, restored on exit)."""
    global _enabled
    previous = _enabled
    _enabled = flag
    try:
        yield
    finally:
        _enabled = previous


@functools.cache
def _nvtx_domain() -> Any:
    # Looked up on first use so that importing this module has no NVTX side effects.
    # Without an attached tool (nsys, ncu) nvtx returns an inert dummy domain whose calls
    # do nothing.
    return nvtx.get_domain(NVTX_DOMAIN)


@functools.cache
def _nvtx_attributes(name: str) -> Any:
    # Registering the message once per name keeps each push to a single C call.
    return _nvtx_domain().get_event_attributes(message=name)


class stage_range:  # noqa: N801 - used like a function: ``with stage_range(PREFILL):``
    """Context manager marking one stage (or ``stage/family``) range for NVTX and torch.profiler.

    Raises ``ValueError`` for a name that is neither a stage nor ``"stage/family"``, so a typo
    cannot silently produce a range that attribution ignores.
    """

    __slots__ = ("_name", "_record")

    def __init__(self, name: str) -> None:
        if not is_range_name(name):
            raise ValueError(f"not a stage range name: {name!r} (stages: {STAGES})")
        self._name = name
        self._record: torch.profiler.record_function | None = None

    def __enter__(self) -> stage_range:
        if _enabled:
            _nvtx_domain().push_range(_nvtx_attributes(self._name))
            self._record = torch.profiler.record_function(self._name)
            self._record.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Close whatever __enter__ opened, even if ranges were switched off in between.
        record, self._record = self._record, None
        if record is not None:
            record.__exit__(exc_type, exc, tb)
            _nvtx_domain().pop_range()


def module_range(stage: str, family: str) -> stage_range:
    """Range for module family ``family`` inside ``stage`` (named by :func:`module_range_name`)."""
    return stage_range(module_range_name(stage, family))
