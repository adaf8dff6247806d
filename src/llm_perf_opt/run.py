"""python -m llm_perf_opt.run [overrides]: compose → session → measurement passes → artifacts.

One job writes into its Hydra run dir. In a multirun (`-m mode=tiny,base`) each job has its
own dir, and a failed job is recorded and reported without stopping the others; the
process exits non-zero if any job failed.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llm_perf_opt.config import Settings, check_group_overrides, register_configs, resolve
from llm_perf_opt.errors import UserError
from llm_perf_opt.profiling.passes import measure
from llm_perf_opt.report.run_report import compact_table, write_artifacts, write_failure
from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

register_configs()
_failed_jobs: list[str] = []


def run_job(settings: Settings, config: dict, out_dir: Path) -> None:
    """One job: everything it measures ends up in out_dir."""
    session = DeepSeekOCRSession.from_config(settings)
    request = session.prepare(settings.image, settings.mode, settings.prompt)
    measurement = measure(
        session,
        request,
        max_new_tokens=settings.max_new_tokens,
        warmup=settings.warmup,
        repeats=settings.repeats,
        trace_path=out_dir / "trace.json" if settings.trace else None,
    )
    written = write_artifacts(out_dir, settings, config, measurement)
    print(f"[{settings.model_name} · {settings.mode.name}] {out_dir}")
    print(compact_table(written["stages"], measurement))


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    settings = None
    try:
        settings = resolve(cfg)
        run_job(settings, config, out_dir)
    except UserError as exc:
        _fail(out_dir, settings, config, "failed", str(exc))
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        _fail(out_dir, settings, config, "interrupted", "interrupted by the user")
        print(f"interrupted: {out_dir / 'run.json'} records it", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # a bug, not a user error: keep the traceback, let other jobs run
        traceback.print_exc()
        _fail(out_dir, settings, config, "failed", f"{type(exc).__name__}: {exc}")


def _fail(out_dir: Path, settings, config: dict, status: str, error: str) -> None:
    _failed_jobs.append(str(out_dir))
    write_failure(out_dir, settings, config, status, error)


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    _main()
    if _failed_jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()
