"""The package imports only downward, with no cycle: the architecture README's "Architecture" section describes."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_fsl_sage


PACKAGE = Path(hf_fsl_sage.__file__).parent
NAME = "hf_fsl_sage"

# Lower tiers never import higher ones; a part may import its own tier. ``integrations`` (the model card, plots)
# import nothing of the package and the trainer's ``create_model_card`` hook uses the model card: they sit below it.
# ``timing`` (the step timer) is a leaf every part may use. ``testing_utils`` (tiny models, one training round,
# test processes) sits on top with the public names.
TIERS = [["splitting", "timing"], ["transport"], ["federation"], ["algorithms"], ["integrations"],
         ["config", "trainer"], ["__init__", "testing_utils"]]


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
    expected = {"hf_fsl_sage.trainer", "hf_fsl_sage.algorithms.fsl_sage.algorithm", "hf_fsl_sage.e2e.data"}
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
            if part == "e2e" or part_of(target) == "e2e":
                continue  # checked below
            ok = tier_of(module) is not None and tier_of(target) is not None and tier_of(target) <= tier_of(module)
            if not ok:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_nothing_outside_the_task_imports_e2e():
    offenders = [f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts if part_of(t) == "e2e" and part_of(m) != "e2e"]
    assert not offenders, offenders
