"""What a run's stages cost at best on hardware it did not run on: per stage and device, the
compute and bandwidth floors of the run's analytic work (issue 29, the floors of step 1; the
launch floor and the estimates come next).

    floors = stage_floors(record, {"h100_sxm": datasheet_roof("h100_sxm"), ...})

With F the stage's useful FLOPs over the run and B its bytes (run.json ``analytic.stages``,
scope "run"), P the device's peak FLOP/s in the run's dtype and W its memory bandwidth::

    compute_ms = F / P · 1e3        bandwidth_ms = B / W · 1e3        floor_ms = max of the two

The stage cannot run faster than ``floor_ms`` on that device; ``bound`` names the larger floor
(``compute`` on a tie). The work is the run's own: its batch, mode, dtype and generated tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from .record import RunRecord
from .roofline import RoofLike

#: Columns of :func:`stage_floors`.
FLOOR_COLUMNS = ("device", "stage", "flops", "bytes", "compute_ms", "bandwidth_ms", "floor_ms", "bound")


def stage_floors(record: RunRecord, roofs: Mapping[str, RoofLike]) -> pd.DataFrame:
    """One row per device of ``roofs`` (by name, in their order) and stage with analytic work
    (in the record's order): the floors of the module docstring."""
    rows = []
    for device, roof in roofs.items():
        peak, bandwidth = roof.peak(record.dtype), roof.byte_s
        for work in record.analytic.stage_rows("run"):
            compute_ms = work.useful_flops / peak * 1e3
            bandwidth_ms = work.bytes / bandwidth * 1e3
            rows.append(
                {
                    "device": device,
                    "stage": work.stage,
                    "flops": work.useful_flops,
                    "bytes": work.bytes,
                    "compute_ms": compute_ms,
                    "bandwidth_ms": bandwidth_ms,
                    "floor_ms": max(compute_ms, bandwidth_ms),
                    "bound": "compute" if compute_ms >= bandwidth_ms else "memory",
                }
            )
    return pd.DataFrame(rows, columns=list(FLOOR_COLUMNS))
