"""ONNX Runtime (CPU) vs the PyTorch reference executing the same plan; golden values through the ORT runtime."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import VIDEOS, max_abs
from cvvae.cli import main
from cvvae.export.to_onnx import ExportConfig
from cvvae.loading import load_model
from cvvae.runtime import VideoVAE
from cvvae.video_io import read_video

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(shared_exports):
    return shared_exports.get("golden-v1")


@pytest.fixture(scope="module")
def runtimes(golden_v1, exported):
    return VideoVAE.load(golden_v1 / "checkpoint"), VideoVAE.load(exported, backend="onnxruntime")


def test_golden_through_onnxruntime(golden_v1, runtimes):
    _, ort = runtimes
    ref = load_file(str(golden_v1 / "reference.safetensors"))
    for case in ("image", "clip9", "clip33_tiled"):
        latents = ort.encode(ref[f"{case}.input"])
        assert max_abs(latents.mean, ref[f"{case}.latent_mean"]) <= TOL
        assert max_abs(latents.logvar, ref[f"{case}.latent_logvar"]) <= TOL
        assert max_abs(ort.decode(ref[f"{case}.latent_mean"]), ref[f"{case}.decoded"]) <= TOL


def test_real_65_frame_clip_chunked_and_tiled(runtimes):
    clips = sorted(VIDEOS.glob("*.mp4"))
    if not clips:
        pytest.skip(f"no real clips in {VIDEOS}")
    frames, _ = read_video(clips[0], max_frames=65, size=(48, 72))
    torch_vae, ort_vae = runtimes
    plan = torch_vae.plan(65, 48, 72)
    assert len(plan.encode_chunks) == 4 and len(plan.decode_chunks) == 4 and plan.num_tiles == 2
    a, b = torch_vae.encode(frames), ort_vae.encode(frames)
    assert a.mean.shape == (1, 4, 17, 6, 9)
    assert max_abs(a.mean, b.mean) <= TOL and max_abs(a.logvar, b.logvar) <= TOL
    assert max_abs(torch_vae.decode(a), ort_vae.decode(a)) <= TOL
    assert b.metadata["model_sha256"] == a.metadata["model_sha256"]  # the export records its checkpoint


def test_parity_command_on_export_dir(exported, tmp_path):
    import numpy as np

    x = torch.rand(1, 3, 9, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.save(tmp_path / "x.npy", x.numpy())
    r = CliRunner().invoke(main, ["parity", str(tmp_path / "x.npy"), "--model", str(exported), "--json"])
    assert r.exit_code == 0, r.output
    import json

    rows = {row["name"]: row for row in json.loads(r.output)}
    assert set(rows) == {"onnxruntime/encoder.mean", "onnxruntime/encoder.logvar", "onnxruntime/decoder.video",
                         "onnxruntime/round_trip.video"}
    assert all(row["max_abs"] <= TOL for row in rows.values())


def test_missing_precision_is_explained(exported):
    from cvvae.errors import InputError

    with pytest.raises(InputError, match="no fp16 encoder graph"):
        VideoVAE.load(exported, backend="onnxruntime", precision="fp16")


def test_cached_export_key_covers_weights_options_and_versions(golden_v1, monkeypatch):
    from cvvae.runtime import api

    model = load_model(golden_v1 / "checkpoint")
    base = api.export_cache_key(model, ExportConfig())
    assert len(base) == 64 and base == api.export_cache_key(load_model(golden_v1 / "checkpoint"), ExportConfig())
    assert api.export_cache_key(model, ExportConfig(opset=18)) != base
    assert api.export_cache_key(model, ExportConfig(precisions=("fp32",))) != base
    assert api.export_cache_key(load_model("random:tiny-v1"), ExportConfig()) != base
    import torch  # export_cache_key imports torch lazily (the runtime module itself never does)

    monkeypatch.setattr(torch, "__version__", "0.0.0-another-torch")
    assert api.export_cache_key(model, ExportConfig()) != base


def test_cached_export_made_once_and_fp32_reuses_the_fp16_entry(golden_v1, tmp_path, monkeypatch):
    from cvvae.runtime import api

    monkeypatch.setenv("CVVAE_CACHE", str(tmp_path))
    calls = []
    import cvvae.export.to_onnx as to_onnx

    original = to_onnx.export_model
    monkeypatch.setattr(to_onnx, "export_model", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    first = api.cached_export(golden_v1 / "checkpoint", precision="fp16")
    assert (first / "manifest.json").exists() and first.parent == tmp_path / "exports" and len(calls) == 1
    assert api.cached_export(golden_v1 / "checkpoint", precision="fp16") == first
    assert api.cached_export(golden_v1 / "checkpoint", precision="fp32") == first  # fp16 entries hold fp32 too
    assert len(calls) == 1
    vae = VideoVAE.load(golden_v1 / "checkpoint", backend="onnxruntime")
    assert len(calls) == 1 and vae.config == load_model(golden_v1 / "checkpoint").config
