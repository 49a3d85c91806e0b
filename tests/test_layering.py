"""The project's layering rules, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "avgfn"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_tree_module_imports_torchs_pytree():
    users = [p.relative_to(PACKAGE).as_posix() for p in _modules()
             if any(n.startswith("torch.utils._pytree") for n in _imports(p))]
    assert users == ["_tree.py"]


def test_only_collectives_imports_torch_distributed():
    # the demo's real-process runner is a program at the edge, like an example
    users = [p.relative_to(PACKAGE).as_posix() for p in _modules()
             if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in _imports(p))]
    assert users == ["collectives.py", "demo/_real.py"]
