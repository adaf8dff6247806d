"""The Hydra callback that logs each finished job to MLflow: `hydra/callbacks=mlflow`
(conf/hydra/callbacks/mlflow.yaml; pip install "llm-perf-opt[mlflow]").

One MLflow run per job, named after its run dir, in the experiment `experiment`:

* params: the job's resolved config, flattened (`model.name`, `profiling.repeats`, ...);
* metrics: the headline (`ttft_ms`, `tpot_ms`, `decode_tokens_per_s`, `e2e_ms`, the
  utilisation of each stage group, its nested keys joined by dots) and every numeric column
  of every stage (`stage.sam.time_ms`, `stage.decode.calibrated_pct_roof_wall`, ...), as
  stages.json holds them;
* tags: status, model, mode, device, dtype, the git commit, the launch overrides;
* artifacts: every file of the run dir.

Everything is read back from the job's run.json and stages.json, so MLflow gets exactly the
figures the report shows. A job that failed is logged as a FAILED run with its params and
artifacts (run.json says why). A problem with MLflow itself (a server out of reach) is one
`error:` line; the job's own results stay where they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from llm_perf_opt.errors import UserError

from .record import RunRecord, read_record

log = logging.getLogger(__name__)
#: MLflow's limits per log_batch call.
MAX_PARAMS, MAX_METRICS = 100, 1000
#: run.json status -> MLflow run status
RUN_STATUS = {"ok": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class MLflowLogger(Callback):
    def __init__(self, tracking_uri: str = "mlruns", experiment: str = "llm-perf-opt") -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        if urlparse(tracking_uri).scheme in ("", "file"):
            # MLflow 3 refuses a local folder store unless asked: the folder is what this callback
            # offers by default (no database, no server), so the choice of this URI is that ask.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        out_dir = Path(config.hydra.runtime.output_dir)
        record_path = out_dir / "run.json"
        if not record_path.is_file():
            log.error(f"error: mlflow: nothing logged, {record_path} is missing")
            return
        try:
            record = read_record(record_path)
        except UserError as exc:
            log.error(f"error: mlflow: nothing logged, {exc}")
            return
        stages_path = out_dir / "stages.json"
        stages = (
            json.loads(stages_path.read_text(encoding="utf-8"))["stages"] if stages_path.is_file() else []
        )
        try:
            run_id = self._log(out_dir, record, stages, list(config.hydra.overrides.task))
        except (MlflowException, OSError) as exc:
            log.error(f"error: mlflow: {out_dir.name} not logged to {self.tracking_uri}: {_first_line(exc)}")
            return
        log.info(f"[mlflow] {self.tracking_uri} · experiment {self.experiment} · run {run_id}")

    def _log(self, out_dir: Path, record: RunRecord, stages: list[dict], overrides: Sequence[str]) -> str:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
        run = client.create_run(experiment_id, run_name=out_dir.name)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(key, _param_value(value)) for key, value in flatten(record.config or {})]
        metrics = [Metric(key, value, now, 0) for key, value in metrics_of(record, stages)]
        for batch in _batches(params, MAX_PARAMS):
            client.log_batch(run_id, params=batch)
        for batch in _batches(metrics, MAX_METRICS):
            client.log_batch(run_id, metrics=batch)
        client.log_batch(
            run_id, tags=[RunTag(k, str(v)) for k, v in tags_of(record, out_dir, overrides).items()]
        )
        client.log_artifacts(run_id, str(out_dir))
        client.set_terminated(run_id, RUN_STATUS.get(record.status, "FAILED"))
        return run_id


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) pairs of nested dicts; lists are leaves."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.removesuffix("."), node


def metrics_of(record: RunRecord, stages: list[dict]) -> list[tuple[str, float]]:
    """The headline's figures and each stage's numeric columns, finite numbers only (a stage
    without analytic work has no rates: those are null in stages.json and left out here)."""
    pairs = list(flatten(record.headline.to_dict() if record.headline else {}))
    for row in stages:
        pairs += [
            (f"stage.{row['stage']}.{column}", value) for column, value in row.items() if column != "stage"
        ]
    return [(key, float(value)) for key, value in pairs if _is_number(value)]


def tags_of(record: RunRecord, out_dir: Path, overrides: Sequence[str]) -> dict[str, str]:
    tags = {
        "status": record.status,
        "model": record.model_name,
        "mode": record.mode_name,
        "device": None if record.device is None else record.device.name,
        "dtype": record.dtype,
        "git_commit": None if record.versions is None else record.versions.git_commit,
        "overrides": " ".join(overrides),
        "run_dir": str(out_dir),
    }
    return {key: value for key, value in tags.items() if value}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param_value(value: Any) -> str:
    # JSON for lists and null, so a param reads as it would in run.json.
    return value if isinstance(value, str) else json.dumps(value)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
