"""The module import graph of dbscale/: no cycle, and the lower layers never import the upper ones.

The graph is read with the standard library's ast from the source (module-level and function-level imports
alike), so an import hidden inside a function to dodge a cycle at load time still counts.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower layers (left) may not import the upper ones (right).
LOWER = ("dbscale.config", "dbscale.diffusion", "dbscale.models", "dbscale.data")
UPPER = ("dbscale.train", "dbscale.commands", "dbscale.eval", "dbscale.cli")
LEAVES = {"dbscale.config": {"dbscale.errors"}}  # a leaf imports from dbscale only these (the error types)


def module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_root: Path) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, for every .py file under package_root."""
    files = {module_name(p, package_root): p for p in package_root.rglob("*.py")}
    packages = {module_name(p, package_root) for p in package_root.rglob("__init__.py")}
    top = package_root.name

    def resolve(name: str) -> str | None:
        while name and name not in files:  # `import a.b.c` of a function or class: the module that defines it
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        here = mod if mod in packages else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                if name == top or name.startswith(top + "."):
                    target = resolve(name)
                    if target and target != mod:
                        deps.add(target)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def within(module: str, layers) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def test_dbscale_has_no_import_cycle():
    graph = import_graph(ROOT / "dbscale")
    assert len(graph) > 40 and "dbscale.families" in graph["dbscale.create_run"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_lower_layers_import_no_upper_layer():
    graph = import_graph(ROOT / "dbscale")
    wrong = [(m, d) for m, deps in graph.items() if within(m, LOWER) for d in deps if within(d, UPPER)]
    assert not wrong, f"a lower layer imports an upper one: {wrong}"
    for leaf, allowed in LEAVES.items():
        assert graph[leaf] <= allowed, f"{leaf} must stay a leaf; it imports {graph[leaf] - allowed}"


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toy.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n    return c\n")
    (pkg / "c.py").write_text("import os\n\n\ndef g():\n    import toy.a\n")
    graph = import_graph(pkg)
    assert graph["toy.a"] == {"toy.sub.b"} and graph["toy.sub.b"] == {"toy.c"} and graph["toy.c"] == {"toy.a"}
    assert find_cycle(graph) == ["toy.a", "toy.sub.b", "toy.c", "toy.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


def test_tests_share_helpers_through_one_module():
    """Test modules import what they share from tests/helpers.py, never from conftest or another test module."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "conftest" or n.startswith("test_")]
    assert not offenders, offenders
    assert (tests / "helpers.py").is_file()
