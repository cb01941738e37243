"""The house: no import cycle inside adaprune/, and nothing outside the specs names a projection."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adaprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The adaprune modules `path` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names if alias.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    found.add(target if target in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return stack[stack.index(successor):] + [successor]
            if successor not in state and (cycle := walk(successor)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_walker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_adaprune():
    graph = import_graph()
    assert "adaprune.pipeline" in graph and "adaprune.plugins" in graph["adaprune.pipeline"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_tools():
    """The command line, demo, data and evaluation sit around the library; nothing inside reaches out to them."""
    graph = import_graph()
    inside = [m for m in graph if not m.startswith("adaprune.tools") and m not in ("adaprune.__main__",)]
    assert not [(m, t) for m in inside for t in graph[m] if t.startswith("adaprune.tools")]


def test_no_stage_reaches_back_into_the_pruner():
    graph = import_graph()
    assert not [m for m, targets in graph.items() if "adaprune.pipeline" in targets
                and not m.startswith("adaprune.tools") and m not in ("adaprune", "adaprune.__main__")]


PROJECTION_NAMES = re.compile(r"\b(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|W_pack|"
                              r"query_key_value|dense_h_to_4h|dense_4h_to_h|gate_up_proj|fc1|fc2|out_proj)\b")


def test_only_the_specs_name_projections():
    named = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
             if "specs" not in path.parts and PROJECTION_NAMES.search(path.read_text())]
    assert named == []
