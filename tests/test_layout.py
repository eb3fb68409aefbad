"""The package's layout: every module imports on its own, and no two modules
import each other, directly or round a longer loop. The import graph is read
from the source (every import statement, also the ones inside functions,
which would hide a cycle rather than remove it)."""
import ast
import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "shmbypass")
MAX_LINES = 800      # a file longer than this holds more than one concern
MAX_FUNCTION = 100  # lines


def modules():
    """Dotted name -> source file of every module of the package."""
    out = {}
    for d, dirs, files in os.walk(PKG):
        dirs[:] = [x for x in dirs if not x.startswith(("_", "."))]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


MODULES = modules()


def imports(name, path):
    """The package's modules that `name` imports anywhere in its source."""
    with open(path) as f:
        return imports_in(name, f.read(), path.endswith("__init__.py"))


def imports_in(name, source, is_package=False):
    pkg = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from a import b` imports a.b if that is a module, else a.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                         for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = {m: imports(m, p) for m, p in MODULES.items()}
    loops = cycles(graph)
    assert not loops, "modules that import each other: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c) + ")"
        for c in loops)


def test_cycle_finder_sees_function_level_imports():
    """The check itself: a loop made only of imports inside functions counts."""
    src = "def f():\n    from shmbypass import cli\n    from . import status\n"
    assert imports_in("shmbypass.paths", src) == {"shmbypass.cli", "shmbypass.status"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_module_imports_alone(name):
    """Each module imports in a fresh interpreter, before anything else of the
    package is loaded (an import order that only works by accident fails)."""
    r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def test_files_are_small():
    """The package's modules, and the tests and their peer programs too."""
    tests = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(ROOT, "tests"))
             for f in fs if f.endswith(".py")]
    long = {os.path.relpath(p, ROOT): n for p in [*MODULES.values(), *tests]
            if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_every_module_is_importable_here():
    for name in MODULES:
        if not name.endswith("__main__"):
            importlib.import_module(name)


def test_functions_are_short():
    """A function over MAX_FUNCTION lines needs a reason: a comment on the
    line above it that starts with "# long:"."""
    long = []
    for path in MODULES.values():
        with open(path) as f:
            lines = f.read().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                if n > MAX_FUNCTION and not above.startswith("# long:"):
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions without a reason to be this long: " + ", ".join(long)
