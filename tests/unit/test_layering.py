"""The floors of the house (CONVENTIONS.md), read from the code's own imports: each floor imports only floors below
it (or itself), module-level and function-level imports alike, ``importlib.import_module("...")`` included. No
exception list: an edge that climbs is a failure."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ["common", "families", "evaluation", "obsdiff", "export", "runtime", "measure", "pipeline", "benchmarks", "scripts"]


def floor_of(module: str) -> int | None:
    top = module.split(".")[0]
    return FLOORS.index(top) if top in FLOORS else None


def imports_of(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, at any depth (relative imports resolved to absolute against
    ``package``, by default the file's own)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            elif node.module:
                found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" and node.args
              and isinstance(node.args[0], (ast.Constant, ast.JoinedStr))):
            arg = node.args[0]
            text = arg.value if isinstance(arg, ast.Constant) else "".join(v.value for v in arg.values if isinstance(v, ast.Constant))
            if isinstance(text, str) and text:
                found.append((node.lineno, text))
    return found


def source_files() -> list[Path]:
    return sorted(f for floor in FLOORS for f in (ROOT / floor).rglob("*.py"))


def test_every_floor_is_a_directory_and_nothing_else_is_a_package():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(FLOORS), f"packages without a floor: {sorted(packages - set(FLOORS))} (add them to CONVENTIONS.md and FLOORS)"
    assert all((ROOT / f).is_dir() for f in FLOORS)


def test_no_import_climbs_a_floor():
    climbing = []
    for f in source_files():
        own = floor_of(f.relative_to(ROOT).parts[0])
        for line, module in imports_of(f):
            target = floor_of(module)
            if target is not None and target > own:
                climbing.append(f"{f.relative_to(ROOT)}:{line} imports {module} ({FLOORS[own]} -> {FLOORS[target]})")
    assert not climbing, "imports that run upward:\n" + "\n".join(climbing)


def test_the_reader_sees_function_level_and_dynamic_imports(tmp_path):
    """The check itself: a function-level import, a relative import and an import_module string are all read."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline import engine\n    import importlib\n    importlib.import_module('benchmarks.e2e')\n"
                     "from . import io\n")
    assert {m for _, m in imports_of(probe, package="common")} == {"pipeline", "importlib", "benchmarks.e2e", "common"}
