"""The package's shape, checked from its source: stages meet only through manifests (no stage module
imports another), nothing below the stages reaches up into them, module imports form no loop, and the
run folder's paths are spelled in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
STAGE_PACKAGE = "pipeline.stages"
SHARED_STAGE_MODULES = {"pipeline.stages", "pipeline.stages.base"}  # what every stage builds on


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str], top_level_only: bool = False) -> set[str]:
    """The package modules ``path`` imports (``from pipeline.x import y`` counts y when y is a module).
    ``top_level_only``: only imports that run when the module is imported (not inside functions or
    under TYPE_CHECKING), the ones that can make a loop."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes: list[ast.AST]
    if top_level_only:
        nodes = []
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.extend(ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else [])
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return found


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


def test_the_graph_sees_the_stages():
    stages = {m for m in GRAPH if m.startswith(f"{STAGE_PACKAGE}.")} - SHARED_STAGE_MODULES
    assert {"pipeline.stages.train", "pipeline.stages.crop", "pipeline.stages.predict"} <= stages
    assert "pipeline.models.fit" in GRAPH["pipeline.stages.train"]  # the parser finds real edges


def test_no_stage_module_imports_another_stage_module():
    stages = {m for m in GRAPH if m.startswith(f"{STAGE_PACKAGE}.")} - SHARED_STAGE_MODULES
    crossing = {m: sorted(GRAPH[m] & stages) for m in sorted(stages) if GRAPH[m] & stages}
    assert crossing == {}, f"stages meet only through manifests: {crossing}"


BELOW_THE_STAGES = ["models", "crop", "evaluation", "report", "annotate", "sources", "crawl"]


@pytest.mark.parametrize("package", BELOW_THE_STAGES)
def test_the_parts_below_the_stages_do_not_reach_up_into_them(package):
    below = {m for m in GRAPH if m == f"pipeline.{package}" or m.startswith(f"pipeline.{package}.")}
    top_level = {m: imports(modules()[m], set(modules()), top_level_only=True) for m in below}
    reaching = {m: sorted(i for i in found if i.startswith(STAGE_PACKAGE)) for m, found in top_level.items()}
    assert {m: i for m, i in reaching.items() if i} == {}


def test_module_imports_form_no_loop():
    graph = {m: imports(p, set(modules()), top_level_only=True) for m, p in modules().items()}
    # A package's __init__ is imported with each of its modules: an edge to it is not a loop by itself.
    state: dict[str, int] = {}
    loop: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or node.startswith(f"{nxt}."):
                continue
            if state.get(nxt) == 1:
                loop.extend([*path, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert not loop, " -> ".join(loop)


RUN_FOLDER_NAMES = ["classes.json", "metrics.json", "judgments.parquet", "candidates.parquet",
                    "_COMPLETE.json"]  # fmt: skip


@pytest.mark.parametrize("name", RUN_FOLDER_NAMES)
def test_the_run_folder_layout_is_spelled_in_one_module(name):
    """Code names these files, as a path or a path's last part, only in pipeline/layout.py (messages
    that mention them are words, not paths)."""
    spelled = []
    for module, path in modules().items():
        if module == "pipeline.layout":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if text == name or text.endswith(f"/{name}"):
                spelled.append(f"{module}: {text!r}")
    assert spelled == []
