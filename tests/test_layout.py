"""The form the codebase keeps: inference that does not load the trainer, files that fit in a
reader's head, functions that fit on a screen, and no import circle (docs/layout.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "jaxcap"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def test_inference_loads_neither_the_trainer_nor_the_data_stack():
    """The commands that read a run (caption, evaluate, serve, migrate) import neither the
    trainer, SCST, its rewards, TFDS nor grain (evaluate loads the data stack when it reads
    a split, not before)."""
    script = ("import sys, jaxcap.serve, jaxcap.caption, jaxcap.evaluate, jaxcap.migrate; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('tensorflow_datasets', 'grain', 'optax') or m in ('jaxcap.scst', "
              "'jaxcap.rewards') or m.startswith('jaxcap.train')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text())


def test_no_module_is_long_and_no_function_longer_than_a_screen():
    long_modules = [(str(path), path.read_text().count("\n")) for _, path, _ in _modules()
                    if path.read_text().count("\n") > MAX_MODULE_LINES]
    long_functions = [(str(path), node.name, node.end_lineno - node.lineno + 1)
                      for _, path, tree in _modules() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long_modules == [] and long_functions == []


def _module_level(body):
    """The statements run when a module is imported, those under ``if`` (``TYPE_CHECKING``
    too: a circle for a type checker is one for a reader) and ``try`` included."""
    for node in body:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers"):
            if isinstance(node, (ast.If, ast.Try, ast.ExceptHandler)):
                yield from _module_level(getattr(node, block, []))


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The jaxcap modules ``name`` imports when it is imported (its module-level imports;
    ``from package import module`` counts as the module; a package its own modules import
    is their parent, loaded first anyway, and is not counted)."""
    found = set()
    for node in _module_level(tree.body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                       else node.module for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and not name.startswith(t + ".")}
    return found


def test_the_modules_import_one_another_without_a_circle():
    modules = {name: tree for name, _, tree in _modules()}
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert graph["jaxcap.runs"].isdisjoint({"jaxcap.train", "jaxcap.scst", "jaxcap.rewards"})
    visiting, done, circles = [], set(), []

    def visit(name):
        if name in visiting:
            circles.append(visiting[visiting.index(name):] + [name])
            return
        if name in done:
            return
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert circles == []


@pytest.mark.parametrize("module", ["jaxcap.checkpoints", "jaxcap.runs"])
def test_reading_a_run_does_not_import_the_trainer(module):
    done = subprocess.run([sys.executable, "-c", f"import sys, {module}; "
                           "print([m for m in sys.modules if m.startswith('jaxcap.train')])"],
                          capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
