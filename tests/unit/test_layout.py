"""The package layout is a contract: imports only go down the layers, never into private names,
and never in a cycle. Checked from the source (every ``import`` statement, at module level or
inside functions), so a new module that breaks the layering fails here, not in review.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "vitdecomp"

#: Layers from the bottom up; a module may import its own layer and any layer below it.
LAYERS = ["errors", "core", "data", "testing", "store", "interpret", "apps", "report", "explore", "synth", "cli"]
#: Modules outside the layers: the package entry points, which may import anything.
ENTRY = {"vitdecomp", "vitdecomp.__main__", "vitdecomp.compat"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every vitdecomp import in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "vitdecomp":
                names = [a.name for a in node.names]
                # `from . import stack`: the submodule is the target
                subs = [n for n in names if f"{target}.{n}" in MODULES]
                for sub in subs:
                    found.append((f"{target}.{sub}", [], node.lineno))
                rest = [n for n in names if n not in subs]
                if rest or not subs:
                    found.append((target, rest, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vitdecomp":
                    found.append((alias.name, [], node.lineno))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if module in ENTRY or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    strays = [m for m in MODULES if m not in ENTRY and _layer(m) is None]
    assert not strays, f"modules outside the layered folders: {strays}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, path in MODULES.items():
        own = _layer(name)
        if own is None:
            continue
        for target, _, line in _imports(name, path):
            other = _layer(target)
            if other is not None and other > own:
                wrong.append(f"{path.relative_to(PKG.parent)}:{line} ({LAYERS[own]}) imports {target} "
                             f"({LAYERS[other]})")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            if target == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(PKG.parent)}:{line} imports {private} from {target}")
    assert not wrong, "private cross-module imports:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            # a package's __init__ re-exporting its own submodules is not a cycle of the data flow
            if target in MODULES and target != name and not target.startswith(name + "."):
                graph[name].add(target)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state and node not in ENTRY:
            visit(node, [node])
    cycles = [c for c in cycles if not set(c) & ENTRY]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("old,new", [
    ("vitdecomp.stack", "vitdecomp.core.stack"),
    ("vitdecomp.text.pools", "vitdecomp.interpret.text.pools"),
    ("vitdecomp.segment_run", "vitdecomp.apps.segmentation.harness"),
])
def test_old_module_paths_still_import_with_a_deprecation_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to") as caught:  # the old parent package warns too
        module = importlib.import_module(old)
    assert any(f"{old} moved to {new}" in str(w.message) for w in caught)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the real module keeps its own identity (resources, pickling)
