"""The benchmarks call jaxcap and each other by names that exist, with arguments that fit.

Running the benchmarks takes minutes each, so the suite reads them instead: every
name a benchmark takes from ``jaxcap`` or ``benchmarks`` (imported, or read as a
module's attribute) must exist, and every call of such a function must bind to its
signature. Two benchmarks failed that way after a rename and a changed argument.
(``tests/test_scst.py`` runs ``scst_bench.py`` itself on the session's tiny run.)
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the benchmarks' PyTorch peers import it (the test extra "
                    "installs it)")

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))
OURS = ("jaxcap", "benchmarks")


def _ours(module: str) -> bool:
    return module.split(".")[0] in OURS


def _references(tree: ast.Module):
    """``(line, description, object or None when missing, call node or None)`` for each
    name of ours the file reads, with the call it makes of it."""
    bound = {}  # local name -> the module or object it stands for
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    # ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c`` to a.b.
                    module = alias.name if alias.asname else alias.name.split(".")[0]
                    bound[alias.asname or module] = importlib.import_module(module)
        elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    target = getattr(module, alias.name)
                else:  # a submodule not imported by its package
                    try:
                        target = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append((node.lineno, f"{node.module}.{alias.name}"))
                        continue
                bound[alias.asname or alias.name] = target
    def module_of(node):
        """The module of ours that ``node`` (a name or a chain of attributes) stands for."""
        if isinstance(node, ast.Name):
            found = bound.get(node.id)
        elif isinstance(node, ast.Attribute) and module_of(node.value) is not None:
            found = getattr(module_of(node.value), node.attr, None)
        else:
            return None
        return found if inspect.ismodule(found) and _ours(found.__name__) else None

    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and module_of(node.value) is not None:
            module = module_of(node.value)
            target = getattr(module, node.attr, None)
            yield node.lineno, f"{module.__name__}.{node.attr}", target, calls.get(id(node))
        elif isinstance(node, ast.Name) and node.id in bound and callable(bound[node.id]) \
                and not inspect.ismodule(bound[node.id]) and id(node) in calls:
            yield node.lineno, node.id, bound[node.id], calls[id(node)]
    for line, name in missing:
        yield line, name, None, None


def _problems(source: str, filename: str) -> list[str]:
    """What is wrong with the names of ours that ``source`` reads, in line order."""
    problems = []
    for line, name, target, call in _references(ast.parse(source, filename)):
        if target is None:
            problems.append(f"{filename}:{line}: {name} does not exist")
            continue
        if call is None or not callable(target) or any(
                isinstance(a, ast.Starred) for a in call.args) or any(
                k.arg is None for k in call.keywords):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin or a class without one
            continue
        try:
            signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
        except TypeError as error:
            problems.append(f"{filename}:{line}: {name}(...): {error}")
    return sorted(problems, key=lambda problem: int(problem.split(":")[1]))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_reads_only_names_that_exist_and_calls_them_as_they_are_defined(path):
    assert _problems(path.read_text(), path.name) == []


def test_the_check_finds_a_missing_name_and_calls_that_do_not_bind():
    source = ("from benchmarks import extract_bench\n"
              "from jaxcap.train.state import init_state\n"
              "extract_bench.jaxcap_images_per_s(32, 3)\n"
              "extract_bench.jaxcap_run(32, 'float32', 'extra', 'args')\n"
              "init_state(1, 2, 3)\n"
              "extract_bench.jaxcap_run(32)\n"
              "import jaxcap.train.state\n"
              "jaxcap.train.state.init_state_of_old\n")
    problems = _problems(source, "bad.py")
    assert [p.split(":")[1] for p in problems] == ["3", "4", "5", "8"], problems
    assert "jaxcap_images_per_s does not exist" in problems[0]
