"""python -m llm_perf_opt.tree [--depth N] [overrides]: the configured model's modules, stage-tagged.

    python -m llm_perf_opt.tree                                   # the full-size model
    python -m llm_perf_opt.tree --depth 3 model=deepseek_ocr_tiny  # the top three levels below the root

Prints the module tree (name, class, stage, parameters) and the parameters of each stage, and
writes every module to `module_tree.json` in the Hydra run dir (`outputs/trees/<time>_<model>`
unless `hydra.run.dir=` says otherwise). `--depth` limits only the printout. The overrides are
those of `llm_perf_opt.run`. The model is built on the meta device: any size costs no memory,
and no weights are read (a checkpoint's config.json gives its architecture). Stage tags are
the qualified-name prefixes that the model's session declares (`ModelSession.module_stages`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig

from llm_perf_opt.atomic import write_json
from llm_perf_opt.cli import checked_argv
from llm_perf_opt.config import CONFIG_NAME, RunConfig, register_configs, validate
from llm_perf_opt.errors import OneLineParser, UserError
from llm_perf_opt.models.interface import ModelSession, SessionOptions
from llm_perf_opt.models.module_tree import TreeNode, module_tree, render, stage_totals

register_configs()
TREE_FILE = "module_tree.json"
RUN_DIR = "outputs/trees/${now:%Y-%m-%d_%H-%M-%S}_${model.name}"
UNTAGGED = "untagged"
log = logging.getLogger(__name__)


def build_tree(run: RunConfig) -> tuple[list[TreeNode], dict[str, str]]:
    """The configured model's module tree and the stage prefixes it was tagged with."""
    # Shapes only: the dtype changes no parameter count.
    options = SessionOptions(torch.device("cpu"), torch.float32, run.seed)
    session: ModelSession = get_class(type(run.model).session)(run.model, options)
    prefixes = session.module_stages()
    return module_tree(session.meta_module(), prefixes), prefixes


def ordered_totals(nodes: list[TreeNode], prefixes: dict[str, str]) -> dict[str, int]:
    """Parameters per stage in the order the model declares its stages, untagged ones last."""
    totals = stage_totals(nodes)
    order = [*dict.fromkeys(prefixes.values()), None]
    return {UNTAGGED if stage is None else stage: totals[stage] for stage in order if stage in totals}


def tree_record(model_name: str, nodes: list[TreeNode], prefixes: dict[str, str]) -> dict[str, Any]:
    """The content of module_tree.json."""
    return {
        "model": model_name,
        "stage_prefixes": prefixes,
        "stage_params": ordered_totals(nodes, prefixes),
        "params_total": nodes[0].params_total,
        "modules": [
            {
                "name": n.name,
                "class": n.cls,
                "stage": n.stage,
                "leaf": n.leaf,
                "params": n.params,
                "params_total": n.params_total,
                "depth": n.depth,
            }
            for n in nodes
        ],
    }


def totals_text(totals: dict[str, int]) -> str:
    """Parameters per stage and their sum, aligned."""
    rows = [*totals.items(), ("total", sum(totals.values()))]
    name_width = max(len(name) for name, _ in rows)
    count_width = max(len(f"{count:,}") for _, count in rows)
    lines = ["parameters by stage:"] + [
        f"  {name:<{name_width}}  {count:>{count_width},}" for name, count in rows
    ]
    return "\n".join(lines)


def tree_job(cfg: DictConfig, depth: int | None) -> None:
    """One job: print the tree and the stage totals, write module_tree.json into the run dir."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run = validate(cfg)
        nodes, prefixes = build_tree(run)
    except UserError as exc:
        log.error(f"error: {exc}")
        raise SystemExit(2) from None
    path = write_json(out_dir / TREE_FILE, tree_record(run.model.name, nodes, prefixes))
    print(render(nodes, depth))
    print()
    print(totals_text(ordered_totals(nodes, prefixes)))
    log.info(f"wrote {path}")


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m llm_perf_opt.tree",
        usage="%(prog)s [-h] [--depth N] [OVERRIDE ...]",
        description="Print the configured model's module tree, stage-tagged, and write module_tree.json.",
        epilog="OVERRIDE: those of llm_perf_opt.run (model=deepseek_ocr_tiny, mode=gundam, model.weights=DIR, ...; "
        "see its --help); hydra.run.dir=DIR names the output folder (default outputs/trees/<time>_<model>).",
        allow_abbrev=False,  # a prefix must not swallow one of Hydra's flags
    )
    parser.add_argument(
        "--depth",
        type=int,
        metavar="N",
        help="print modules down to depth N below the root (default: all); module_tree.json has all",
    )
    return parser


def split_depth(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """`--depth N` taken out of the command line (and -h answered); the rest is Hydra's."""
    args, rest = build_parser().parse_known_args(argv)
    if args.depth is not None and args.depth < 0:
        raise UserError(f"--depth needs a whole number >= 0, got {args.depth}")
    return args.depth, rest


def with_run_dir(overrides: list[str]) -> list[str]:
    """Trees go to their own folder unless the command line names one."""
    if any(o.lstrip("+~").startswith("hydra.run.dir=") for o in overrides):
        return overrides
    return [*overrides, f"hydra.run.dir={RUN_DIR}"]


def main() -> None:
    try:
        depth, argv = split_depth(sys.argv[1:])
        argv = checked_argv(with_run_dir(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = argv

    @hydra.main(version_base="1.3", config_path="conf", config_name=CONFIG_NAME)
    def _main(cfg: DictConfig) -> None:
        tree_job(cfg, depth)

    _main()


if __name__ == "__main__":
    main()
