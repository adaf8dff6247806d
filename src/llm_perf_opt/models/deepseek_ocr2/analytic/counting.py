"""FLOPs and bytes of each stage through the harness's generic stage listener
(`analytic.counted.StageCounter`: per stage call, FlopCounterMode's FLOPs and ByteCounter's
bytes, in total and per aten op), extended with what the footprint needs besides: the largest
tensor each stage writes (its largest transient).

The counted run is the session's own staged generation on a session loaded on the meta device
(`DeepSeekOCR2Session.load` there installs the stand-ins of `models/deepseek_ocr2/meta.py`), so
the stage ranges, the model's code and (with `model.impl=fast`) its fast forwards are the ones
a real run goes through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llm_perf_opt.analytic.counted import StageCounter
from llm_perf_opt.runners.ranges import SEPARATOR


@dataclass(frozen=True)
class Transient:
    """The largest tensor a stage wrote: its op, shape and bytes."""

    op: str = ""
    shape: tuple[int, ...] = ()
    bytes: int = 0


class _LargestWrite(TorchDispatchMode):
    """The largest tensor any op allocates while active (views allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = Transient()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    size = t.numel() * t.element_size()
                    if size > self.largest.bytes:
                        self.largest = Transient(func.overloadpacket.__name__, tuple(t.shape), size)
        return out


class TransientListener:
    """A stage listener keeping, per stage, the largest tensor written in any of its calls
    (`transients`). Alone, it is what the footprint needs before the model is built, at less
    than half the time of a full count."""

    def __init__(self) -> None:
        self.transients: dict[str, Transient] = {}
        self._open: _LargestWrite | None = None

    def stage_entered(self, name: str) -> None:
        if SEPARATOR not in name:
            self._open = _LargestWrite()
            self._open.__enter__()

    def stage_exited(self, name: str) -> None:
        if SEPARATOR in name or self._open is None:
            return
        largest, self._open = self._open, None
        largest.__exit__(None, None, None)
        if largest.largest.bytes > self.transients.get(name, Transient()).bytes:
            self.transients[name] = largest.largest


class TransientStageCounter(StageCounter):
    """The generic stage listener with a TransientListener inside it: its mode opens inside the
    counters' and closes before them."""

    def __init__(self, weights: list[torch.Tensor], kv) -> None:
        super().__init__(weights, kv)
        self._largest = TransientListener()

    @property
    def transients(self) -> dict[str, Transient]:
        return self._largest.transients

    def stage_entered(self, name: str) -> None:
        super().stage_entered(name)
        self._largest.stage_entered(name)

    def stage_exited(self, name: str) -> None:
        self._largest.stage_exited(name)
        super().stage_exited(name)
