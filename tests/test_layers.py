"""Imports run one way: config → model → session → measurement → analytic → report → entry points.

Every `import` in the package (module level or inside a function) is read from the source and
must point at the same layer or one below it. A model's package `models/<m>/` holds all of that
model: its `session` module sits in the session layer, its `analytic` package in the analytic
layer, the rest in the model layer; and nothing outside `models/<m>/` imports it (the harness
reaches a model through its config's dotted names), except the alias users know,
`runners/dsocr_session.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import llm_perf_opt

PACKAGE = Path(llm_perf_opt.__file__).parent

#: Lowest first. A module belongs to the first layer with a prefix matching its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("llm_perf_opt.errors", "llm_perf_opt.atomic", "llm_perf_opt.allocator")),
    ("hardware", ("llm_perf_opt.hardware",)),
    ("config", ("llm_perf_opt.config", "llm_perf_opt.conf")),
    ("model", ("llm_perf_opt.models",)),
    ("session", ("llm_perf_opt.runners",)),
    ("measurement", ("llm_perf_opt.profiling",)),
    ("analytic", ("llm_perf_opt.analytic",)),
    ("report", ("llm_perf_opt.report",)),
    (
        "entry points",
        (
            "llm_perf_opt.cli",
            "llm_perf_opt.run",
            "llm_perf_opt.calibrate",
            "llm_perf_opt.compare",
            "llm_perf_opt.summarize",
            "llm_perf_opt.tree",
            "llm_perf_opt",
        ),
    ),
]


#: Parts of a model's package `llm_perf_opt.models.<m>` that sit above the model layer.
MODEL_PARTS = {"session": "session", "analytic": "analytic"}
#: Modules outside a model's package that may import it.
MODEL_ALIASES = {"llm_perf_opt.runners.dsocr_session": "deepseek_ocr"}


def model_of(module: str) -> str | None:
    """The model package `module` belongs to (`llm_perf_opt.models.<m>...` -> m), or None."""
    parts = module.split(".")
    if parts[:2] == ["llm_perf_opt", "models"] and len(parts) > 2 and parts[2] not in MODELS_SHARED:
        return parts[2]
    return None


#: Modules of llm_perf_opt.models that belong to no one model.
MODELS_SHARED = {
    "interface",
    "module_tree",
    "pages",
    "tokenizer",
    "assets",
    "kernels",
    "safetensors_file",
    "__init__",
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if model_of(module) is not None and len(parts) > 3 and parts[3] in MODEL_PARTS:
        return [name for name, _ in LAYERS].index(MODEL_PARTS[parts[3]])
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, name: str, is_package: bool = False) -> list[str]:
    """The package modules that the source of module `name` imports, relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            # `from llm_perf_opt.report import run_report` imports the submodule run_report.
            found += [target] + [f"{target}.{alias.name}" for alias in node.names]
    return [m for m in found if m.startswith("llm_perf_opt.")]


def file_imports(path: Path) -> list[str]:
    return imports(path.read_text(), module_name(path), path.name == "__init__.py")


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_import_runs_back_up():
    back_edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target in file_imports(path):
            if layer_of(target) > layer_of(source):
                back_edges.append(
                    f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert back_edges == []


def test_nothing_outside_a_model_imports_it():
    strays = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target in file_imports(path):
            model = model_of(target)
            if model is not None and model_of(source) != model and MODEL_ALIASES.get(source) != model:
                strays.append(f"{source} imports {target}")
    assert strays == []


def test_a_models_session_and_analytic_parts_sit_in_their_layers():
    names = [name for name, _ in LAYERS]
    assert LAYERS[layer_of("llm_perf_opt.models.deepseek_ocr.session")][0] == "session"
    assert LAYERS[layer_of("llm_perf_opt.models.deepseek_ocr.analytic.costs")][0] == "analytic"
    assert LAYERS[layer_of("llm_perf_opt.models.deepseek_ocr.sam")][0] == "model"
    assert names.index("model") < names.index("session") < names.index("analytic")
    assert model_of("llm_perf_opt.models.interface") is None
    assert model_of("llm_perf_opt.models.deepseek_ocr.fast.moe") == "deepseek_ocr"


def test_the_walk_finds_imports_in_functions_and_relative_ones():
    source = "from .families import Cost\n\ndef f():\n    from ..report import run_report\n"
    found = imports(source, "llm_perf_opt.analytic.counted")
    assert "llm_perf_opt.analytic.families" in found
    assert "llm_perf_opt.report.run_report" in found
    assert layer_of("llm_perf_opt.report.run_report") > layer_of("llm_perf_opt.analytic.counted")
