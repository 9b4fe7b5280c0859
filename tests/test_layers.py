"""The three layers import only downward: library <- product (``hyperinf.app``) <- paper (``hyperinf.paper``).

``hyperinf.cli`` sits above all three and joins them. The check reads every import statement,
including those inside functions, so a lazy import cannot slip past it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hyperinf

PACKAGE = Path(hyperinf.__file__).parent
# What each layer may not import (a module name or any module under it).
FORBIDDEN = {
    "library": ("hyperinf.app", "hyperinf.paper", "hyperinf.cli"),
    "app": ("hyperinf.paper", "hyperinf.cli"),
    "paper": ("hyperinf.cli",),
    "cli": (),
}


def layer_of(module: str) -> str:
    """``library``, ``app``, ``paper`` or ``cli`` for a dotted module name under ``hyperinf``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("app", "paper", "cli"):
        return parts[1]
    return "library"


def module_name(path: Path, package: Path) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, relative imports resolved."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # "from hyperinf import app"
    return names


def layer_violations(package: Path) -> list[str]:
    """``"<module> (layer) imports <name>"`` for every import that points up or across the layers."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        layer = layer_of(module)
        for name in sorted(imported_modules(path, module)):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                found.append(f"{module} ({layer}) imports {name}")
    return found


def test_layers_import_only_downward() -> None:
    assert layer_violations(PACKAGE) == []


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    package = tmp_path / "hyperinf"
    (package / "app").mkdir(parents=True)
    (package / "paper").mkdir()
    (package / "__init__.py").write_text("")
    (package / "engine.py").write_text("def f():\n    from hyperinf.app.select import main\n")
    (package / "app" / "__init__.py").write_text("")
    (package / "app" / "select.py").write_text("from ..paper import lds\n")
    (package / "paper" / "__init__.py").write_text("")
    (package / "paper" / "lds.py").write_text("from hyperinf import engine\nfrom hyperinf.app import select\n")
    assert layer_violations(package) == [
        "hyperinf.app.select (app) imports hyperinf.paper",
        "hyperinf.app.select (app) imports hyperinf.paper.lds",
        "hyperinf.engine (library) imports hyperinf.app.select",
        "hyperinf.engine (library) imports hyperinf.app.select.main",
    ]


def test_importing_the_library_loads_no_heavy_dependency() -> None:
    """``import hyperinf`` (the engine, methods, errors) stays light: no transformers, pandas or matplotlib."""
    code = (
        "import sys, hyperinf, hyperinf.engine, hyperinf.selection, hyperinf.metrics; "
        "print(sorted(m for m in ('transformers', 'peft', 'pandas', 'matplotlib', 'sklearn') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
