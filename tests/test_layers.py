"""Imports flow one way: no module of cnnkit imports a module of a layer above its own, at the top of the file or
inside a function (`python -m pytest tests/test_layers.py` is the check; it reads the source, imports nothing).

The layers, lowest first (the guide's cli -> api -> stages -> engine/runs -> models, data -> fileio, made exact).
A layer's modules may import each other and anything below; an upward import is a cycle waiting to happen (it
was how `runs` and `engine.checkpoint`, and `data.cache` and `data.folder`, came to import each other).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cnnkit"

LAYERS: list[set[str]] = [
    # the base: errors, escaping, the one reader and writer, registries, process lifetime
    {"cnnkit.errors", "cnnkit.text", "cnnkit.fileio", "cnnkit.lifetime", "cnnkit.registry", "cnnkit.progress"},
    {"cnnkit.records"},  # typed run files
    {"cnnkit.inputs"},  # what a model takes (records of model.json's input and preprocessing)
    {"cnnkit.data", "cnnkit.models", "cnnkit.preprocess"},  # datasets, architectures
    # what a run is made from: the option schema (checked against the data and model registries), model.json,
    # and starting weights (a run's, a file's, ImageNet's)
    {"cnnkit.config", "cnnkit.model_meta", "cnnkit.models.transfer", "cnnkit.models.pretrained"},
    {"cnnkit.engine", "cnnkit.runs", "cnnkit.plots", "cnnkit.prediction", "cnnkit.export", "cnnkit.report",
     "cnnkit.comparison", "cnnkit.heatmaps"},  # training, evaluation and the run directory
    {"cnnkit.stages"},  # a training's named stages: prepare, data, model, fit, test, write
    {"cnnkit.api", "cnnkit.serve", "cnnkit.audit"},
    {"cnnkit.cli", "cnnkit.__main__", "cnnkit"},
]
#: `from cnnkit import __version__` reads the package's own constant: Python imports a package before any of its
#: modules, so it adds no dependency.
PACKAGE_CONSTANTS = {"cnnkit.__version__"}


def layer_of(module: str) -> int:
    """The layer of `module`: that of the longest listed name it is or lies under."""
    best, found = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS"
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> list[tuple[str, int]]:
    """Every cnnkit module an import statement names (`from cnnkit import x` names cnnkit.x), with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("cnnkit")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cnnkit"):
            if node.module == "cnnkit":
                found += [(f"cnnkit.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target, line in imported(ast.parse(path.read_text(), str(path))):
            if target in PACKAGE_CONSTANTS:
                continue
            target_module = target if (PACKAGE.parent / target.replace(".", "/")).exists() or \
                (PACKAGE.parent / (target.replace(".", "/") + ".py")).exists() else target.rsplit(".", 1)[0]
            if layer_of(target_module) > layer_of(source):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} (layer {layer_of(source)}) "
                                f"imports {target_module} (layer {layer_of(target_module)})")
    return problems


def test_no_module_imports_a_module_of_a_higher_layer():
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from cnnkit.api import train\n")
    assert imported(tree) == [("cnnkit.api", 2)] and layer_of("cnnkit.api") > layer_of("cnnkit.models.transfer")
    assert layer_of("cnnkit.models.transfer") > layer_of("cnnkit.models.builder")  # the longest listed name wins
