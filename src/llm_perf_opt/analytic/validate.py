"""python -m llm_perf_opt.analytic.validate: a model's analytic FLOPs (or bytes) against a count.

The count is of the costs its meta-device model runs through the session's own `generate`.

For every check case of the model (its analytic model's `check_cases`; DeepSeek-OCR: every
mode, and gundam at 1x2, 2x2, 2x3 and 3x3 tiles), the model's own session builds the full-size
model on the meta device (shapes only: no memory, no arithmetic) and runs its own `generate`
(the first token and DECODE_STEPS decode steps) under `analytic.counted`, which counts each
stage range's FLOPs (FlopCounterMode) and bytes (ByteCounter): the stages are the session's, so
the stage sequence is written once, in the session. The analytic model gets the same request,
the routing the meta run fed (an even split, see `interface.even_split`) and the way the
session ran (`ModelSession.execution`), and per stage, over the run and for the first step of
each per-step stage:

* (default) its *executed* matmul FLOPs must agree with the count within TOLERANCE, and so must
  the model's published figures (its analytic model's `reference_checks`, if any);
* with --bytes, its bytes must equal the count: total and activation bytes within
  BYTES_TOLERANCE (float rounding in the analytic sums), weight and KV bytes exactly;
* with --bytes --impl fast, the same for the cases of the fast implementation (DeepSeek-OCR:
  every path set that runs on meta); its FLOPs are the reference's, the useful work.

--model picks the model (a `model` config option). Prints the tables and exits 1 on any
disagreement, 2 on bad arguments.

The byte count's rules are in analytic/byte_count.py; the one convention it adopts from the
analytic formulas: scaled-dot-product attention is one fused kernel that never writes its score
matrix (torch decomposes it on meta). FLOP formulas: on meta SDPA decomposes into aten.bmm,
which FlopCounterMode counts; on real CPU tensors it runs a kernel torch has no formula for,
which `counted.flop_counter()` adds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from hydra.utils import get_class
from PIL import Image

from llm_perf_opt.analytic.counted import CountedRun, count_run
from llm_perf_opt.config import RunConfig, group_options, load
from llm_perf_opt.errors import OneLineParser, UserError
from llm_perf_opt.models.interface import AnalyticModel, CheckCase, ModelSession, SessionOptions, StageCosts

TOLERANCE = 0.01
#: Decode steps run per case: the first is checked alone, both together as the run.
DECODE_STEPS = 2
GIGA = 1e9
#: Total and activation bytes: the analytic formulas follow eager execution op for op, so they
#: must equal the count; this only absorbs float rounding in the analytic sums (terms like 5.5*n,
#: the mean decode context). Anything looser would hide a forgotten copy: one copy of one
#: activation in one SAM block is ~0.1% of the stage. Weight and KV bytes are compared exactly.
BYTES_TOLERANCE = 1e-9
BYTES_NOTE = (
    "counted: every aten op reads its tensor inputs and writes its outputs once; views, metadata ops and\n"
    "uninitialised allocations are free; weights and KV-cache buffers are told apart by storage.\n"
    "Both sides count SDPA as one fused kernel (q, k, v and mask read, output written, no score matrix):\n"
    "on meta torch decomposes it into bmm + softmax + bmm writing the scores, so the counter takes the call\n"
    "before the decomposition. Everything else is counted as it runs in the session's stage ranges, and the\n"
    "analytic formulas follow it. Routed experts: those the meta run fed (an even split), given to the\n"
    "analytic model as observed routing."
)
DTYPE = torch.bfloat16


def analytic_model(run: RunConfig) -> AnalyticModel:
    return get_class(type(run.model).analytic)(run.model)


def cases(model: str = "deepseek_ocr", impl: str = "reference") -> list[CheckCase]:
    """The model's check cases for `impl`, or the config as composed where it names none."""
    analytic = analytic_model(load([f"model={model}"]))
    if not hasattr(analytic, "check_cases"):
        return [CheckCase(model)]
    return analytic.check_cases(impl)


def meta_session(run: RunConfig) -> ModelSession:
    """The run's session with its model built on the meta device, in bf16."""
    session: ModelSession = get_class(type(run.model).session)(
        run.model, SessionOptions(torch.device("meta"), DTYPE)
    )
    session.load()
    return session


def blank_page(folder: Path, size: tuple[int, int]) -> Path:
    path = folder / f"blank_{size[0]}x{size[1]}.png"
    if not path.exists():
        Image.new("RGB", size, "white").save(path)
    return path


def count_case(
    run: RunConfig, session: ModelSession, case: CheckCase, folder: Path
) -> tuple[StageCosts, CountedRun, int]:
    """The analytic and the counted costs of one case on its meta session, and its prompt tokens
    (a batch: per sequence). A case's `batch_size=N` override runs N copies of its page."""
    image = None if case.image_size is None else blank_page(folder, case.image_size)
    request = session.prepare_batch((image,) * run.batch_size, run.prompt)
    counted = count_run(session, request, DECODE_STEPS + 1)
    costs = analytic_model(run).stage_model(
        request, DECODE_STEPS, str(DTYPE).removeprefix("torch."), counted.routing, session.execution()
    )
    return costs, counted, request.prompt_tokens


def _pairs(costs: StageCosts, counted: CountedRun, session: ModelSession):
    """(stage, scope, analytic Work or None, counted StageCount or None) for every stage the
    analytic model or the count has: the run, and the first step of per-step stages."""
    per_step = {s.name for s in session.stages if s.per_step}
    stages = list(costs.stages) + [s for s in counted.calls if s not in costs.stages]
    for stage in stages:
        count = counted.total(stage) if stage in counted.calls else None
        yield stage, "run", costs.stages.get(stage), count
        if stage in per_step:
            first = counted.calls[stage][0] if stage in counted.calls else None
            yield stage, "step", costs.steps.get(stage), first


def _rel(analytic: float, counted: float) -> float:
    return abs(analytic - counted) / abs(counted) if counted else abs(analytic)


def flop_rows(
    case: CheckCase, prompt_tokens: int, costs: StageCosts, counted: CountedRun, session
) -> list[dict]:
    """Analytic executed matmul GFLOPs against the count, per stage and scope."""
    rows = []
    for stage, scope, work, count in _pairs(costs, counted, session):
        analytic = float("nan") if work is None else work.matmul_flops
        flops = float("nan") if count is None else count.flops
        err = _rel(analytic, flops)
        rows.append(
            {
                "case": case.name,
                "S": prompt_tokens,
                "stage": stage,
                "scope": scope,
                "analytic": analytic / GIGA,
                "flopcounter": flops / GIGA,
                "useful": float("nan") if work is None else work.useful_matmul_flops / GIGA,
                "rel_err": err,
                "ok": err <= TOLERANCE,
            }
        )
    return rows


def byte_rows(
    case: CheckCase, prompt_tokens: int, costs: StageCosts, counted: CountedRun, session
) -> list[dict]:
    """Analytic bytes against the count per stage and scope (GB; weights in MB): total and
    activation bytes within BYTES_TOLERANCE, weight and KV bytes equal."""
    rows = []
    for stage, scope, work, count in _pairs(costs, counted, session):
        if work is None or count is None:
            rows.append({"case": case.name, "S": prompt_tokens, "stage": stage, "scope": scope, "ok": False})
            continue
        moved = count.bytes
        err = _rel(work.bytes, moved.bytes)
        act_err = max(
            _rel(work.act_read_bytes, moved.act_read_bytes), _rel(work.act_write_bytes, moved.act_write_bytes)
        )
        weights = work.weight_bytes == moved.weight_bytes
        kv = (work.kv_read_bytes, work.kv_write_bytes) == (moved.kv_read_bytes, moved.kv_write_bytes)
        rows.append(
            {
                "case": case.name,
                "S": prompt_tokens,
                "stage": stage,
                "scope": scope,
                "analytic_GB": work.bytes / GIGA,
                "counted_GB": moved.bytes / GIGA,
                "rel_err": err,
                "act_err": act_err,
                "weight_MB": moved.weight_bytes / 1e6,
                "weights_equal": weights,
                "kv_equal": kv,
                "ok": err <= BYTES_TOLERANCE and act_err <= BYTES_TOLERANCE and weights and kv,
            }
        )
    return rows


def compare(model: str, impl: str = "reference", bytes_: bool = False) -> pd.DataFrame:
    """The FLOP (or byte) comparison of every check case of `model` for `impl`. Consecutive cases
    of the same model config share one meta session (building a full-size model takes seconds
    even there)."""
    rows: list[dict] = []
    sessions: dict[object, ModelSession] = {}
    with tempfile.TemporaryDirectory(prefix="llm_perf_opt_validate_") as folder:
        for case in cases(model, impl):
            run = load([f"model={model}", *case.overrides])
            key = repr(run.model)  # the batch is the request's: batches of a mode share its model
            if key not in sessions:
                sessions.clear()  # one full-size meta model at a time
                sessions[key] = meta_session(run)
            session = sessions[key]
            costs, counted, tokens = count_case(run, session, case, Path(folder))
            rows += (byte_rows if bytes_ else flop_rows)(case, tokens, costs, counted, session)
    return pd.DataFrame(rows)


def references(model: str) -> pd.DataFrame:
    """The model's published figures (its analytic model's `reference_checks`), if it has any."""
    analytic = analytic_model(load([f"model={model}"]))
    checks = analytic.reference_checks() if hasattr(analytic, "reference_checks") else []
    return pd.DataFrame(
        [
            {
                "check": what,
                "analytic": a,
                "reference": r,
                "rel_err": _rel(a, r),
                "ok": _rel(a, r) <= TOLERANCE,
            }
            for what, a, r in checks
        ],
        columns=["check", "analytic", "reference", "rel_err", "ok"],
    )


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m llm_perf_opt.analytic.validate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default="deepseek_ocr", help="the model, a `model` config option (default: deepseek_ocr)"
    )
    parser.add_argument(
        "--bytes", action="store_true", help="check the analytic bytes (ByteCounter) instead of the FLOPs"
    )
    parser.add_argument(
        "--impl",
        choices=("reference", "fast"),
        default="reference",
        help="with --bytes: the implementation whose bytes to check (fast: its check cases, every path set that runs on meta)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.model not in group_options("model"):
            raise UserError(
                f"validate: --model {args.model!r} is not one of {', '.join(group_options('model'))}"
            )
        if args.impl != "reference" and not args.bytes:
            raise UserError(
                "validate: --impl fast checks bytes only (add --bytes); the FLOPs are the reference's"
            )
        start = time.perf_counter()
        table = compare(args.model, args.impl, args.bytes)
        seconds = time.perf_counter() - start
        refs = references(args.model) if not args.bytes else None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    display = ("display.width", 200, "display.max_rows", None, "display.float_format", "{:.4g}".format)
    with pd.option_context(*display):
        if args.bytes:
            print(
                f"Bytes per stage: analytic vs ByteCounter on the meta model ({args.model}, model.impl={args.impl})"
            )
            print(BYTES_NOTE)
        else:
            print(
                f"Matmul GFLOPs per stage: analytic (executed) vs FlopCounterMode on the meta model ({args.model})"
            )
            print("useful = what a causal mask keeps")
        print(table.to_string(index=False))
        if refs is not None and len(refs):
            print("\nReference figures (GFLOPs unless noted)")
            print(refs.to_string(index=False))
    bad = int((~table["ok"]).sum()) + (0 if refs is None else int((~refs["ok"]).sum()))
    print(f"\n{len(table)} stage rows of {table['case'].nunique()} cases counted on meta in {seconds:.1f} s")
    limit = (
        f"beyond {BYTES_TOLERANCE:g} relative, or weight or KV bytes not equal"
        if args.bytes
        else f"above {TOLERANCE:.0%}"
    )
    print(f"{'FAIL' if bad else 'PASS'}: {bad} disagreement(s) {limit}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
