"""The project's layering rules, checked on the source.

The layers, from the bottom:

* ``_core``: types, records, tree helpers, checks, errors. Imports nothing else of avgfn.
* ``_round``: the round engine, the only code that packs buffers. Imports only ``_core``.
* ``optim``: functional optimizers. Imports only ``_core``.
* ``_algorithms``: one averager per module. Imports ``_core``, ``_round``, ``optim`` and each other.
* ``_training``: composition with a training step. Imports the layers below it.
* ``_adapters``: ``nn.Module`` and ``torch.optim`` drivers, at the top.
* ``collectives`` and ``simulate``: Reduces for real and simulated groups. Import only ``_core``.
* ``torchft``: the Reduce over a torchft quorum and its replica driver. Imports ``_core`` and ``_checkpoint``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


def _layer(module: str) -> str:
    """The layer of a dotted avgfn module name: its first component below ``avgfn``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _avgfn_imports(path: Path) -> set[str]:
    """The layers of avgfn that ``path`` imports (``avgfn.X...`` -> ``X``)."""
    layers = set()
    for name in _imports(path):
        if name == "avgfn":
            layers.add("")
        elif name.startswith("avgfn."):
            layers.add(_layer(name))
    return layers


ALLOWED = {
    "_core": {"_core"},
    "_round": {"_core", "_round"},
    "optim": {"_core", "optim"},
    "collectives": {"_core"},
    "simulate": {"_core", "simulate"},
    "torchft": {"_core", "_checkpoint"},
    "_algorithms": {"_core", "_round", "optim", "_algorithms"},
    "_training": {"_core", "_round", "optim", "_algorithms", "_training"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    bad = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        name = rel.parts[0].removesuffix(".py")
        if name != layer:
            continue
        extra = _avgfn_imports(path) - ALLOWED[layer]
        if extra:
            bad.append(f"{rel.as_posix()} imports {sorted(extra)}")
    assert not bad, bad


def test_the_layers_exist():
    for layer in ALLOWED:
        assert (PACKAGE / layer).is_dir() or (PACKAGE / f"{layer}.py").is_file(), layer


def test_no_module_reaches_for_another_modules_private_names():
    bad = []
    for path in _modules():
        if "demo" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("avgfn"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    module_path = PACKAGE.joinpath(*node.module.split(".")[1:], alias.name)
                    is_module = module_path.with_suffix(".py").is_file() or module_path.is_dir()
                    if private and not is_module:
                        bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.module}.{alias.name}")
    assert not bad, bad


def test_only_the_tree_module_imports_torchs_pytree():
    users = [p.relative_to(PACKAGE).as_posix() for p in _modules()
             if any(n.startswith("torch.utils._pytree") for n in _imports(p))]
    assert users == ["_core/tree.py"]


def test_only_collectives_imports_torch_distributed():
    # the demo's real-process runner is a program at the edge, like an example
    users = [p.relative_to(PACKAGE).as_posix() for p in _modules()
             if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in _imports(p))]
    # torchft: ReduceOp for its Manager; _round/sharded.py: DTensor leaves (their shards, and one
    # flag and-ed over their mesh); _dcp.py: checkpoints through torch.distributed.checkpoint
    assert users == ["_dcp.py", "_round/sharded.py", "collectives.py", "demo/_real.py", "torchft.py"]
