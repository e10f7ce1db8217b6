"""The shape of the house: the import graph of metalens has no circle, and the rooms import only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "metalens"


def _module_name(path: Path) -> str:
    parts = ["metalens", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the metalens modules it imports (anywhere in its body), from the source."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and t != "metalens":
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("room, forbidden", [
    ("metalens.registry", ("metalens.tasks", "metalens.learners", "metalens.experiments", "metalens.run")),
    ("metalens.tasks", ("metalens.learners", "metalens.experiments", "metalens.run", "metalens.cli")),
    ("metalens.learners", ("metalens.tasks.", "metalens.experiments", "metalens.run", "metalens.cli")),
    ("metalens.data", ("metalens.tasks", "metalens.learners", "metalens.experiments")),
    ("metalens.train", ("metalens.experiments", "metalens.cli")),
])
def test_rooms_import_only_downwards(room, forbidden):
    graph = _graph()
    for module, imports in graph.items():
        if module == room or module.startswith(room + "."):
            bad = sorted(i for i in imports if any(i == f or i.startswith(f) for f in forbidden)
                         and i != "metalens.tasks.base")
            assert not bad, f"{module} imports {bad}"


def test_the_graph_sees_imports():  # the checks above would pass vacuously on an empty graph
    graph = _graph()
    assert "metalens.registry" in graph["metalens.tasks.sinusoid"]
    assert "metalens.experiments.spine" in graph["metalens.experiments.tour"]
    assert len(graph) > 40
