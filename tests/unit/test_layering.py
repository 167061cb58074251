# tier: unit
"""The package layering, read from the source with `ast` (imports inside functions included, since a deferred
import is still a dependency): train/ is the ground floor and imports nothing from the packages above it, and no
project module takes part in an import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("train", "tools", "dataset_tools", "evals", "launch")
ABOVE_TRAIN = ("tools", "dataset_tools", "evals", "launch")

# `python -m train` (train/__main__.py) is the torchrun entry point, a script nothing imports: it hands the command
# line to launch's `train` command, which builds the Trainer's hooks from evals/. The library in train/ stays below.
UPWARD_EXEMPT = {"train.__main__"}
CYCLE_EXEMPT: list[set[str]] = []


def project_modules(root: Path = REPO) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (`from a import b` counts a.b when b is a
    module, else a)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            targets |= {t for t in map(resolve, names) if t and t != module}
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The checks below can fail: a cycle hidden by a function-level import and an upward import are both found."""
    (tmp_path / "train").mkdir()
    (tmp_path / "evals").mkdir()
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    (tmp_path / "train" / "a.py").write_text("from train.b import f\n")
    (tmp_path / "train" / "b.py").write_text("def f():\n    from train import a\n    import evals.x\n")
    (tmp_path / "evals" / "x.py").write_text("")
    graph = import_graph(project_modules(tmp_path))
    assert graph["train.b"] == {"train.a", "evals.x"}
    assert cycles(graph) == [{"train.a", "train.b"}]


def test_train_imports_nothing_from_the_packages_above_it():
    graph = import_graph(project_modules())
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.split(".")[0] == "train"
                    and m not in UPWARD_EXEMPT for t in targets if t.split(".")[0] in ABOVE_TRAIN)
    assert not upward, "train/ is the ground floor; hand it a hook from launch/ instead:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = [c for c in cycles(import_graph(project_modules())) if c not in CYCLE_EXEMPT]
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in found)
