"""The jobs behind a path: a run dir, a sweep dir of job dirs, or a run.json file.

A job is identified across sweeps by its model name, its mode name and the overrides it was
launched with (``.hydra/overrides.yaml`` next to its run.json). Hydra's own settings
(``hydra.*``, ``hydra/...``: output paths, launcher) are left out, and so are the ``model`` and
``mode`` group choices, whose resolved names are already part of the identity: a job launched
with ``mode=tiny`` and one that got ``tiny`` as the default are the same job.

A job dir whose run.json is missing (the process was killed before it wrote one) still has
Hydra's ``.hydra/config.yaml``; it becomes a job with status :data:`MISSING`, so a sweep that
lost a job reports it instead of silently comparing fewer jobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from llm_perf_opt.errors import UserError

from .record import SCHEMA_VERSION, RunRecord, read_record

RUN_JSON = "run.json"
HYDRA_DIR = ".hydra"
#: Status of a job dir that has Hydra's files but no run.json.
MISSING = "missing"

# Override keys whose resolved value is part of the identity anyway; "model/mode" is where
# the mode group lives if it moves under the model.
_NAMED_GROUPS = frozenset({"model", "mode", "model/mode"})


@dataclass(frozen=True)
class JobIdentity:
    """What pairs a job of one sweep with the same job of another."""

    model: str
    mode: str
    overrides: tuple[str, ...]

    def __str__(self) -> str:
        return " · ".join((self.model, self.mode, *self.overrides))


@dataclass(frozen=True)
class Job:
    """One job: its run.json record and identity; ``path`` is the run.json, or the job dir
    where there is none. ``overrides`` are the ones it was launched with, in launch order,
    without Hydra's own."""

    path: Path
    record: RunRecord
    identity: JobIdentity
    overrides: tuple[str, ...] = ()

    @property
    def dir(self) -> Path:
        """The job dir (the run dir of a single run)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def error(self) -> str | None:
        return self.record.error


@dataclass(frozen=True)
class RunSet:
    """The jobs found at ``path``: one for a run dir or run.json file, all job dirs of a sweep."""

    path: Path
    jobs: tuple[Job, ...]
    sweep: bool


def load_run_set(path: str | Path, *, distinct: bool = True) -> RunSet:
    """Read a run.json file, a run dir (holding run.json) or a sweep dir (whose subdirs are jobs).

    With ``distinct`` (what pairing jobs needs) two jobs of a sweep with the same identity are
    refused; without it they are listed as they are.
    """
    path = Path(path)
    if path.is_file():
        return RunSet(path, (_load_job(path.parent, path),), sweep=False)
    if not path.is_dir():
        raise UserError(f"{path}: no such run dir, sweep dir or run.json")
    if (path / RUN_JSON).is_file():
        return RunSet(path, (_load_job(path, path / RUN_JSON),), sweep=False)
    job_dirs = sorted(
        (d for d in path.iterdir() if (d / RUN_JSON).is_file() or (d / HYDRA_DIR / "config.yaml").is_file()),
        key=_job_order,
    )
    if not job_dirs:
        raise UserError(f"{path}: no {RUN_JSON} in it or in any of its subdirectories")
    jobs = tuple(_load_job(d, d / RUN_JSON) for d in job_dirs)
    seen: dict[JobIdentity, Path] = {}
    for job in jobs if distinct else ():
        if job.identity in seen:
            raise UserError(
                f"{path}: jobs {seen[job.identity].parent.name} and {job.path.parent.name} have the same identity "
                f"({job.identity})"
            )
        seen[job.identity] = job.path
    return RunSet(path, jobs, sweep=True)


def job_identity(record: RunRecord, overrides: list[str]) -> JobIdentity:
    """Identity of a job from its record and its launch overrides (see the module docstring)."""
    kept = sorted(o for o in overrides if not _is_ignored_override(o) and not _is_group_choice(o))
    return JobIdentity(record.model_name or "?", record.mode_name or "?", tuple(kept))


def _is_ignored_override(override: str) -> bool:
    """Hydra's own settings: where outputs go, which launcher runs the jobs."""
    key = _override_key(override)
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _is_group_choice(override: str) -> bool:
    return _override_key(override) in _NAMED_GROUPS


def _override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0].strip()


def _load_job(job_dir: Path, run_json: Path) -> Job:
    hydra = job_dir / HYDRA_DIR
    if run_json.is_file():
        record, path = read_record(run_json), run_json
    else:
        config = OmegaConf.to_container(OmegaConf.load(hydra / "config.yaml"), resolve=False)
        record = RunRecord(SCHEMA_VERSION, MISSING, f"no {RUN_JSON} (killed before it finished?)", config)
        path = job_dir
    overrides_file = hydra / "overrides.yaml"
    loaded = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    overrides = [str(o) for o in loaded]
    launched = tuple(o for o in overrides if not _is_ignored_override(o))
    return Job(path, record, job_identity(record, overrides), launched)


def _job_order(job_dir: Path) -> tuple[float, str]:
    """Hydra names sweep job dirs ``<job number>_...``: sort by that number, then by name."""
    number = job_dir.name.partition("_")[0]
    return (int(number) if number.isdigit() else math.inf, job_dir.name)
