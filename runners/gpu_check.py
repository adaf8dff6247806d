#!/usr/bin/env python3
"""The GPU half checked in one command (`make gpu-check`): one markdown file of what it found.

On a machine with one CUDA GPU and the project installed (no internet needed), in at most
`--budget` seconds (default 480), it runs and records:

1. calibrate (`python -m llm_perf_opt.calibrate --refresh`) and the datasheet it matched;
2. base and gundam for model.impl=reference and fast: TTFT, TPOT, per stage wall vs busy
   (device kernel time of the trace pass), trace coverage, the fast paths chosen;
3. whether the CUDA-graph decode (fast) is attributed to `decode` (kernels replayed from the
   graph counted in decode's busy time);
4. parity of the GPU formulations against the reference on the tiny model: folded SAM
   attention, grouped-GEMM experts, CUDA-graph decode (vision output and prefill logits max
   difference, greedy tokens equal; fp32 tokens must be equal, bf16 may diverge on dummy
   weights, whose logits are near ties);
5. an Nsight Systems capture and `report --from-nsys` of it (runners/nsys_profile.sh) when
   `nsys` is on PATH, else one line saying so;
6. `python -m llm_perf_opt.compare` of the two implementations (base mode).

Every step that fails or cannot run says so in the file and the check goes on; the exit status
is 1 if any step failed. Without a CUDA GPU it prints one line and exits 0. `--device cpu
--model deepseek_ocr_tiny` runs the same steps on the CPU (how the tests check this script).

    python runners/gpu_check.py                       # writes outputs/gpu-check/<time>/gpu-check.md
    python runners/gpu_check.py --out gpu-check.md --budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llm_perf_opt.atomic import write_text

IMPLS = ("reference", "fast")
#: The columns of stages.csv the wall-vs-busy table shows.
STAGE_COLUMNS = ("stage", "time_ms", "busy_ms", "launches", "calibrated_pct_roof_wall", "calibrated_bound")


class Check:
    """The markdown being written, the deadline, and which steps failed."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.lines: list[str] = []
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, *lines: str) -> None:
        self.lines += lines
        write_text(self.out, "\n".join(self.lines) + "\n")  # what is done so far survives a kill

    def step(self, title: str, body: Callable[[], list[str]], *, needs_s: float = 0) -> None:
        """One section; a step that raises or would overrun the budget is recorded as such."""
        print(f"gpu-check: {title}", flush=True)
        self.add(f"## {title}", "")
        if self.left() < needs_s:
            self.skipped.append(title)
            self.add(f"not run: {self.left():.0f} s of the budget left, it needs about {needs_s:.0f} s", "")
            return
        start = time.monotonic()
        try:
            lines = body()
        except StepFailed as exc:
            self.failed.append(title)
            lines = [f"**failed**: {exc}"]
        self.add(*lines, "", f"_{time.monotonic() - start:.0f} s_", "")


class StepFailed(Exception):
    pass


def run(
    cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A subprocess with its output captured; StepFailed if it fails or times out."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=max(timeout_s, 1), env=env)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"`{' '.join(cmd)}` ran past {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise StepFailed(f"`{' '.join(cmd)}` exited {proc.returncode}:\n\n```\n{tail}\n```")
    return proc


def fenced(text: str) -> list[str]:
    return ["```", text.rstrip(), "```"]


def table(rows: list[dict], columns: Sequence[str]) -> list[str]:
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:,.4g}"
        return "-" if v is None else str(v)

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows
    ]


# -- the steps --------------------------------------------------------------------------------


def calibrate(args: argparse.Namespace, check: Check) -> list[str]:
    cmd = [sys.executable, "-m", "llm_perf_opt.calibrate", "--device", args.device]
    proc = run(cmd + (["--refresh"] if args.device.startswith("cuda") else []), check.left())
    return [f"`python {' '.join(cmd[1:])}`", "", *fenced(proc.stdout)]


def harness_runs(args: argparse.Namespace, check: Check, runs_dir: Path) -> list[str]:
    """Both implementations in each mode, one process per job (two full models at once may not
    fit); a failed job is recorded and the others still run."""
    lines, rows, problems = [], [], []
    for mode in args.modes:
        for impl in IMPLS:
            job = runs_dir / f"{mode}_{impl}"
            cmd = [
                sys.executable,
                "-m",
                "llm_perf_opt.run",
                f"model={args.model}",
                f"mode={mode}",
                f"model.impl={impl}",
                f"device={args.device}",
                f"max_new_tokens={args.max_new_tokens}",
                f"hydra.run.dir={job}",
            ]
            try:
                run(cmd, min(check.left(), args.job_timeout))
            except StepFailed as exc:
                problems.append(f"- {mode} {impl}: {exc}")
                continue
            record = json.loads((job / "run.json").read_text())
            rows.append(job_row(mode, impl, record))
            lines += [f"### {mode}, model.impl={impl}", "", *stage_rows(job), ""]
            execution = record.get("execution") or {}
            lines += [
                f"- {execution.get('summary', 'no execution record')}",
                *(f"- {note}" for note in execution.get("notes", [])),
                "",
            ]
    head = table(
        rows, ("mode", "impl", "dtype", "TTFT ms", "TPOT ms", "decode tok/s", "coverage %", "hardware")
    )
    if problems:
        raise StepFailed("\n".join(problems) + "\n\n" + "\n".join(head + [""] + lines))
    return head + [""] + lines


def job_row(mode: str, impl: str, record: dict) -> dict:
    summary = record["timing"]["summary"]
    trace = record.get("trace") or {}
    tpot = summary.get("tpot_ms") or {}
    return {
        "mode": mode,
        "impl": impl,
        "dtype": record["dtype"],
        "TTFT ms": summary["ttft_ms"]["median"],
        "TPOT ms": tpot.get("median"),
        "decode tok/s": (summary.get("decode_tokens_per_s") or {}).get("median"),
        "coverage %": None if trace.get("coverage") is None else 100 * trace["coverage"],
        "hardware": (record.get("hardware") or {}).get("datasheet"),
    }


def stage_rows(job: Path) -> list[str]:
    import pandas as pd

    stages = pd.read_csv(job / "stages.csv")
    columns = [c for c in STAGE_COLUMNS if c in stages.columns]
    return table(stages[columns].to_dict("records"), columns)


def graph_attribution(args: argparse.Namespace, runs_dir: Path) -> list[str]:
    """The fast base job's decode: its busy time and launches come from the trace pass's kernels
    in decode ranges; a CUDA-graph replay that lost its kernels would leave decode with none."""
    import pandas as pd

    job = runs_dir / f"{args.modes[0]}_fast"
    if not (job / "stages.csv").is_file():
        raise StepFailed(f"{job} did not finish: nothing to look at")
    record = json.loads((job / "run.json").read_text())
    decode = pd.read_csv(job / "stages.csv").set_index("stage").loc["decode"]
    paths = (record.get("execution") or {}).get("paths") or {}
    lines = [
        f"- decode form: {paths.get('decode')}; decode busy {decode['busy_ms']:.2f} ms of "
        f"{decode['time_ms']:.2f} ms wall, {int(decode['launches'])} launches"
    ]
    if paths.get("decode") == "graph" and not decode["busy_ms"] > 0:
        raise StepFailed("\n".join(lines + ["- graph-replayed decode has no kernel time in decode"]))
    if paths.get("decode") != "graph":
        lines.append(
            "- the fast paths here did not take CUDA-graph decode: attribution of replays not checked"
        )
    return lines


def parity(args: argparse.Namespace) -> list[str]:
    """The tiny model, reference vs fast forced onto the GPU's paths, same dummy weights: vision
    output, prefill logits and greedy tokens. Off CUDA, the paths meta stands in with."""
    from llm_perf_opt.config import load
    from llm_perf_opt.models.deepseek_ocr.fast.paths import choose_paths
    from llm_perf_opt.models.interface import SessionOptions
    from llm_perf_opt.models.tokenizer import DEFAULT_PROMPT
    from llm_perf_opt.runners.dsocr_session import DeepSeekOCRSession

    device = torch.device(args.device)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        paths = choose_paths(torch.device("meta") if device.type == "cpu" else device, dtype)
        forced = [f"model.paths.{k}={v}" for k, v in paths.as_dict().items() if k != "bias_tile_elements"]
        out = {}
        for impl in IMPLS:
            cfg = load(["model=deepseek_ocr_tiny", "mode=gundam", f"model.impl={impl}", *forced]).model
            session = DeepSeekOCRSession(cfg, SessionOptions(device, dtype))
            request = session.prepare(None, DEFAULT_PROMPT)
            session.load()
            session.fit_dummy_weights(request)
            with torch.inference_mode():
                embeds = session.encode_images(request)
                logits = session.model.prefill(
                    request.input_ids, embeds, session.model.new_cache(request.prompt_tokens)
                )
            out[impl] = (embeds.float(), logits.float(), session.generate(request, 8).tokens)
        (re, rl, rt), (fe, fl, ft) = out["reference"], out["fast"]
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "fast paths": ", ".join(
                    f"{k.split('=')[0].removeprefix('model.paths.')} {k.split('=')[1]}" for k in forced
                ),
                "vision max abs diff": (fe - re).abs().max().item(),
                "vision max abs": re.abs().max().item(),
                "prefill logits max abs diff": (fl - rl).abs().max().item(),
                "greedy tokens equal": ft == rt,
            }
        )
    lines = table(rows, list(rows[0]))
    if not all(r["greedy tokens equal"] for r in rows if r["dtype"] == "float32"):
        raise StepFailed("\n".join(lines + ["", "fp32 greedy tokens differ"]))
    return lines


def nsys_capture(args: argparse.Namespace, check: Check, out_dir: Path) -> list[str]:
    if shutil.which("nsys") is None:
        return ["nsys is not on PATH: no Nsight Systems capture, `report --from-nsys` not checked"]
    capture = out_dir / "nsys"
    env = {**os.environ, "NSYS_OUT": str(capture), "PYTHON": sys.executable}
    script = Path(__file__).with_name("nsys_profile.sh")
    run(
        [
            "bash",
            str(script),
            f"model={args.model}",
            f"mode={args.modes[0]}",
            "model.impl=fast",
            f"device={args.device}",
            "max_new_tokens=8",
        ],
        check.left(),
        env=env,
    )
    report = capture / "report.md"
    return [f"capture and report in `{capture}`", "", *report.read_text().splitlines()[:40]]


def compare(args: argparse.Namespace, check: Check, runs_dir: Path) -> list[str]:
    mode = args.modes[0]
    base, fast = runs_dir / f"{mode}_reference", runs_dir / f"{mode}_fast"
    if not (base / "run.json").is_file() or not (fast / "run.json").is_file():
        raise StepFailed(f"the {mode} jobs did not both finish")
    cmd = [sys.executable, "-m", "llm_perf_opt.compare", str(base), str(fast), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(check.left(), 1))
    # compare exits non-zero on a regression; the table is the finding either way.
    return [
        f"`python -m llm_perf_opt.compare {base} {fast} --force` (exit {proc.returncode})",
        "",
        proc.stdout,
    ]


# -- the command ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, help="the markdown file (default outputs/gpu-check/<time>/gpu-check.md)"
    )
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the steps here"
    )
    parser.add_argument("--model", default="deepseek_ocr", help="the model of the harness runs")
    parser.add_argument("--modes", nargs="+", default=["base", "gundam"], help="modes of the harness runs")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per harness run")
    parser.add_argument("--job-timeout", type=float, default=150, help="seconds per harness job at most")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA {torch.version.cuda}): nothing to check"
        )
        return 0
    out = args.out or Path("outputs/gpu-check") / time.strftime("%Y-%m-%d_%H-%M-%S") / "gpu-check.md"
    out_dir = out.parent
    runs_dir = out_dir / "runs"
    check = Check(out, args.budget)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    check.add(
        f"# gpu-check · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {name}",
        "",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}; code at {commit or 'unknown commit'}",
        f"- model {args.model}, modes {', '.join(args.modes)}, {args.max_new_tokens} new tokens, "
        f"budget {args.budget:.0f} s",
        "",
    )
    check.step("calibrate and the datasheet match", lambda: calibrate(args, check), needs_s=20)
    check.step("harness runs: both implementations", lambda: harness_runs(args, check, runs_dir), needs_s=60)
    check.step("CUDA-graph decode attributed to decode", lambda: graph_attribution(args, runs_dir))
    check.step("parity of the GPU formulations (tiny model)", lambda: parity(args), needs_s=10)
    check.step("Nsight Systems capture", lambda: nsys_capture(args, check, out_dir), needs_s=60)
    check.step("compare: reference → fast", lambda: compare(args, check, runs_dir), needs_s=5)
    verdict = (
        "all steps passed"
        if not check.failed and not check.skipped
        else "; ".join(
            filter(
                None,
                [
                    f"failed: {', '.join(check.failed)}" if check.failed else "",
                    f"not run (budget): {', '.join(check.skipped)}" if check.skipped else "",
                ],
            )
        )
    )
    check.add("## verdict", "", verdict)
    print(f"gpu-check: {verdict}\n{out}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
