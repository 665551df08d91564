"""`cvvae doctor`: what this machine can run (backends, providers, GPUs, codecs, versions).

Works in the torch-free base install: the GPU listing asks torch where it is installed, else CuPy (docs/thin-runtime.md).
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from ..extras import is_installed
from .backends import available_backends, cuda_device_count, default_backend


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, dict[str, Any]]:
    from ..default_model import DEFAULT_GRAPHS, DEFAULT_MODEL_DIR

    versions = {name: _version(name) for name in ("cvvae-deploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu",
                                                  "av", "numpy", "array-api-compat", "cupy-cuda12x", "tensorrt",
                                                  "polygraphy", "ray")}
    versions["python"] = platform.python_version()
    return {
        "backends": {**available_backends(), "default": default_backend()},
        "providers": _providers(),
        "gpus": _gpus(),
        "versions": versions,
        "default model": {"path": str(DEFAULT_MODEL_DIR),
                          "present": (DEFAULT_MODEL_DIR / "config.json").exists(),
                          "onnx graphs": str(DEFAULT_GRAPHS) if (DEFAULT_GRAPHS / "manifest.json").exists()
                          else "missing (run scripts/export_default_graphs.py)"},
    }


def _gpus() -> dict[str, Any]:
    """CUDA GPUs as torch (where installed) or CuPy describe them."""
    count = cuda_device_count()
    gpus: dict[str, Any] = {"cuda available": count > 0}
    if is_installed("torch"):
        import torch

        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            gpus[f"cuda:{i}"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"
    elif count:
        import cupy

        for i in range(count):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            gpus[f"cuda:{i}"] = (f"{props['name'].decode()}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                                 f"sm_{props['major']}{props['minor']}")
    elif not is_installed("cupy"):
        gpus["note"] = "GPUs are listed through torch or CuPy; neither is installed"
    return gpus


def _providers() -> dict[str, Any]:
    providers: dict[str, Any] = {}
    if is_installed("onnxruntime"):
        import onnxruntime as ort

        providers["onnxruntime providers"] = ", ".join(ort.get_available_providers())
    if _version("onnxruntime") != "not installed" and _version("onnxruntime-gpu") != "not installed":
        providers["WARNING"] = "onnxruntime and onnxruntime-gpu are both installed; uninstall one of them"
    import av

    providers["h264 encoder"] = "libx264" if "libx264" in av.codecs_available else "missing (mpeg4 fallback)"
    return providers
