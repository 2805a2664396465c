"""The shape of the code: no import cycles, layers that stay pure, one phase abstraction, the `wurst` command."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

PACKAGES = ("pipelines", "stages", "data_filters", "cluster")
PHASE_MODULES = ("filter", "download", "encoders", "precompute", "train")
MAX_LINES = 500
LONG_MODULE_MARK = "Longer than 500 lines:"


def project_modules() -> dict[str, str]:
    """module name -> file path, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for folder, _dirs, files in os.walk(os.path.join(REPO_ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, REPO_ROOT)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    found[".".join(parts)] = path
    return found


def runtime_nodes(tree: ast.AST):
    """Every node of the tree except the bodies of `if TYPE_CHECKING:` (annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """Project modules `module` imports when it runs, anywhere in its file (module level or inside functions)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out: set[str] = set()
    for node in runtime_nodes(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def test_no_import_cycles_anywhere():
    modules = project_modules()
    graph = {m: imports_of(m, p, set(modules)) for m, p in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle of design; edges into a package
    # name are edges into its __init__ only.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_stay_pure():
    """stages/: PyTorch only (no Ray, MLflow, pipelines); data_filters/: pyarrow functions (no torch, Ray)."""
    forbidden = {"stages": ("pipelines", "ray", "mlflow", "deepspeed", "cluster"),
                 "data_filters": ("pipelines", "ray", "mlflow", "torch", "deepspeed", "stages")}
    problems = []
    for module, path in project_modules().items():
        layer = module.split(".")[0]
        if layer not in forbidden:
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            problems += [f"{module} imports {n}" for n in names if n.split(".")[0] in forbidden[layer]]
    assert not problems, problems


def test_long_modules_say_why_at_the_top():
    too_long = []
    for module, path in project_modules().items():
        lines = open(path).read().splitlines()
        if len(lines) > MAX_LINES:
            doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
            if LONG_MODULE_MARK not in doc:
                too_long.append(f"{module} ({len(lines)} lines)")
    assert not too_long, f"over {MAX_LINES} lines without '{LONG_MODULE_MARK} <reason>' in the docstring: {too_long}"


@pytest.mark.parametrize("name", PHASE_MODULES)
def test_every_phase_module_defines_its_phase(name):
    from pipelines.phase import Phase

    module = importlib.import_module(f"pipelines.{name}")
    assert isinstance(module.PHASE, Phase) and module.PHASE.name == name
    assert module.PHASE.config_class.__module__.startswith("pipelines")


def test_wurst_lists_every_command_and_each_one_answers_help():
    from pipelines import cli

    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    wurst = os.path.join(os.path.dirname(sys.executable), "wurst")
    command = [wurst] if os.path.exists(wurst) else [sys.executable, "-m", "pipelines.cli"]
    listing = subprocess.run([*command, "--help"], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert listing.returncode == 0
    for name in cli.COMMANDS:
        assert f"  {name} " in listing.stdout
    procs = {name: subprocess.Popen([*command, name, "--help"], env=env, cwd=REPO_ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in cli.COMMANDS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, f"wurst {name} --help: {err[-2000:]}"
    unknown = subprocess.run([*command, "bogus"], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'bogus'" in unknown.stderr
