"""The package's floors: every subpackage imports only the floors below it, so no import climbs back up.

root (remote code) < loading < objectives < data < training < evaluation, conversion, integrations, serving < commands
"""

from __future__ import annotations

import ast
from pathlib import Path

import elastic_mdm

PACKAGE = Path(elastic_mdm.__file__).parent
FLOORS = {
    "": 0,
    "loading": 1,
    "objectives": 2,
    "data": 3,
    "training": 4,
    "evaluation": 5,
    "conversion": 5,
    "integrations": 5,
    "serving": 5,
    "commands": 6,
}
# The console-script target of installs made before `commands/` existed: it only re-exports the dispatcher.
SHIMS = {"serving/cli.py"}


def imported_subpackages(path: Path) -> set[str]:
    """The `elastic_mdm` subpackages (`""` for a root module) a module imports, at top level or inside functions."""
    package = path.relative_to(PACKAGE).parts[:-1]  # ("data",) for data/corpus.py, () for a root module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1]) if node.level <= len(package) + 1 else []
            parts = base + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("elastic_mdm"):
            parts = node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            parts = next((a.name.split(".")[1:] for a in node.names if a.name.startswith("elastic_mdm.")), None)
            if parts is None:
                continue
        else:
            continue
        found.add(parts[0] if parts and parts[0] in FLOORS else "")
    return found


def test_no_import_climbs_back_up() -> None:
    """A module imports its own subpackage, or a floor strictly below its own: never a higher floor, never a
    sibling on the same floor (so `training` never imports `evaluation`, `loading` never imports `training`)."""
    checked = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in SHIMS or relative == "__init__.py":
            continue
        own = path.relative_to(PACKAGE).parts[0] if len(path.relative_to(PACKAGE).parts) > 1 else ""
        assert own in FLOORS, f"{relative}: subpackage {own!r} has no floor in FLOORS"
        for target in imported_subpackages(path) - {own}:
            assert FLOORS[target] < FLOORS[own], f"{relative} imports {target or 'root'}/, not below {own}/"
        checked += 1
    assert checked > 50


def test_the_old_climbing_imports_would_be_caught(tmp_path: Path) -> None:
    """The checker sees both forms the package used to climb with: `loading` importing `training` inside a
    function, and a training module importing `evaluation`."""
    (tmp_path / "loading").mkdir()
    module = tmp_path / "loading" / "checkpoints.py"
    module.write_text("def f():\n    from ..training.tokenizer import load_tokenizer\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert imported_subpackages(module) == {"training"}
        (tmp_path / "training").mkdir()
        cli = tmp_path / "training" / "cli.py"
        cli.write_text("from elastic_mdm.evaluation.lengths import length_sweep\nfrom . import trainer\n")
        assert imported_subpackages(cli) == {"evaluation", "training"}
    finally:
        PACKAGE = saved
