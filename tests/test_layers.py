"""The layering of DESIGN.md, checked: every module imports in a fresh interpreter, no module imports one of a
higher layer (imports inside functions included), and the modules' import graph has no cycle."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm"

# DESIGN.md, "Layers, bottom to top": a module's layer is given by the longest matching prefix.
LAYERS: dict[str, int] = {
    "vlm": 1, "vlm.errors": 1, "vlm.hub": 1, "vlm.config": 1, "vlm.assets": 1,
    "vlm.data": 1, "vlm.visual": 1, "vlm.projector": 1, "vlm.llm": 1,
    "vlm.model": 2, "vlm.quantization": 2, "vlm.folders": 2, "vlm.processing": 2, "vlm.tiny": 2,
    "vlm.train": 3, "vlm.generate": 3, "vlm.eval": 3, "vlm.serve": 3,
    "vlm.cli": 4, "vlm.demo": 4, "vlm.demo_preference": 4, "vlm.__main__": 4,
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def imported_modules(module: str, path: pathlib.Path) -> set[str]:
    """The vlm modules `module` imports anywhere in its file (a `from a import b` counts a.b when that is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


GRAPH = {module: imported_modules(module, path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert all(layer(m) for m in MODULES)


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{m} (layer {layer(m)}) imports {dep} (layer {layer(dep)})"
                    for m, deps in GRAPH.items() for dep in deps if layer(dep) > layer(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    # Tarjan's strongly connected components; any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package importing its own submodule (and back) is how Python packages work, not a cycle
            if len(component) > 1 and not _package_and_members(component):
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _package_and_members(component: list[str]) -> bool:
    packages = [m for m in component if (MODULES[m].name == "__init__.py")]
    return len(packages) == 1 and all(m == packages[0] or m.startswith(packages[0] + ".") for m in component)


def test_every_module_imports_in_a_fresh_interpreter():
    code = ("import importlib, sys\nfailed = []\n"
            f"for name in {sorted(MODULES)!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
            "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("bad, expected", [
    ("from vlm.train.trainer import X", {"vlm.train.trainer"}),
    ("def f():\n    import vlm.cli.train", {"vlm.cli.train"}),
    ("from .weights import load_state_dict", {"vlm.folders.weights"}),
])
def test_the_checker_sees_imports(tmp_path, bad, expected):
    path = tmp_path / "probe.py"
    path.write_text(bad + "\n")
    assert imported_modules("vlm.folders.probe", path) == expected
