"""Attribute the time in a torch.profiler Chrome trace (Kineto JSON) to stage ranges.

Rules (launch containment by correlation id, as Nsight Systems and torch.profiler do):

* Ranges are host ``user_annotation`` complete events whose name is a stage or a
  ``"stage/family"`` name (:func:`~llm_perf_opt.runners.ranges.is_range_name`); other
  annotations are ignored. Nesting is time containment on the same pid/tid.
* A CPU op (``cpu_op``) contributes its self time (its duration minus that of the CPU ops
  directly inside it) to the innermost range around it on its thread.
* A device op (``kernel``, ``gpu_memcpy``, ``gpu_memset``) is joined through
  ``args["correlation"]`` to the runtime/driver call that launched it and credited to the
  innermost range around that launch on the launching thread. Where the kernel ran on the
  device does not matter: a kernel that runs after its range closed on the host still
  belongs to that range. Kernels replayed from a CUDA graph share the correlation id of
  their ``cudaGraphLaunch`` and so land in the range around the replay. Launches from a
  thread without stage ranges of its own are unattributed. ``gpu_user_annotation``
  events (device projections of ranges) are not used.
* "Busy" time is device time when the trace holds any device op, else CPU self time.
  Ops outside every range, and device ops whose launch is missing, are unattributed.

Each op is credited to exactly one range instance (its innermost). The per-stage table
reports both ``self_busy_ms`` (only ops whose innermost range has that name) and
``busy_ms`` (inclusive: also ops in ranges nested inside it, e.g. ``prefill`` includes
``prefill/attn``), so ``self_busy_ms`` sums to the attributed total without double counting.

The sweep sorts each thread's host events once and walks them with a stack: O(n log n).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from llm_perf_opt.profiling.trace import trace_events
from llm_perf_opt.runners.ranges import SEPARATOR, is_range_name, stage_of

#: Stage label of time outside every stage range.
UNATTRIBUTED = "(unattributed)"

#: Columns of :attr:`Attribution.stages`.
STAGE_COLUMNS = (
    "stage",
    "range_calls",
    "range_ms",
    "cpu_self_ms",
    "device_ms",
    "busy_ms",
    "self_busy_ms",
    "share",
)
#: Columns of :attr:`Attribution.kernels`.
KERNEL_COLUMNS = ("stage", "name", "calls", "total_ms")

_RANGE_CAT = "user_annotation"
_CPU_OP_CAT = "cpu_op"
_LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver"})
_DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})

# Host event kinds; the values also order events that start together with equal duration
# (a range encloses an op, an op encloses a launch).
_RANGE, _OP, _LAUNCH = 0, 1, 2
_NO_RANGE = -1
_NO_OP = -1


@dataclass(frozen=True)
class Attribution:
    """Stage attribution of one trace. Times are milliseconds.

    ``stages`` has one row per range name seen in the trace, stages in run order, each
    followed by its ``stage/family`` ranges:

    - ``range_calls``: number of range instances (e.g. one ``decode`` per generated token);
    - ``range_ms``: summed host duration of the range instances in the trace pass (enqueue time on a GPU, not device time; not the `host_ms` of the stage table, which is time minus busy);
    - ``cpu_self_ms``: CPU-op self time inside the range, nested ranges included;
    - ``device_ms``: device time of ops launched inside the range, nested ranges included;
    - ``busy_ms``: ``device_ms`` when :attr:`basis` is ``"device"``, else ``cpu_self_ms``;
    - ``self_busy_ms``: busy time whose innermost range is this one (nested ranges excluded);
    - ``share``: ``busy_ms`` / :attr:`total_busy_ms`.

    ``kernels`` has columns ``stage`` (innermost range name, or :data:`UNATTRIBUTED`),
    ``name``, ``calls``, ``total_ms``: device ops on a device trace, CPU ops (self time)
    on a CPU-only trace.
    """

    stages: pd.DataFrame
    kernels: pd.DataFrame
    #: ``"device"`` if busy time is device time, ``"cpu"`` if it is CPU-op self time.
    basis: str
    #: All busy time in the trace, attributed or not.
    total_busy_ms: float
    unattributed_ms: float
    #: Share of busy time credited to some stage range (0..1; 0 for an empty trace).
    coverage: float


@dataclass
class _Sweep:
    """Host-side facts gathered by the sweep; times in microseconds."""

    range_names: list[str]
    range_parents: list[int]
    range_durs: list[float]
    op_names: list[str]
    op_selfs: list[float]
    op_ranges: list[int]
    launch_ranges: dict[Any, int]


def attribute_trace(trace: dict[str, Any] | list[dict[str, Any]], stages: Sequence[str]) -> Attribution:
    """Attribute a parsed Chrome trace (``{"traceEvents": [...]}`` or the event list) to ``stages``.

    ``stages`` lists the known stage names in report order; ranges named ``stage/family``
    for those stages are picked up too.
    """
    known = tuple(stages)
    host, device = _split_events(trace_events(trace), known)
    sweep = _sweep(host)

    n_ranges = len(sweep.range_names)
    range_cpu = [0.0] * n_ranges
    range_dev = [0.0] * n_ranges
    # (innermost range name or UNATTRIBUTED, op name) -> [calls, total µs]
    per_name: defaultdict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    unattributed_cpu = 0.0
    for name, self_us, rng in zip(sweep.op_names, sweep.op_selfs, sweep.op_ranges):
        # Child durations can exceed the parent's by clock rounding; never credit negative time.
        self_us = max(self_us, 0.0)
        if rng == _NO_RANGE:
            unattributed_cpu += self_us
        else:
            range_cpu[rng] += self_us
        if not device:
            _add(per_name, (_label(sweep, rng), name), self_us)
    unattributed_dev = 0.0
    for name, dur, corr in device:
        rng = sweep.launch_ranges.get(corr, _NO_RANGE)
        if rng == _NO_RANGE:
            unattributed_dev += dur
        else:
            range_dev[rng] += dur
        _add(per_name, (_label(sweep, rng), name), dur)

    basis = "device" if device else "cpu"
    total_us = sum(range_dev) + unattributed_dev if device else sum(range_cpu) + unattributed_cpu
    unattributed_us = unattributed_dev if device else unattributed_cpu
    stage_table = _stage_table(sweep, range_cpu, range_dev, basis, total_us, known)
    kernel_table = _kernel_table(per_name, known)
    return Attribution(
        stages=stage_table,
        kernels=kernel_table,
        basis=basis,
        total_busy_ms=total_us / 1e3,
        unattributed_ms=unattributed_us / 1e3,
        coverage=(total_us - unattributed_us) / total_us if total_us > 0 else 0.0,
    )


def _split_events(
    events: list[dict[str, Any]], known: tuple[str, ...]
) -> tuple[dict[tuple[Any, Any], list[tuple]], list[tuple[str, float, Any]]]:
    """Host events per (pid, tid) as ``(ts, dur, kind, name, correlation)``, and device ops
    as ``(name, dur, correlation)``. Events that are not complete events, or lack a start
    time on the host, carry nothing to attribute and are skipped; a missing ``dur`` is 0."""
    host: defaultdict[tuple[Any, Any], list[tuple]] = defaultdict(list)
    device: list[tuple[str, float, Any]] = []
    for ev in events:
        if ev.get("ph") != "X":
            continue
        cat = ev.get("cat")
        name = ev.get("name", "")
        if cat in _DEVICE_CATS:
            device.append((name, _duration(ev), _correlation(ev)))
            continue
        if cat == _CPU_OP_CAT:
            kind = _OP
        elif cat == _RANGE_CAT and is_range_name(name, known):
            kind = _RANGE
        elif cat in _LAUNCH_CATS:
            kind = _LAUNCH
        else:
            continue
        if ev.get("ts") is None:
            continue
        host[(ev.get("pid"), ev.get("tid"))].append(
            (float(ev["ts"]), _duration(ev), kind, name, _correlation(ev))
        )
    return host, device


def _duration(ev: dict[str, Any]) -> float:
    return float(ev.get("dur") or 0.0)


def _correlation(ev: dict[str, Any]) -> Any:
    args = ev.get("args")
    return args.get("correlation") if isinstance(args, dict) else None


def _sweep(host: dict[tuple[Any, Any], list[tuple]]) -> _Sweep:
    """Walk each thread's events in start order, keeping a stack of the open ranges and ops."""
    out = _Sweep([], [], [], [], [], [], {})
    for events in host.values():
        # Start time, then longer first (the encloser before the enclosed), then kind.
        events.sort(key=lambda e: (e[0], -e[1], e[2]))
        # Each entry: (end, innermost range at or above it, innermost op at or above it).
        stack: list[tuple[float, int, int]] = []
        for ts, dur, kind, name, corr in events:
            while stack and stack[-1][0] <= ts:
                stack.pop()
            rng, op = (stack[-1][1], stack[-1][2]) if stack else (_NO_RANGE, _NO_OP)
            if kind == _RANGE:
                stack.append((ts + dur, len(out.range_names), op))
                out.range_names.append(name)
                out.range_parents.append(rng)
                out.range_durs.append(dur)
            elif kind == _OP:
                if op != _NO_OP:
                    out.op_selfs[op] -= dur
                stack.append((ts + dur, rng, len(out.op_names)))
                out.op_names.append(name)
                out.op_selfs.append(dur)
                out.op_ranges.append(rng)
            elif corr is not None:
                out.launch_ranges[corr] = rng
    return out


def _stage_table(
    sweep: _Sweep,
    range_cpu: list[float],
    range_dev: list[float],
    basis: str,
    total_us: float,
    known: tuple[str, ...],
) -> pd.DataFrame:
    """Per range name: calls, host time, and self/inclusive busy time (see :class:`Attribution`)."""
    # Distinct range names from the outermost range down to each instance: an op inside an
    # instance counts once towards each of these names, even if a name repeats in the chain.
    chains: list[tuple[str, ...]] = []
    rows: dict[str, dict[str, float]] = {}
    for i, (name, parent, dur) in enumerate(zip(sweep.range_names, sweep.range_parents, sweep.range_durs)):
        outer = chains[parent] if parent != _NO_RANGE else ()
        chains.append(outer if name in outer else (*outer, name))
        row = rows.setdefault(
            name, dict.fromkeys(("calls", "host", "self_cpu", "self_dev", "cpu", "dev"), 0.0)
        )
        row["calls"] += 1
        if name not in outer:  # a range inside a same-named range would count its host time twice
            row["host"] += dur
        row["self_cpu"] += range_cpu[i]
        row["self_dev"] += range_dev[i]
    for chain, cpu, dev in zip(chains, range_cpu, range_dev):
        for name in chain:
            rows[name]["cpu"] += cpu
            rows[name]["dev"] += dev

    busy, self_busy = ("dev", "self_dev") if basis == "device" else ("cpu", "self_cpu")
    records = [
        {
            "stage": name,
            "range_calls": int(row["calls"]),
            "range_ms": row["host"] / 1e3,
            "cpu_self_ms": row["cpu"] / 1e3,
            "device_ms": row["dev"] / 1e3,
            "busy_ms": row[busy] / 1e3,
            "self_busy_ms": row[self_busy] / 1e3,
            "share": row[busy] / total_us if total_us > 0 else 0.0,
        }
        for name, row in sorted(rows.items(), key=lambda item: range_order(item[0], known))
    ]
    return pd.DataFrame.from_records(records, columns=list(STAGE_COLUMNS))


def _kernel_table(per_name: dict[tuple[str, str], list[float]], known: tuple[str, ...]) -> pd.DataFrame:
    """Calls and total time per (innermost range name, op name), largest first within a stage."""
    records = [
        {"stage": stage, "name": name, "calls": int(calls), "total_ms": total / 1e3}
        for (stage, name), (calls, total) in sorted(
            per_name.items(), key=lambda item: (range_order(item[0][0], known), -item[1][1], item[0][1])
        )
    ]
    return pd.DataFrame.from_records(records, columns=list(KERNEL_COLUMNS))


def _label(sweep: _Sweep, rng: int) -> str:
    return sweep.range_names[rng] if rng != _NO_RANGE else UNATTRIBUTED


def _add(table: dict[Any, list[float]], key: Any, total: float) -> None:
    entry = table[key]
    entry[0] += 1
    entry[1] += total


def range_order(name: str, known: tuple[str, ...]) -> tuple[int, bool, str]:
    """Sort key: stages in ``known`` order, each before its ``stage/family`` ranges; anything else last."""
    stage = stage_of(name)
    position = known.index(stage) if stage in known else len(known)
    return position, SEPARATOR in name, name
