"""Real TensorRT builds of a tiny export, compared with the PyTorch reference (needs TensorRT and a CUDA GPU).

Tolerances (max abs error against the fp32 PyTorch reference on CPU): fp32 engines 1e-3 (TF32 off, as built by
default), fp16 engines 2e-2 (fp16 graphs; the ONNX Runtime check of the same graphs measures about 1e-2).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels come from NVIDIA's index)")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

from cvvae.engines import build  # noqa: E402
from cvvae.engines.profile import ShapeOutsideProfileError, default_spec  # noqa: E402
from cvvae.engines.sidecar import StaleEngineError, current_environment  # noqa: E402
from cvvae.engines.trt_backend import TensorRTBackend  # noqa: E402

from cvvae.compare import PARITY  # noqa: E402

TOLERANCE = {p: PARITY[(p, "component")].atol for p in ("fp32", "fp16")}  # 1e-3, 2e-2


@pytest.fixture(scope="module")
def tiny_model():
    from cvvae.loading import create_model

    return create_model("tiny-v1", seed=0)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tiny_model):
    from cvvae.export.manifest import load_manifest
    from cvvae.export.precision import Precision
    from cvvae.export.to_onnx import ExportConfig, export_model

    root = tmp_path_factory.mktemp("trt")
    export_model(tiny_model, root / "export", ExportConfig(precisions=(Precision.FP32, Precision.FP16)))
    spec = default_spec(load_manifest(root / "export"), image_profile=True)  # two profiles per engine
    for precision in ("fp32", "fp16"):
        results = build.build_engines(root / "export", root / "engines", precision, spec=spec,
                                      options=build.BuildOptions(opt_level=1))
        assert [r.status for r in results] == ["built", "built"]
    return root / "engines"


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 3, 17, 64, 64), (1, 3, 1, 24, 40), (1, 3, 5, 32, 56)])
def test_encoder_matches_pytorch(engine_dir, tiny_model, precision, shape):
    backend = TensorRTBackend.load(engine_dir, precision=precision, components=("encoder",))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = tiny_model.encoder(x)
    got = backend.encoder(x.cuda())
    assert got.dtype == torch.float32 and got.is_cuda
    err = _max_abs(ref, got)
    assert err <= TOLERANCE[precision], f"{precision} encoder {shape}: max abs {err:.3e}"
    assert backend.encoder(x).device.type == "cpu"  # a CPU tile comes back on the CPU


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 4, 5, 8, 8), (1, 4, 1, 3, 5), (1, 4, 2, 4, 7)])
def test_decoder_matches_pytorch(engine_dir, tiny_model, precision, shape):
    backend = TensorRTBackend.load(engine_dir, precision=precision, components=("decoder",))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_model.decoder(z)
    err = _max_abs(ref, backend.decoder(z.cuda()))
    assert err <= TOLERANCE[precision], f"{precision} decoder {shape}: max abs {err:.3e}"


def test_chunked_and_tiled_video_matches_pytorch(engine_dir, tiny_model):
    """The runtime's plan (chunks of 17 frames, 64 px tiles) on the TensorRT backend vs the torch backend."""
    from cvvae.runtime.api import VideoVAE
    from cvvae.runtime.backends import TorchBackend

    frames = torch.randint(0, 256, (21, 72, 120, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ref = VideoVAE(TorchBackend(tiny_model))
    got = VideoVAE(TensorRTBackend.load(engine_dir, precision="fp32"))
    assert got.plan(21, 72, 120).num_tiles > 1 and len(got.plan(21, 72, 120).encode_chunks) > 1
    ref_latents, latents = ref.encode(frames), got.encode(frames)
    assert _max_abs(ref_latents.mean, latents.mean) <= TOLERANCE["fp32"]
    assert _max_abs(ref.decode(ref_latents), got.decode(ref_latents)) <= TOLERANCE["fp32"]


def test_shape_outside_profiles_is_named(engine_dir):
    backend = TensorRTBackend.load(engine_dir, precision="fp16", components=("encoder",))
    with pytest.raises(ShapeOutsideProfileError, match=r"input 'video' of shape 1x3x17x72x64 is outside"):
        backend.encoder(torch.zeros(1, 3, 17, 72, 64, device="cuda"))


def test_sidecar_records_this_machine(engine_dir):
    side = json.loads((engine_dir / "encoder.fp16.plan.json").read_text())
    env = current_environment()
    assert side["environment"] == env.as_dict()
    major, minor = torch.cuda.get_device_capability()
    assert side["environment"]["compute_capability"] == f"{major}.{minor}"
    assert len(side["profiles"]) == 2 and side["build"]["strongly_typed"] is True


def test_foreign_engine_is_refused(engine_dir, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(engine_dir, copy)
    path = copy / "decoder.fp16.plan.json"
    side = json.loads(path.read_text())
    side["environment"]["tensorrt_version"] = "9.0.0"
    path.write_text(json.dumps(side))
    with pytest.raises(StaleEngineError, match=r"TensorRT version: built with '9.0.0', now"):
        TensorRTBackend.load(copy, precision="fp16", components=("decoder",))
    TensorRTBackend.load(copy, precision="fp16", components=("encoder",))  # the other engine still loads
