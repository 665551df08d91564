"""Shared fixtures: golden data from the official implementation, tiny models, thread limits.

Imports without PyTorch: tests/thin runs in the torch-free base install (docs/thin-runtime.md) with this conftest.
"""

from __future__ import annotations

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


def max_abs(a, b) -> float:
    """Largest absolute difference of two arrays of any family (numpy, torch, ...), in float32."""
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float(np.abs(to_numpy(a, np.float32) - to_numpy(b, np.float32)).max())
