"""Shared fixtures: golden data from the official implementation, tiny models, thread limits.

Imports without PyTorch: tests/thin runs in the torch-free base install (docs/thin-runtime.md) with this conftest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cvvae.arrays import to_numpy
from cvvae.extras import is_installed

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CVVAE_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
VIDEOS = SHARED / "data" / "videos"

if is_installed("torch"):
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def golden_dir(name: str) -> Path:
    path = GOLDEN / name
    if not (path / "manifest.json").exists():
        pytest.skip(f"golden data {path} not found (set CVVAE_SHARED to the shared/ folder)")
    return path


def golden_cases(name: str) -> list[str]:
    path = GOLDEN / name / "manifest.json"
    return list(json.loads(path.read_text())["cases"]) if path.exists() else []


@pytest.fixture(scope="session")
def golden_v1() -> Path:
    return golden_dir("public-v1-tiny")


@pytest.fixture(scope="session")
def golden_sd3() -> Path:
    return golden_dir("public-sd3-tiny")


@pytest.fixture(scope="session")
def tiny_v1():
    from cvvae.loading import create_model

    return create_model("tiny-v1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3():
    from cvvae.loading import create_model

    return create_model("tiny-sd3", seed=0)


class SharedExports:
    """ONNX exports made once per session and shared by the test modules that only read them (each costs 10-15 s
    of CPU on 2 cores). ``get("golden-v1" | "tiny-v1", precisions)``: the golden v1 checkpoint or random:tiny-v1
    (seed 0), unverified (tests/test_export.py verifies). A test that changes files copies the folder first; at the
    end of the session every shared folder must hold exactly the bytes it was made with."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, tuple[str, ...]], tuple[Path, dict[str, str]]] = {}

    def get(self, source: str, precisions: tuple[str, ...] = ("fp32",)) -> Path:
        key = (source, tuple(precisions))
        if key not in self.made:
            from cvvae.export.to_onnx import ExportConfig, export_model
            from cvvae.loading import create_model, load_model

            model = (load_model(golden_dir("public-v1-tiny") / "checkpoint") if source == "golden-v1"
                     else create_model(source, seed=0))
            out = self.root / f"{source}-{'-'.join(precisions)}"
            export_model(model, out, ExportConfig(precisions=precisions, verify=False))
            self.made[key] = out, self.digest(out)
        return self.made[key][0]

    @staticmethod
    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    def changed(self) -> list[str]:
        return [str(out) for out, digest in self.made.values() if self.digest(out) != digest]


@pytest.fixture(scope="session")
def shared_exports(tmp_path_factory):
    exports = SharedExports(tmp_path_factory.mktemp("shared-exports"))
    yield exports
    assert not exports.changed(), f"a test changed a shared export (copy it first): {exports.changed()}"


def max_abs(a, b) -> float:
    """Largest absolute difference of two arrays of any family (numpy, torch, ...), in float32."""
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float(np.abs(to_numpy(a, np.float32) - to_numpy(b, np.float32)).max())
