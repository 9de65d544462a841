"""The package's layers (docs/design.md, "Layers"): every import inside ``star_sp`` points down the table
or stays in its own layer, the math never touches ``torch.distributed``, the two framework adapters never
import each other, and no module reaches for another module's private names. Lazy imports inside
functions count: they run against the layers just the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "star_sp"

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = [
    ("core", ["star_sp.errors", "star_sp._compat", "star_sp.config", "star_sp.layout", "star_sp.testing"]),
    ("math and leaves", ["star_sp.ops", "star_sp.eval", "star_sp.models"]),
    ("collectives", ["star_sp.distributed"]),
    ("runtime", ["star_sp.runtime"]),
    ("adapters", ["star_sp.integrations"]),
    ("training", ["star_sp.training"]),
    ("applications", ["star_sp.apps"]),
]
FACADE = "star_sp"  # star_sp/__init__.py re-exports the public names (lazily for the adapters)


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, parts[-1] == "__init__"


def _imports(name: str, path: Path, is_pkg: bool):
    """``(imported module, names, line)`` for every import of ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, [a.name for a in node.names], node.lineno


def _layer(module: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                best = i
    return best


def _resolve(root: Path, target: str, names: list[str]) -> list[str]:
    """The star_sp modules an import reaches: ``from pkg import submodule`` reaches the submodule."""
    found = []
    for n in names:
        sub = f"{target}.{n}"
        if (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                root.parent / Path(*sub.split(".")) / "__init__.py").exists():
            found.append(sub)
    return found or [target]


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for name, path, is_pkg in _modules(root):
        if name == FACADE:
            continue
        mine = _layer(name)
        where = path.relative_to(root.parent)
        if mine is None:
            bad.append(f"{where}: in no layer; add its folder to LAYERS and docs/design.md")
            continue
        for target, names, line in _imports(name, path, is_pkg):
            if name.startswith("star_sp.ops") and target.startswith("torch.distributed"):
                bad.append(f"{where}:{line}: ops/ imports torch.distributed")
            if not target.startswith("star_sp"):
                continue
            for reached in _resolve(root, target, names):
                theirs = _layer(reached) if reached != FACADE else None
                if reached == FACADE and not all(n.startswith("_compat") for n in names):
                    bad.append(f"{where}:{line}: imports the package facade; import the defining module")
                elif theirs is not None and theirs > mine:
                    bad.append(f"{where}:{line}: {LAYERS[mine][0]} imports {reached} ({LAYERS[theirs][0]})")
            for adapter, other in (("hf", "megatron"), ("megatron", "hf")):
                if name.startswith(f"star_sp.integrations.{adapter}") and target.startswith(
                        f"star_sp.integrations.{other}"):
                    bad.append(f"{where}:{line}: the {adapter} adapter imports the {other} adapter")
            own_module = target == name or (is_pkg and target.startswith(name + "."))
            private = [n for n in names if n.startswith("_") and not n.startswith("__") and n != "_compat"]
            if private and not own_module:
                bad.append(f"{where}:{line}: imports private {private} from {target}; make it public there")
    return bad


def test_every_import_follows_the_layers():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: an ops module importing the runtime, a private name and torch.distributed."""
    fake = tmp_path / "star_sp"
    (fake / "ops").mkdir(parents=True)
    (fake / "runtime").mkdir()
    for d in (fake, fake / "ops", fake / "runtime"):
        (d / "__init__.py").write_text("")
    (fake / "runtime" / "passes.py").write_text("def _hidden():\n    pass\n")
    (fake / "ops" / "bad.py").write_text("import torch.distributed\nfrom ..runtime.passes import _hidden\n")
    found = violations(fake)
    assert any("ops/ imports torch.distributed" in v for v in found), found
    assert any("math and leaves imports star_sp.runtime.passes (runtime)" in v for v in found), found
    assert any("imports private ['_hidden']" in v for v in found), found


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_every_layer_exists(layer):
    prefixes = dict(LAYERS)[layer]
    assert any((ROOT.parent / Path(*p.split("."))).with_suffix(".py").exists()
               or (ROOT.parent / Path(*p.split("."))).is_dir() for p in prefixes)
