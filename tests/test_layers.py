"""Imports flow one way: no module of cnnkit imports a module of a layer above its own, at the top of the file or
inside a function (`python -m pytest tests/test_layers.py` is the check; it reads the source, imports nothing).

The layers, lowest first (the guide's cli -> api -> stages -> engine/runs -> models, data -> fileio, made exact).
A layer's modules may import each other and anything below; an upward import is a cycle waiting to happen (it
was how `runs` and `engine.checkpoint`, and `data.cache` and `data.folder`, came to import each other).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
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


def existing_module(name: str) -> str:
    """The module `name` is, or the module it is an attribute of (`cnnkit.x.f` -> `cnnkit.x`)."""
    while "." in name and not ((PACKAGE.parent / name.replace(".", "/")).is_dir()
                               or (PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file()):
        name = name.rpartition(".")[0]
    return name


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
            target_module = existing_module(target)
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


# ---------------------------------------------------------------------------------------------------------
# An import inside a function must earn its place: keeping torch (or an optional extra) out of a module that does
# without it, keeping `cnnkit --help` quick, breaking a cycle, or a comment on its line saying why. Any other
# belongs at the top of the file, where a reader sees what the module depends on.

#: What a module is heavy for importing (torch takes ~1.2 s to import; the rest are optional extras).
HEAVY = {"torch", "matplotlib", "onnx", "onnxruntime", "onnxscript", "captum", "cleanlab", "imagehash", "fastapi",
         "uvicorn", "starlette", "safetensors", "huggingface_hub", "tensorboard"}
#: What `cnnkit --help` imports (measured with python -X importtime): the command line imports anything else
#: inside the command that needs it.
HELP_PATH = {"cnnkit", "cnnkit.cli", "cnnkit.config", "cnnkit.data", "cnnkit.data.registry", "cnnkit.errors",
             "cnnkit.fileio", "cnnkit.lifetime", "cnnkit.registry", "cnnkit.text"}


@dataclass(frozen=True)
class InnerImport:
    module: str
    target: str
    line: int
    commented: bool


def import_graph() -> tuple[dict[str, set[str]], list[InnerImport]]:
    """Each module's top-level imports (cnnkit modules by name, others by their package), and every import of a
    cnnkit module inside a function. Imports under `if TYPE_CHECKING:` run for type checkers only."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    top: dict[str, set[str]] = {}
    inner: list[InnerImport] = []
    for name, path in modules.items():
        source = path.read_text()
        tree, lines = ast.parse(source), source.splitlines()
        top[name] = {".".join(name.split(".")[:depth]) for depth in range(1, name.count(".") + 1)}  # its packages
        in_function = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for sub in ast.walk(node)}
        typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            others = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            for target in [found for found, _ in imported(ast.Module(body=[node], type_ignores=[]))] or others:
                if target.startswith("cnnkit"):
                    target = existing_module(target)
                if id(node) in in_function:
                    if target.startswith("cnnkit"):
                        inner.append(InnerImport(name, target, node.lineno, "#" in lines[node.lineno - 1]))
                else:
                    top[name].add(target if target.startswith("cnnkit") else target.split(".")[0])
    return top, inner




def reached(name: str, top: dict[str, set[str]]) -> set[str]:
    """Every module (and third-party package) importing `name` imports, following top-level imports."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += top.get(current, ())
    return seen


def unearned_inner_imports() -> list[str]:
    top, inner = import_graph()
    heavy = {name for name in top if reached(name, top) & HEAVY}
    problems = []
    for found in inner:
        earned = (found.commented
                  or (found.module not in heavy and found.target in heavy)  # keeps torch or an extra out
                  or (found.module == "cnnkit.cli" and found.target not in HELP_PATH)  # keeps --help quick
                  or found.module in reached(found.target, top))  # at the top it would be a cycle
        if not earned:
            problems.append(f"src/{found.module.replace('.', '/')}.py:{found.line}: {found.module} imports "
                            f"{found.target} inside a function; import it at the top (or say why in a comment)")
    return problems


def test_imports_inside_functions_keep_torch_out_keep_help_quick_or_break_a_cycle():
    problems = unearned_inner_imports()
    assert not problems, "\n".join(problems)


def test_help_imports_no_torch_and_only_its_own_modules():
    """The measured side of the rule: `cnnkit --help` in a real process loads only HELP_PATH of cnnkit."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cnnkit", "--help"], capture_output=True,
                          text=True, check=True)
    loaded = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "torch" not in loaded and "numpy" not in loaded
    assert {name for name in loaded if name.startswith("cnnkit")} <= HELP_PATH
