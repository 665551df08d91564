"""The default model's shipped ONNX graphs belong to its weights (docs/thin-runtime.md; torch-free)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cvvae.config import ModelConfig
from cvvae.default_model import DEFAULT_GRAPHS, DEFAULT_MODEL_DIR, DEFAULT_WEIGHTS
from cvvae.export.manifest import load_manifest
from cvvae.fsutil import sha256_file
from cvvae.runtime.api import shipped_graphs


def test_graphs_were_exported_from_the_shipped_weights():
    manifest = load_manifest(DEFAULT_GRAPHS)
    assert manifest.checkpoint["sha256"] == sha256_file(DEFAULT_WEIGHTS), (
        "cvvae/weights/default changed but its ONNX graphs were not exported again: "
        "run python scripts/export_default_graphs.py")
    config = ModelConfig.from_dict(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()))
    assert manifest.model_config() == config


def test_graph_files_match_their_recorded_hashes():
    manifest = load_manifest(DEFAULT_GRAPHS)
    for component in ("encoder", "decoder"):
        assert manifest.precisions(component) == ["fp32", "fp16"]
        for precision in ("fp32", "fp16"):
            graph = manifest.graph_file(component, precision)
            assert sha256_file(manifest.graph_path(component, precision)) == graph.sha256
            assert graph.verified, f"{component} {precision} was exported without verification"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_runtime_finds_the_shipped_graphs(precision):
    assert shipped_graphs(precision) == DEFAULT_GRAPHS
    assert shipped_graphs("int8") is None


def test_shipped_graphs_encode_and_decode():
    from cvvae.runtime import VideoVAE

    vae = VideoVAE.load(backend="onnxruntime")
    assert vae.backend.export_dir == DEFAULT_GRAPHS
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    latents = vae.encode(frames)
    assert latents.mean.shape == (1, 4, 2, 2, 3) and latents.metadata["model_sha256"] == sha256_file(DEFAULT_WEIGHTS)
    assert vae.decode(latents).shape == (1, 3, 5, 16, 24)
