"""The import contract of docs/architecture.md: no module imports a module of a higher layer.

Every module of the ``cvvae`` namespace (the folders pyproject's ``package-dir`` maps into it) is read with ``ast``;
every import counts, at module level or inside a function, absolute or relative, and ``importlib.import_module`` of a
literal name. Layers, bottom to top (same rank, different group: neither may import the other):

    0 core (cvvae/*) . 1 export . 2 calibration, engines . 3 runtime . 4 tools, dataset, training . 5 CLIs

A CLI module is any ``cli.py`` or ``*_cli.py``: click commands on top of everything, wherever their folder is.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RANK = {"core": 0, "export": 1, "calibration": 2, "engines": 2, "runtime": 3, "tools": 4, "dataset": 4,
        "training": 4, "cli": 5}
GROUP_OF_PACKAGE = {"cvvae.training": "training", "cvvae.runtime.dataset": "dataset", "cvvae.export": "export",
                    "cvvae.calibration": "calibration", "cvvae.engines": "engines", "cvvae.runtime": "runtime",
                    "cvvae.tools": "tools", "cvvae": "core"}


def layer_of(module: str) -> str:
    """The group of a module name (``cvvae.engines.build`` -> ``engines``); CLIs are their own group on top."""
    last = module.rpartition(".")[2]
    if last == "cli" or last.endswith("_cli"):
        return "cli"
    for package in sorted(GROUP_OF_PACKAGE, key=len, reverse=True):  # the longest package prefix decides
        if module == package or module.startswith(package + "."):
            return GROUP_OF_PACKAGE[package]
    raise AssertionError(f"{module} is in no layer: add its package to GROUP_OF_PACKAGE and docs/architecture.md")


def find_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``) for every .py file of the folders in ``package-dir``."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    modules: dict[str, tuple[Path, bool]] = {}
    for package, folder in dirs.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            # a folder that is itself mapped (cvvae/ holds no export/, but be exact) belongs to its own mapping
            owner = max((p for p in dirs if name == p or name.startswith(p + ".")), key=len)
            if owner == package:
                modules[name] = (path, is_package)
    return modules


def _resolve(target: str, names: list[str], known: dict) -> list[str]:
    """``from target import a, b``: the submodules a, b where they are modules, else ``target`` itself."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return found if len(found) == len(names) else [target, *found]


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__" ...:``, alone or in an ``and``: code that runs only as a program."""
    test = node.test if isinstance(node, ast.If) else None
    tests = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
    return any(isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
               and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators) for t in tests)


def _module_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of a module except the bodies of ``__main__`` guards: a file run as a program (``python
    export/to_onnx.py``) is an entry point on top of every layer, and nothing importing the module runs that code."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if _is_main_guard(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports_of(module: str, path: Path, is_package: bool, known: dict) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a ``cvvae`` module in ``path``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in _module_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, t) for t in _resolve(target, [a.name for a in node.names], known)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                base = package.split(".")
                name = ".".join(base[: len(base) - level + 1] + [name.lstrip(".")])
            found.append((node.lineno, name))
    return [(line, t) for line, t in found if t == "cvvae" or t.startswith("cvvae.")]


def violations(root: Path) -> list[str]:
    """One line per upward (or sideways) import: ``file:line: module (layer) imports module (layer)``."""
    known = find_modules(root)
    out = []
    for module, (path, is_package) in sorted(known.items()):
        here = layer_of(module)
        for line, target in imports_of(module, path, is_package, known):
            there = layer_of(target)
            if there != here and RANK[there] >= RANK[here]:
                out.append(f"{path.relative_to(root)}:{line}: {module} ({here}) imports {target} ({there})")
    return out


def test_no_module_imports_a_higher_layer():
    bad = violations(ROOT)
    assert not bad, "imports against the layer rule (docs/architecture.md):\n" + "\n".join(bad)


def test_every_module_has_a_layer_and_the_rule_reads_them_all():
    modules = find_modules(ROOT)
    assert {layer_of(m) for m in modules} == set(RANK)  # every group has modules; none is unknown
    assert layer_of("cvvae.training.trainer") == "training" and layer_of("cvvae.training.cli") == "cli"
    assert layer_of("cvvae.runtime.dataset.plan") == "dataset" and layer_of("cvvae.runtime.dataset_cli") == "cli"
    assert layer_of("cvvae.video_io") == "core" and layer_of("cvvae.engines.trt_backend") == "engines"
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert len(modules) == sum(len(list((ROOT / f).rglob("*.py"))) for f in folders)  # every file was read


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checker_fails_on_upward_imports(tmp_path):
    """A synthetic tree with the real package-dir: each kind of upward import is found, with file:line (type-checking
    imports too); a ``__main__`` guard's imports are a program's, not the module's."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    _write(tmp_path, {
        "cvvae/__init__.py": "",
        "cvvae/plan.py": "import math\n\n\ndef f():\n    from .runtime import api\n    return api\n",
        "cvvae/cli.py": "from cvvae.training import trainer\nfrom cvvae.tools import bench\n",  # CLIs: anything
        "cvvae/training/__init__.py": "",
        "cvvae/training/trainer.py": "from ..runtime.api import VideoVAE\nfrom .. import plan\n",  # allowed: down
        "export/__init__.py": "",
        "export/manifest.py": "import importlib\nm = importlib.import_module('cvvae.engines.build')\n",
        "engines/__init__.py": "",
        "engines/build.py": "from cvvae.calibration import data\n",  # a peer: neither imports the other
        "engines/profile.py": "import typing\nif typing.TYPE_CHECKING:\n    from cvvae.runtime import api\n",
        "export/to_onnx.py": "if __name__ == '__main__' and not __package__:\n    from cvvae.export.cli import main\n",
        "calibration/__init__.py": "",
        "calibration/data.py": "from cvvae.runtime.video import read\n",
        "runtime/__init__.py": "from .api import VideoVAE\n",
        "runtime/api.py": "VideoVAE = None\n",
        "runtime/video.py": "import cvvae.training.trainer\n",
        "runtime/dataset/__init__.py": "",
        "tools/__init__.py": "",
        "tools/bench.py": "from cvvae.runtime.dataset import __name__ as n\n",  # tools and dataset are peers
    })
    assert violations(tmp_path) == [
        "calibration/data.py:1: cvvae.calibration.data (calibration) imports cvvae.runtime.video (runtime)",
        "engines/build.py:1: cvvae.engines.build (engines) imports cvvae.calibration.data (calibration)",
        "engines/profile.py:3: cvvae.engines.profile (engines) imports cvvae.runtime.api (runtime)",
        "export/manifest.py:2: cvvae.export.manifest (export) imports cvvae.engines.build (engines)",
        "cvvae/plan.py:5: cvvae.plan (core) imports cvvae.runtime.api (runtime)",
        "runtime/video.py:1: cvvae.runtime.video (runtime) imports cvvae.training.trainer (training)",
        "tools/bench.py:1: cvvae.tools.bench (tools) imports cvvae.runtime.dataset (dataset)",
    ]


def test_an_unmapped_package_is_refused():
    with pytest.raises(AssertionError, match="cvvaex.plugin is in no layer"):
        layer_of("cvvaex.plugin")
