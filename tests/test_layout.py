"""The house's rules, checked from the code's own imports (every import, lazy ones included):
no import loop, and every import points down the layers that docs/architecture.md draws."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gemframe"

# Lowest first. A module may import its own layer's modules (without a loop) and lower layers.
LAYERS = [
    ("base", ("_version", "_errors", "_files")),
    ("core", ("_core",)),
    ("polars", ("_polars",)),
    ("accounting", ("_accounting",)),
    ("jobs", ("_pipeline",)),
    ("add-ons", ("ray", "emulator")),
    ("faces", ("_cli", "__init__", "__main__")),
]
# The emulator is a test oracle: it shares nothing with the client but the provider seam.
EMULATOR_MAY_IMPORT = {"emulator.provider": ("_core", "_errors")}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


# Every gemframe module, by dotted name below gemframe: the parametrization, known at collection.
MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


@functools.cache
def graph() -> dict[str, set[str]]:
    """gemframe module -> the gemframe modules it imports (as dotted names below gemframe).
    Parsed once, by the worker that runs these tests, not by every worker that collects them."""
    modules = MODULES
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        if name == "__init__":
            package = []
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                elif node.module and node.module.startswith("gemframe"):
                    target = node.module.removeprefix("gemframe").lstrip(".")
                else:
                    continue
                for alias in node.names:  # `from . import x` names a module
                    candidate = f"{target}.{alias.name}".strip(".")
                    found.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("gemframe."):
                        found.add(alias.name.removeprefix("gemframe."))
        graph[name] = {t for t in found if t and t != name and t in modules}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, (_, tops) in enumerate(LAYERS) if top in tops)


def test_every_module_has_a_layer():
    # The graph was read: were it empty, every test here would pass without checking anything.
    assert {"_core.cache", "_polars.expr", "_pipeline", "emulator.app", "ray", "_cli"} <= set(graph())
    assert graph()["_core.client"]  # and imports were found (the client imports the executor...)
    for module in graph():
        if module == "__init__":
            continue
        _layer(module)  # StopIteration names a module no layer holds


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    for target in graph()[module]:
        if target == "__init__":
            pytest.fail(f"{module} imports the package face (gemframe/__init__.py)")
        assert _layer(target) <= _layer(module), f"{module} imports {target}, a higher layer"
        top, target_top = module.split(".")[0], target.split(".")[0]
        if top == "emulator" and target_top != "emulator":
            allowed = EMULATOR_MAY_IMPORT.get(module, ())
            assert target_top in allowed, f"the emulator's {module} imports {target}"
        if target_top == "emulator" and top not in ("emulator", "_cli", "__init__"):
            pytest.fail(f"{module} imports the emulator ({target}): use the provider seam")


def test_no_import_loop():
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(graph()[module]):
            if target == module:
                continue
            if seen.get(target) == 1:
                loop = path[path.index(target) :] + [target]
                pytest.fail("import loop: " + " -> ".join(loop))
            if target not in seen:
                visit(target, [*path, target])
        seen[module] = 2

    for module in sorted(graph()):
        if module not in seen:
            visit(module, [module])
