"""The rooms of the package import only downward (ARCHITECTURE): the CLI looks at the experiments, the
experiments at training, training at the trackers, the results, the run store and the engines, and those at
the models, the tasks and the config, and the config at the registry of models and tasks. Read from the source (every import, also those inside functions),
so a new upward import fails here instead of surfacing as an import cycle later."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "irnn"
# Each room with the rooms below it that it may import; a room may always import itself.
LAYERS = [("registry",), ("config",), ("tasks", "models"), ("engine",), ("runs",), ("results",), ("tracking",), ("train",),
          ("experiments",), ("cli",)]
LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
# Below it but still not its business: an engine runs a model on the data it is handed and never makes any.
FORBIDDEN = {("engine", "tasks")}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "irnn" and parts[1] in LEVEL else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every irnn import in one file."""
    pkg = ".".join(("irnn",) + path.relative_to(PACKAGE).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0] + ".__init__"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: -node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import figures` names a module too
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names] if not node.module else []
            out.append((node.lineno, module))
    return [(line, m) for line, m in out if m == "irnn" or m.startswith("irnn.")]


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = _room(".".join(("irnn",) + path.relative_to(PACKAGE).parts))
        if room is None:
            continue
        for line, module in _imports(path):
            target = _room(module)
            if target is not None and target != room and (LEVEL[target] >= LEVEL[room] or (room, target) in FORBIDDEN):
                bad.append(f"{path.relative_to(PACKAGE)}:{line}: {room} imports {module}")
    return bad


def test_every_room_imports_only_rooms_below_it():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a copy of the package with one upward import (the run store reaching
    up into the experiments, as trackers once did) is reported, with its file and line."""
    import shutil

    copy = tmp_path / "irnn"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    store = copy / "runs" / "store.py"
    store.write_text(store.read_text() + "\n\ndef _late():\n    from ..experiments import figures\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    bad = upward_imports()
    assert bad == [f"runs/store.py:{len(store.read_text().splitlines())}: runs imports irnn.experiments"]
