"""cvvae-deploy: CV-VAE (arXiv 2405.20279) from the PyTorch reference to ONNX, TensorRT and a streaming runtime.

Public API of the reference side; the runtime lives in :mod:`cvvae.runtime`, export in :mod:`cvvae.export`.
The names that need PyTorch (model, loading) are imported on first use, so ``import cvvae.runtime`` in a torch-free
install (docs/thin-runtime.md) never touches them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import PRESETS, ModelConfig, preset
from .errors import BackendUnavailableError, CheckpointError, CVVAEError, InputError
from .plan import PlanSettings, VideoPlan, make_plan

__version__ = "0.1.0"

_LAZY = {"create_model": "loading", "load_model": "loading", "save_model": "loading",
         "CVVAE": "model", "DiagonalGaussian": "model", "EncodeResult": "model"}

__all__ = [
    "CVVAE", "PRESETS", "BackendUnavailableError", "CVVAEError", "CheckpointError", "DiagonalGaussian",
    "EncodeResult", "InputError", "ModelConfig", "PlanSettings", "VideoPlan", "create_model", "load_model",
    "make_plan", "preset", "save_model",
]


def __getattr__(name: str) -> Any:
    """The torch side of the public API (PEP 562): imported when first asked for, with the install hint if absent."""
    if name not in _LAZY:
        raise AttributeError(f"module 'cvvae' has no attribute {name!r}")
    from .extras import require

    require("torch", f"cvvae.{name}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
