"""Optional packages and the install line for each (docs/thin-runtime.md: the base install is the runtime).

PyTorch and everything that needs it sit behind the ``torch`` extra; the GPU packages behind ``gpu`` or their
vendors' indexes. Every import of an optional package goes through :func:`lazy_import` or :func:`require`, so a missing
one stops the work before it starts with the exact ``pip install`` line to run.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .errors import BackendUnavailableError

TORCH_EXTRA = 'pip install "cvvae-deploy[torch]" (in a checkout: pip install "torch==2.13.0" -e ".[torch]")'
INSTALL_HINTS = {
    "torch": TORCH_EXTRA,
    "onnx": TORCH_EXTRA,
    "onnxslim": TORCH_EXTRA,
    "matplotlib": TORCH_EXTRA,
    "skimage": TORCH_EXTRA,
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT providers) - never both",
    "tensorrt": "install TensorRT 10/11 for Python (pip install tensorrt from NVIDIA's index) on a CUDA machine",
    "cupy": 'pip install "cvvae-deploy[gpu]" (CuPy for CUDA 12; or pass your own device arrays)',
    "ray": "pip install 'cvvae-deploy[ray]' (ray[data] and pyarrow)",
    "pyarrow": "pip install 'cvvae-deploy[ray]' (or pip install pyarrow)",
    "skvideo": "pip install scikit-video (or the dev extra)",
    "modelopt": "pip install 'nvidia-modelopt[onnx]' (it pulls onnxruntime-gpu: keep it out of the base install)",
}


def install_hint(module: str) -> str:
    """The install line for an optional top-level package."""
    top = module.split(".")[0]
    return INSTALL_HINTS.get(top, f"pip install {top}")


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def missing_message(module: str, feature: str, instead: str | None = None) -> str:
    """The one-line error for a missing optional package: what needs it, the install line, and an alternative."""
    alternative = f"; or {instead}" if instead else ""
    return f"{feature} needs the '{module}' package, which is not installed: {install_hint(module)}{alternative}"


def require(module: str, feature: str, *, instead: str | None = None) -> None:
    """Raise a BackendUnavailableError naming ``feature`` and the install line unless ``module`` is importable
    (``instead``: what the user can do without it, e.g. another option)."""
    if not is_installed(module):
        raise BackendUnavailableError(missing_message(module, feature, instead))


def lazy_import(module: str, feature: str, *, instead: str | None = None) -> Any:
    """Import an optional package, or raise a BackendUnavailableError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(missing_message(module, feature, instead)) from e
