"""Where the built-in default model lives (docs/default-model.md): weights, config and its shipped ONNX graphs.

The graphs are package data made from the weights by ``scripts/export_default_graphs.py``; their manifest records
the weights' sha256, so the torch-free runtime runs exactly the model the PyTorch side loads (tests/test_default_graphs.py).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "default"
DEFAULT_WEIGHTS = DEFAULT_MODEL_DIR / "diffusion_pytorch_model.safetensors"
DEFAULT_GRAPHS = DEFAULT_MODEL_DIR / "onnx"  # an export directory (manifest.json + graphs), see cvvae.export
