"""The tree's import rules: the evaluation may import the library, never the reverse; each stage imports
only the stages before it; loading an engine imports neither the graph passes nor diffusers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import deepcache_compile

PACKAGE = Path(deepcache_compile.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every `deepcache_compile...` module `path` imports, relative imports resolved, at any depth."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from . import x` may name a module
    return {m for m in found if m.startswith("deepcache_compile")}


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_import_resolution_sees_relative_and_absolute_imports():
    imports = _modules()
    assert "deepcache_compile.graph.trace" in imports["deepcache_compile.runtime.pair"]  # `from ..graph.trace`
    assert "deepcache_compile.api" in imports["deepcache_compile.eval.demo"]  # `from ..api import ...`


def test_the_library_never_imports_the_evaluation():
    offenders = {module: sorted(m for m in imported if m.startswith("deepcache_compile.eval"))
                 for module, imported in _modules().items()
                 if not module.startswith("deepcache_compile.eval") and module != "deepcache_compile.__main__"}
    assert {m: v for m, v in offenders.items() if v} == {}


# Each stage may import only what comes before it in the pipeline (and the small shared modules).
_SHARED = ("deepcache_compile.calls", "deepcache_compile.kernels", "deepcache_compile.options",
           "deepcache_compile.policy", "deepcache_compile.refresh", "deepcache_compile.schedule", "deepcache_compile.shapes",
           "deepcache_compile.tracing")
_ALLOWED = {
    "deepcache_compile.graph": ("deepcache_compile.graph",),
    "deepcache_compile.artifacts.formats": ("deepcache_compile.artifacts.formats",),
    "deepcache_compile.artifacts.manifest": ("deepcache_compile.artifacts.formats",),
    "deepcache_compile.runtime.generation": (),
    "deepcache_compile.refresh": (),  # a policy, like the schedule: no graph pass, no runtime
}


@pytest.mark.parametrize("stage", sorted(_ALLOWED))
def test_stages_import_only_upstream(stage):
    allowed = _SHARED + _ALLOWED[stage]
    for module, imported in _modules().items():
        if module == stage or module.startswith(stage + "."):
            bad = sorted(m for m in imported if m != "deepcache_compile" and not m.startswith(allowed))
            assert not bad, f"{module} imports {bad}; {stage} may import only {allowed}"


def test_loading_an_engine_imports_no_graph_pass_and_no_diffusers():
    script = ("import sys; from deepcache_compile import load_deepcache, ManifestError; "
              "print(sorted(m for m in sys.modules if m.startswith(('diffusers', 'deepcache_compile'))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert not any(m.startswith(("diffusers", "deepcache_compile.graph", "deepcache_compile.eval")) for m in loaded)
    assert "deepcache_compile.runtime.pair" not in loaded and "deepcache_compile.runtime.dispatch" not in loaded
    assert "deepcache_compile.artifacts.engine" in loaded  # the check looked at the right process


def test_public_api_is_importable_by_name():
    """Every public name is the object of that name defined in its home module (the lazy table points right)."""
    import importlib

    for name in deepcache_compile.__all__:
        value = getattr(deepcache_compile, name)
        home = importlib.import_module(deepcache_compile._EXPORTS[name], "deepcache_compile")
        assert value.__name__ == name and value.__module__ == home.__name__, (name, value)
    with pytest.raises(AttributeError, match="no attribute 'compile'"):
        deepcache_compile.compile  # noqa: B018


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in imported if i in modules and i not in (m, "deepcache_compile")}
            for m, imported in modules.items()}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_any_two_modules():
    """Imports at any depth count (a function-level import too): data flows one way through the package."""
    assert _cycles(_module_graph()) == []
