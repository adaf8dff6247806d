"""Stage ranges: the one source of stage events.

A session wraps each stage of a request in :class:`stage_range`, which opens

* an NVTX push/pop range in the :data:`NVTX_DOMAIN` domain (seen by Nsight Systems / Compute),
* a ``torch.profiler.record_function`` (seen by torch.profiler as a ``user_annotation``),
* an entry on a context-variable stack that :func:`current_stage` reads, and
* a call to every listener attached with :func:`listening` (timers, routing recorders).

Ranges nested inside a stage are named ``"<stage>/<family>"`` (:func:`module_range_name`), so
trace attribution tells them from unrelated annotations by name alone.

Cost with no profiler attached (measured on a development CPU): the NVTX push/pop is a no-op
stub (under 0.1 µs) and ``record_function`` about 6 µs per range. :func:`ranges_enabled`
turns NVTX and record_function off (listeners still hear every stage), which the overhead
benchmark uses as its baseline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Protocol

import nvtx
import torch

#: NVTX domain of every range this package opens (``ncu --nvtx-include "llm_perf_opt@prefill/"``).
NVTX_DOMAIN = "llm_perf_opt"

#: Separates the stage from the module family in nested range names.
SEPARATOR = "/"


class StageListener(Protocol):
    """Hears every range a session opens and closes, nested ``stage/family`` ranges included."""

    def stage_entered(self, name: str) -> None: ...

    def stage_exited(self, name: str) -> None: ...


_open: ContextVar[tuple[str, ...]] = ContextVar("llm_perf_opt_open_ranges", default=())
_listeners: list[StageListener] = []
_enabled = True


def module_range_name(stage: str, family: str) -> str:
    """Name of the range for module family ``family`` inside ``stage``: ``"stage/family"``."""
    if not stage or SEPARATOR in stage:
        raise ValueError(f"stage must be a non-empty name without {SEPARATOR!r}: {stage!r}")
    if not family or SEPARATOR in family:
        raise ValueError(f"module family must be a non-empty name without {SEPARATOR!r}: {family!r}")
    return f"{stage}{SEPARATOR}{family}"


def is_range_name(name: str, stages: tuple[str, ...] | frozenset[str]) -> bool:
    """Whether ``name`` is one of ``stages`` or a ``"stage/family"`` range inside one."""
    stage, sep, family = name.partition(SEPARATOR)
    return stage in stages and (not sep or (bool(family) and SEPARATOR not in family))


def stage_of(name: str) -> str:
    """The top-level stage of a range name (``"prefill/attn"`` -> ``"prefill"``)."""
    return name.partition(SEPARATOR)[0]


def current_stage() -> str | None:
    """The stage whose range is open here (the outermost open range), or None outside every stage."""
    stack = _open.get()
    return stage_of(stack[0]) if stack else None


@contextmanager
def listening(*listeners: StageListener) -> Iterator[None]:
    """Let ``listeners`` hear every range opened inside the block; they are detached on exit."""
    _listeners.extend(listeners)
    try:
        yield
    finally:
        for listener in listeners:
            _listeners.remove(listener)


@contextmanager
def ranges_enabled(flag: bool) -> Iterator[None]:
    """Turn NVTX and record_function ranges on or off inside the block (process-wide, restored on exit)."""
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
    # Without an attached tool (nsys, ncu) nvtx returns an inert domain whose calls do nothing.
    return nvtx.get_domain(NVTX_DOMAIN)


@functools.cache
def _nvtx_attributes(name: str) -> Any:
    # Registering the message once per name keeps each push to a single C call.
    return _nvtx_domain().get_event_attributes(message=name)


class stage_range:  # noqa: N801 - used like a function: ``with stage_range("prefill"):``
    """Context manager marking one stage (or ``stage/family``) range; see the module docstring.

    Listeners hear the entry after the profiler ranges are open and the exit before they close,
    so a timer listening here times exactly what the ranges enclose.
    """

    __slots__ = ("_name", "_record", "_token")

    def __init__(self, name: str) -> None:
        stage, sep, family = name.partition(SEPARATOR)
        if not stage or (sep and not family) or SEPARATOR in family:
            raise ValueError(f"not a stage range name: {name!r} (use 'stage' or 'stage/family')")
        self._name = name
        self._record: torch.profiler.record_function | None = None

    def __enter__(self) -> stage_range:
        if _enabled:
            _nvtx_domain().push_range(_nvtx_attributes(self._name))
            self._record = torch.profiler.record_function(self._name)
            self._record.__enter__()
        self._token = _open.set((*_open.get(), self._name))
        for listener in tuple(_listeners):
            listener.stage_entered(self._name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for listener in tuple(_listeners):
                listener.stage_exited(self._name)
        finally:
            _open.reset(self._token)
            # Close whatever __enter__ opened, even if ranges were switched off in between.
            record, self._record = self._record, None
            if record is not None:
                record.__exit__(exc_type, exc, tb)
                _nvtx_domain().pop_range()


def module_range(stage: str, family: str) -> stage_range:
    """Range for module family ``family`` inside ``stage`` (named by :func:`module_range_name`)."""
    return stage_range(module_range_name(stage, family))
