"""The package imports only downward, with no cycle, as docs/architecture.md describes."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import hf_fsl_sage


PACKAGE = Path(hf_fsl_sage.__file__).parent
NAME = "hf_fsl_sage"

# Lower tiers never import higher ones; a part may import its own tier. ``integrations`` (the model card, plots)
# import nothing of the package and the trainer's ``create_model_card`` hook uses the model card: they sit below it.
# ``timing`` (the step timer) is a leaf every part may use.
TIERS = [["splitting", "timing"], ["transport"], ["federation"], ["algorithms"], ["integrations", "flower"],
         ["config", "trainer"], ["__init__"]]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == NAME}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != NAME:
                continue
            # ``from pkg import module`` imports that module; ``from module import name`` imports the module.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {m for m in found if m != name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def part_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def tier_of(module: str) -> int | None:
    part = part_of(module)
    return next((i for i, tier in enumerate(TIERS) if part in tier), None)


def test_the_graph_sees_the_package():
    expected = {"hf_fsl_sage.trainer", "hf_fsl_sage.algorithms.fsl_sage.algorithm"}
    assert expected <= MODULES.keys()
    assert "hf_fsl_sage.federation.federation" in GRAPH["hf_fsl_sage.algorithms.base"]
    assert "hf_fsl_sage.algorithms.registry" in GRAPH["hf_fsl_sage.config"]


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_every_part_imports_only_downward():
    upward = []
    for module, targets in GRAPH.items():
        part = part_of(module)
        for target in targets:
            if part_of(target) == part:
                continue
            ok = tier_of(module) is not None and tier_of(target) is not None and tier_of(target) <= tier_of(module)
            if not ok:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_the_library_holds_no_task_code_or_data():
    """The E2E task (data, metrics, resources) and the test helpers live outside the package, in ``recipes/``
    and ``tests/``: the wheel holds the library only."""
    foreign = [f"{path.relative_to(PACKAGE.parent)} imports {node_module}"
               for path in PACKAGE.rglob("*.py") for node_module in _absolute_imports(path)
               if node_module.split(".")[0] in {"e2e_task", "tests", "recipes", "benchmarks"}]
    assert not foreign, foreign
    not_code = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*")
                if p.is_file() and p.suffix not in {".py", ".pyc"} and p.name != "py.typed"]
    assert not not_code, f"files that are not library code in the package: {not_code}"


def _absolute_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


@pytest.mark.xdist_group("grouping-check")
def test_xdist_groups_keep_their_tests_on_one_worker(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` (the CI command) the deadline groups and the shared runs rely on xdist_group
    marks; pytest 9.2 with pytest-xdist 3.8 silently ignores them (the tests then spread over the workers), which
    is why the test extra asks for pytest < 9.1."""
    main_argv = getattr(request.config, "workerinput", {}).get("mainargv", [])  # the command, seen by a worker
    if not os.environ.get("PYTEST_XDIST_WORKER") or "loadgroup" not in " ".join(main_argv):
        pytest.skip("only meaningful under pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@grouping-check"), request.node.nodeid
