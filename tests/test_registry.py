"""The seam between the library and the embedded world: the library never imports the world, and finds its
default model and extra subcommands only through the registry."""

from __future__ import annotations

import ast
import os

import pytest

import cones
from cones import registry
from cones.pipeline import resolve_model

LIBRARY = os.path.dirname(cones.__file__)


def _imported_modules(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_library_module_imports_the_world():
    offenders = []
    for folder, _, files in os.walk(LIBRARY):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                if any(m == "cones_world" or m.startswith("cones_world.") for m in _imported_modules(path)):
                    offenders.append(os.path.relpath(path, LIBRARY))
    assert offenders == []


def test_the_import_walk_sees_a_world_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from cones_world.scene import caption\n")
    assert "cones_world.scene" in _imported_modules(str(path))


def test_the_installed_world_is_the_default_model():
    import cones_world

    registry.register_default_model(None)
    model = registry.default_model()
    assert model.name == cones_world.NAME
    assert model.model_path == cones_world.model_path() == resolve_model(None)
    assert "sks" in model.vocabulary()
    example = model.subjects()["striped-circle"]
    assert (example.kind, example.class_word) == ("object", "circle")
    assert len(example.reference_images()) == 5


def test_a_registered_model_replaces_the_default(tmp_path):
    try:
        registry.register_default_model(registry.DefaultModel("mine", str(tmp_path)))
        assert registry.default_model().name == "mine"
        assert registry.default_model().subjects() == {}
    finally:
        registry.register_default_model(None)


def test_no_default_model_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    registry.register_default_model(None)
    try:
        with pytest.raises(registry.NoDefaultModel, match="pass `--model`"):
            registry.default_model()
    finally:
        registry.register_default_model(None)


def test_the_world_adds_its_subcommands():
    names = {module.NAME for module in registry.command_modules()}
    assert {"demo", "train-world"} <= names


def test_help_imports_neither_torch_nor_diffusers():
    """`cones --help` must answer at once: every subcommand imports the heavy libraries only in `run`."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom cones.cli import build_parser\nparser = build_parser()\n"
        "for action in parser._subparsers._group_actions:\n"
        "    for sub in action.choices.values(): sub.format_help()\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
