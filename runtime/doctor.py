"""`cvvae doctor`: what this machine can run (backends, providers, GPUs, codecs, versions)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from .backends import available_backends, is_installed


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, dict[str, Any]]:
    from ..loading import DEFAULT_MODEL_DIR

    versions = {name: _version(name) for name in ("cvvae-deploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu",
                                                  "av", "numpy", "tensorrt", "polygraphy", "ray")}
    versions["python"] = platform.python_version()
    gpus = {"cuda available": torch.cuda.is_available()}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        gpus[f"cuda:{i}"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"
    providers: dict[str, Any] = {}
    if is_installed("onnxruntime"):
        import onnxruntime as ort

        providers["onnxruntime providers"] = ", ".join(ort.get_available_providers())
    if versions["onnxruntime"] != "not installed" and versions["onnxruntime-gpu"] != "not installed":
        providers["WARNING"] = "onnxruntime and onnxruntime-gpu are both installed; uninstall one of them"
    import av

    providers["h264 encoder"] = "libx264" if "libx264" in av.codecs_available else "missing (mpeg4 fallback)"
    return {
        "backends": available_backends(),
        "providers": providers,
        "gpus": gpus,
        "versions": versions,
        "default model": {"path": str(DEFAULT_MODEL_DIR),
                          "present": (DEFAULT_MODEL_DIR / "config.json").exists()},
    }
