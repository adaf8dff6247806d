"""The Hydra callback that ends every multirun with the sweep summary (registered in conf/config.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llm_perf_opt.errors import UserError

from .sweep_summary import write_summary


class SweepSummary(Callback):
    """Writes sweep_summary.md, sweep_summary.csv and sweep.png into the sweep dir once all jobs returned."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            written = write_summary(sweep_dir)
        except UserError as exc:  # e.g. a job dir whose files were damaged: the jobs' own results stand
            print(f"error: no sweep summary: {exc}", file=sys.stderr)
            return
        print(f"[sweep] {written['md']}")
