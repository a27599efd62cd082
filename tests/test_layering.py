"""The import rules of docs/ARCHITECTURE.md, read from the source with the AST (lazy imports included).

Every lmstack module belongs to a layer; a module may import from its own package and from lower
layers only, the three layer-4 packages never import one another, nothing imports the CLI, and the
module import graph has no cycle. A planted upward import makes this test fail (see the last test).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lmstack"

# top-level unit (module or package under lmstack/) -> layer; docs/ARCHITECTURE.md shows the same table.
# Units of one layer may import each other (the cycle test keeps that honest), except these, which are
# siblings by design and stay independent of one another:
INDEPENDENT = {"train", "interop", "evals"}
LAYERS: dict[str, int] = {
    "errors": 0, "atomic": 0, "paths": 0, "progress": 0, "devices": 0, "plots": 0,
    "models": 1, "tokenizer": 1,
    "config": 2, "checkpoint": 2,
    "data": 3, "engine": 3,
    "train": 4, "interop": 4, "evals": 4,
    "serve": 5, "stages": 5, "prompting": 5, "tools": 5,
    "cli": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every lmstack module this file imports, at top level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from lmstack import checkpoint` / `from lmstack.data import benchmarks` name modules too
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (ROOT.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (ROOT.parent / Path(*candidate.split("."))).is_dir():
                    found.add(candidate)
    return {name for name in found if name == "lmstack" or name.startswith("lmstack.")}


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def all_modules() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(ROOT.rglob("*.py"))}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        source_unit = unit_of(module)
        for target in sorted(targets):
            target_unit = unit_of(target)
            if source_unit is None or target_unit is None or target_unit == source_unit:
                continue
            if source_unit not in LAYERS or target_unit not in LAYERS:
                problems.append(f"{module} -> {target}: {source_unit if source_unit not in LAYERS else target_unit}"
                                f" has no layer in LAYERS (add it here and in docs/ARCHITECTURE.md)")
            elif LAYERS[target_unit] > LAYERS[source_unit]:
                problems.append(f"{module} -> {target}: upward import (layer {LAYERS[source_unit]} -> "
                                f"{LAYERS[target_unit]})")
            elif source_unit in INDEPENDENT and target_unit in INDEPENDENT:
                problems.append(f"{module} -> {target}: sideways import between layer-{LAYERS[source_unit]} "
                                f"packages {source_unit} and {target_unit}")
    return problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A module-level import cycle (a package's __init__ counts as the package), or None."""
    nodes = set(graph)
    edges = {m: {t for t in targets if t in nodes and t != m} for m, targets in graph.items()}
    # a module importing its own package's __init__ (lmstack.models.gpt -> lmstack.models) is how Python
    # reaches siblings; only count an edge into a package from outside it
    for module in edges:
        edges[module] = {t for t in edges[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_import_points_down():
    problems = layer_violations(all_modules())
    assert not problems, "layering broken (docs/ARCHITECTURE.md):\n" + "\n".join(problems)


def test_no_import_cycles():
    cycle = find_cycle(all_modules())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units <= set(LAYERS), f"give these a layer: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("source, target, expected", [
    ("lmstack.engine.generate", "lmstack.cli", "upward"),
    ("lmstack.data.decontam", "lmstack.evals.run", "upward"),
    ("lmstack.evals.run", "lmstack.train.loop", "sideways"),
    ("lmstack.models.gpt", "lmstack.config", "upward"),
])
def test_a_planted_upward_import_is_caught(source, target, expected):
    graph = all_modules()
    graph[source] = set(graph.get(source, set())) | {target}
    assert any(expected in p and source in p for p in layer_violations(graph))


def test_a_planted_cycle_is_caught():
    graph = {"lmstack.a": {"lmstack.b"}, "lmstack.b": {"lmstack.c"}, "lmstack.c": {"lmstack.a"}}
    assert find_cycle(graph) == ["lmstack.a", "lmstack.b", "lmstack.c", "lmstack.a"]


def test_relative_and_from_package_imports_are_seen(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lmstack import checkpoint\n    import lmstack.cli\n")
    found = imports_of_text(source.read_text())
    assert {"lmstack.checkpoint", "lmstack.cli"} <= found


def imports_of_text(text: str) -> set[str]:
    path = ROOT / "_planted_probe.py"
    try:
        path.write_text(text)
        return imports_of(path)
    finally:
        path.unlink()
