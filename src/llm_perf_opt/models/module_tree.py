"""The module tree of a model, each module tagged with the stage its qualified name belongs to.

    nodes = module_tree(model, {"model.sam_model": "sam", "lm_head": "language_model"})
    stage_totals(nodes)           # {"sam": 95_569_152, "language_model": ..., None: untagged}
    print(render(nodes, max_depth=3))

The walk stops at leaves: modules without children and PyTorch's own layers (classes defined
in `torch.nn.modules`, e.g. nn.Linear, nn.MultiheadAttention), but not its containers
(nn.Sequential, nn.ModuleList, nn.ModuleDict), which only group other modules.

Parameter counts, each parameter counted once (a tied weight belongs to the first module,
in pre-order, that holds it):

    params(m)       = Σ numel of the parameters m holds itself (a leaf: all of its parameters)
    params_total(m) = params(m) + Σ params_total(c) over m's listed children
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class TreeNode:
    """One module. `name` is its qualified name ("" for the root); `stage` is None where no
    prefix matches (a module that spans several stages, such as the root)."""

    name: str
    cls: str
    stage: str | None
    leaf: bool
    params: int
    params_total: int
    depth: int
    #: `params` split by the stage of each parameter's own qualified name: a parameter held
    #: directly by an untagged module (the root's `image_newline`) is tagged by its own prefix.
    params_by_stage: dict[str | None, int] = field(default_factory=dict)


def is_leaf(module: nn.Module) -> bool:
    """No children, or a PyTorch layer (its children are its implementation, not the model's)."""
    if next(module.children(), None) is None:
        return True
    return type(module).__module__.startswith("torch.nn.modules.") and not isinstance(module, CONTAINERS)


def stage_of(name: str, stage_prefixes: dict[str, str]) -> str | None:
    """The stage of the longest prefix that is `name` or a dotted ancestor of it ("" matches all)."""
    matches = [p for p in stage_prefixes if p == "" or name == p or name.startswith(p + ".")]
    return stage_prefixes[max(matches, key=len)] if matches else None


def module_tree(root: nn.Module, stage_prefixes: dict[str, str]) -> list[TreeNode]:
    """Every module down to the leaves, in pre-order (a parent before its children)."""
    seen: set[int] = set()
    rows: list[tuple[str, nn.Module, int, bool, dict[str | None, int]]] = []
    totals: list[int] = []
    open_ancestors: list[int] = []  # indices into rows of the current node's ancestors, by depth
    for name, module, depth in _walk(root):
        leaf = is_leaf(module)
        own: dict[str | None, int] = {}
        for param_name, param in module.named_parameters(recurse=leaf):
            if id(param) in seen:
                continue
            seen.add(id(param))
            stage = stage_of(_join(name, param_name), stage_prefixes)
            own[stage] = own.get(stage, 0) + param.numel()
        del open_ancestors[depth:]
        open_ancestors.append(len(rows))
        rows.append((name, module, depth, leaf, own))
        totals.append(0)
        count = sum(own.values())
        for index in open_ancestors:
            totals[index] += count
    return [
        TreeNode(
            name,
            type(module).__name__,
            stage_of(name, stage_prefixes),
            leaf,
            sum(own.values()),
            total,
            depth,
            own,
        )
        for (name, module, depth, leaf, own), total in zip(rows, totals, strict=True)
    ]


def _walk(root: nn.Module) -> Iterator[tuple[str, nn.Module, int]]:
    """(qualified name, module, depth) in pre-order, each module once, not below leaves."""
    seen: set[int] = set()
    stack = [("", root, 0)]
    while stack:
        name, module, depth = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module, depth
        if not is_leaf(module):
            children = [(_join(name, key), child, depth + 1) for key, child in module.named_children()]
            stack.extend(reversed(children))  # popped in declaration order


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def stage_totals(nodes: list[TreeNode]) -> dict[str | None, int]:
    """Stage -> parameters, each parameter once (None: untagged), in order of first appearance."""
    totals: dict[str | None, int] = {}
    for node in nodes:
        for stage, count in node.params_by_stage.items():
            totals[stage] = totals.get(stage, 0) + count
    return totals


def render(nodes: list[TreeNode], max_depth: int | None = None) -> str:
    """One line per module, indented by depth: name, class, stage ("-" if untagged), parameters
    with their subtree (and, where a non-leaf holds parameters itself, how many are its own)."""
    shown = [n for n in nodes if max_depth is None or n.depth <= max_depth]
    labels = ["  " * n.depth + (n.name.rpartition(".")[2] or "(root)") for n in shown]
    counts = [f"{n.params_total:,}" for n in shown]
    widths = [max(map(len, column), default=0) for column in (labels, [n.cls for n in shown], counts)]
    stage_width = max((len(n.stage or "-") for n in shown), default=0)
    lines = []
    for node, label, count in zip(shown, labels, counts, strict=True):
        stage = node.stage or "-"
        line = f"{label:<{widths[0]}}  {node.cls:<{widths[1]}}  {stage:<{stage_width}}  {count:>{widths[2]}}"
        if not node.leaf and node.params:
            line += f"  (own {node.params:,})"
        lines.append(line.rstrip())
    return "\n".join(lines)
