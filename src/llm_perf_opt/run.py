"""python -m llm_perf_opt.run [overrides]: compose → build the model → session → measure → report.

One job writes into its Hydra run dir. In a multirun (`-m mode=tiny,base`) each job has its
own dir, and a failed job is recorded and reported without stopping the others; the process
exits non-zero if any job failed. Mistakes a user can fix are one `error:` line, found
before anything is built where possible: the overrides of every job of a sweep are composed
and validated first, the output folder is checked, and the request is prepared and checked
against the context window and the machine's memory before the weights are built.
"""

# ruff: noqa: E402 - a signal during the imports below (seconds, torch's) must be one line too.
from __future__ import annotations

import sys

from llm_perf_opt import allocator, signals

if __name__ == "__main__":
    signals.quiet_start()
    # Before torch loads: the allocator is read by the loader and glibc when a process starts.
    allocator.start_or_exit(sys.argv[1:], sys.argv[1:])

import gc
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from llm_perf_opt.atomic import storage_fault
from llm_perf_opt.cli import checked_argv
from llm_perf_opt.config import CONFIG_NAME, RunConfig, register_configs, validate
from llm_perf_opt.errors import UserError
from llm_perf_opt.hardware.calibration import cached_calibration
from llm_perf_opt.hardware.ceilings import select
from llm_perf_opt.hardware.device import resolve_device
from llm_perf_opt.hardware.host import HostSetup, host_setup, using_threads
from llm_perf_opt.hardware.memory_check import (
    available_memory_bytes,
    check_fits,
    release_freed_memory,
    tensor_bytes,
)
from llm_perf_opt.hardware.precision import DtypeChoice, choose_dtype, header_text
from llm_perf_opt.models.interface import AnalyticModel, Footprint, ModelSession, SessionOptions
from llm_perf_opt.models.pages import batch_pages
from llm_perf_opt.profiling.passes import RunInputs, measure
from llm_perf_opt.report.markdown import compact_table
from llm_perf_opt.report.run_record import Hardware, Job
from llm_perf_opt.report.run_report import write_artifacts, write_failure

register_configs()
_failed_jobs: list[str] = []
_started_jobs: list[str] = []
#: torch.profiler's own suffix for a Chrome trace, which Perfetto and HolisticTraceAnalysis read.
TRACE_FILE = "trace.pt.trace.json"
log = logging.getLogger(__name__)
# What a job found, on stdout (the status lines go to stderr); both in run.log (conf/hydra/job_logging/).
results = logging.getLogger("llm_perf_opt.results")


def run_job(run: RunConfig, config: dict, out_dir: Path) -> None:
    """One job: everything it measures ends up in out_dir."""
    host = host_setup(run.cpu.allocator, run.cpu.threads)
    with using_threads(host.threads):
        _run_job(run, config, out_dir, host)


def _run_job(run: RunConfig, config: dict, out_dir: Path, host: HostSetup) -> None:
    device = resolve_device(run.device)
    dtype = choose_dtype(run.dtype, device)
    if dtype.warning:
        log.warning(f"warning: {dtype.warning}")
    session: ModelSession = get_class(type(run.model).session)(
        run.model, SessionOptions(device, dtype.dtype, run.seed, run.stops_at_eos)
    )
    analytic: AnalyticModel = get_class(type(run.model).analytic)(run.model)
    inputs = RunInputs(batch_pages(run.images, run.image, run.batch_size), run.prompt, run.max_new_tokens)
    if run.batch_size > 1:
        # Preparing a batch allocates every page's pixels, before its footprint can be asked:
        # check first with one page's, scaled to the batch.
        page = session.prepare(inputs.images[0], inputs.prompt)
        one = analytic.footprint(page, inputs.max_new_tokens, _dtype_name(dtype))
        check_memory(run, one, dtype, device, scale=run.batch_size, page_bytes=tensor_bytes(page))
    request = session.prepare_batch(inputs.images, inputs.prompt)
    session.check(request, inputs.max_new_tokens)
    footprint = analytic.footprint(request, inputs.max_new_tokens, _dtype_name(dtype))
    check_memory(run, footprint, dtype, device)
    log.info(
        f"[{run.model.name}] {device} · {header_text(dtype)} · {host.in_force} allocator, {host.threads} threads"
    )
    hardware = Hardware(select(run.hardware.name, device), cached_calibration(device))
    if hardware.selection.warning:
        log.warning(f"warning: {hardware.selection.warning}")
    session.load()
    m = measure(
        session,
        inputs,
        warmup=run.profiling.warmup,
        repeats=run.profiling.repeats,
        trace_path=out_dir / TRACE_FILE if run.profiling.trace else None,
        module_ranges=run.profiling.granularity == "module",
        profiler_options=run.profiling.profiler_options(),
        until_cv=run.profiling.until_cv,
        max_repeats=run.profiling.max_repeats,
    )
    execution = session.execution()
    stage_model = analytic.stage_model(m.request, m.decode_steps, _dtype_name(dtype), m.routing, execution)
    footprint = analytic.footprint(m.request, inputs.max_new_tokens, _dtype_name(dtype), execution)
    job = Job(
        run,
        config,
        m,
        stage_model,
        footprint,
        device,
        dtype,
        hardware,
        type(session).compute_groups,
        type(session).bandwidth_groups,
        execution,
        session.op_notes(),
        host,
    )
    written = write_artifacts(out_dir, job)
    results.info(f"[{run.model.name}] {out_dir}")
    results.info(compact_table(written["stages"], written["record"]))


def check_memory(
    run: RunConfig, footprint: Footprint, dtype: DtypeChoice, device, *, scale: int = 1, page_bytes: int = 0
) -> None:
    """Refuse, in one line, a run whose weights, KV cache and largest transient cannot fit here;
    for a batch, name the largest batch that would. With `scale`, the footprint is one page's
    and what grows with the batch is taken `scale` times; `page_bytes` is one prepared page's
    tensors, held twice in a batch (each page's own, and the batch's stacked copy)."""
    transient = footprint.largest_transient
    parts = {
        "weights": int(footprint.total_weight_bytes),
        "KV cache": int(footprint.kv_cache_bytes) * scale,
        f"largest transient ({transient.stage})": int(transient.transient_bytes) * scale,
    }
    if page_bytes:
        parts["the pages' pixels and ids"] = 2 * page_bytes * run.batch_size
    available = available_memory_bytes(device)
    if available is None:  # nothing here tells; the run goes ahead
        return
    suggestions = (["dtype=bfloat16"] if dtype.dtype.itemsize > 2 else []) + ["a smaller model= option"]
    if run.batch_size > 1:
        fits = largest_batch(
            run.batch_size, parts["weights"], sum(parts.values()) - parts["weights"], available
        )
        suggestions.insert(0, f"batch_size<={fits}" if fits else "batch_size=1")
    check_fits(
        int(sum(parts.values())),
        available,
        what=f"{run.model.name} at batch {run.batch_size}" if run.batch_size > 1 else run.model.name,
        dtype_name=_dtype_name(dtype),
        breakdown=parts,
        suggestions=suggestions,
    )


def largest_batch(batch: int, fixed_bytes: int, batch_bytes: int, available: int) -> int:
    """The largest batch whose memory fits in `available`, taking what grows with the batch (KV
    cache, transients: `batch_bytes` at `batch`) as proportional to it, the weights as fixed."""
    per_page = batch_bytes / batch
    return max(0, min(batch, int((available - fixed_bytes) // per_page))) if per_page else batch


def _dtype_name(choice: DtypeChoice) -> str:
    return str(choice.dtype).removeprefix("torch.")


@hydra.main(version_base="1.3", config_path="conf", config_name=CONFIG_NAME)
def _main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    _started_jobs.append(str(out_dir))
    try:
        run_job(validate(cfg), config, out_dir)
    except UserError as exc:
        _fail(out_dir, config, "failed", str(exc))
        log.error(f"error: {exc}")
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (llm_perf_opt.signals)
        _fail(out_dir, config, "interrupted", signals.cause(exc))
        log.error(f"interrupted: {out_dir / 'run.json'} records it")
        raise SystemExit(signals.exit_code(exc)) from None
    except Exception as exc:
        full = storage_fault(exc)
        if full:  # the disk's state, not a bug: one line
            log.error(f"error: {full}")
            _fail(out_dir, config, "failed", full)
        else:  # a bug, not a user error: keep the traceback, let other jobs run
            log.exception(f"the job failed: {type(exc).__name__}: {exc}")
            _fail(out_dir, config, "failed", f"{type(exc).__name__}: {exc}")
    finally:
        # The finished job's model sits in reference cycles (frames kept by the plotting code);
        # free it now, and hand the freed heap back to the OS, or the next job of a sweep would
        # see its memory as taken.
        gc.collect()
        release_freed_memory()


def _fail(out_dir: Path, config: dict, status: str, error: str) -> None:
    _failed_jobs.append(str(out_dir))
    try:
        write_failure(out_dir, config, status, error)
    except OSError as exc:
        full = storage_fault(exc)
        if not full:
            raise
        log.error(f"error: run.json could not record it either: {full}")


def main() -> None:
    _failed_jobs.clear()
    _started_jobs.clear()
    with signals.terminate_as_interrupt():
        try:
            sys.argv[1:] = checked_argv(sys.argv[1:])
            _main()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as exc:  # while Hydra composes or between jobs: no job to record
            done = f"{len(_started_jobs)} job(s) finished before" if _started_jobs else "no job started"
            print(f"{signals.cause(exc)}: {done}", file=sys.stderr)
            sys.exit(signals.exit_code(exc))
    if _failed_jobs:
        sys.exit(1)


if __name__ == "__main__":
    signals.started()
    main()
