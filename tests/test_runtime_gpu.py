"""ONNX Runtime's CUDA provider with device buffers (IOBinding), fed torch and CuPy arrays (needs onnxruntime-gpu and
a CUDA GPU; docs/thin-runtime.md). Results must equal the CPU run of the same graphs to 1e-3 (cuDNN's convolution
algorithms differ from the CPU's) and stay in the caller's family on the device."""

from __future__ import annotations

import numpy as np
import pytest

from cvvae.extras import is_installed

pytestmark = pytest.mark.gpu

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("ONNX Runtime here has no CUDA provider (install onnxruntime-gpu on a CUDA machine)",
                allow_module_level=True)
from cvvae.runtime.backends import cuda_device_count  # noqa: E402

if not cuda_device_count():
    pytest.skip("no CUDA GPU visible (to torch or CuPy)", allow_module_level=True)

from cvvae.arrays import on_cuda, to_numpy  # noqa: E402
from cvvae.runtime import VideoVAE  # noqa: E402

TOL = 1e-3


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    if not is_installed("torch"):
        from cvvae.default_model import DEFAULT_GRAPHS

        return DEFAULT_GRAPHS
    from cvvae.export.to_onnx import ExportConfig, export_model
    from cvvae.loading import create_model

    out = tmp_path_factory.mktemp("gpu") / "export"
    export_model(create_model("tiny-v1", seed=0), out, ExportConfig(precisions=("fp32",), verify=False))
    return out


def _device_arrays():
    makers = {}
    if is_installed("torch"):
        import torch

        makers["torch"] = lambda a: torch.from_numpy(a).cuda()
    if is_installed("cupy"):
        import cupy

        makers["cupy"] = cupy.asarray
    return makers


@pytest.mark.parametrize("family", ["torch", "cupy"])
def test_cuda_provider_binds_device_arrays(export_dir, family):
    make = _device_arrays().get(family)
    if make is None:
        pytest.skip(f"{family} is not installed")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 9, 40, 56)).astype(np.float32)
    cpu = VideoVAE.load(export_dir, backend="onnxruntime")
    gpu = VideoVAE.load(export_dir, backend="onnxruntime", device="cuda")
    assert gpu.backend.encoder_graph.on_cuda
    expected = cpu.encode(x)
    got = gpu.encode(make(x))
    assert type(got.mean) is type(make(x)) and on_cuda(got.mean)
    assert np.abs(to_numpy(got.mean) - expected.mean).max() <= TOL
    pixels = gpu.decode(got.mean)
    assert type(pixels) is type(got.mean)
    assert np.abs(to_numpy(pixels) - cpu.decode(expected.mean)).max() <= TOL


def test_cuda_provider_on_the_callers_stream(export_dir):
    if not is_installed("torch"):
        pytest.skip("uses a torch CUDA stream")
    import torch

    stream = torch.cuda.Stream()
    x = torch.rand(1, 3, 5, 32, 32, device="cuda") * 2 - 1
    vae = VideoVAE.load(export_dir, backend="onnxruntime", device="cuda", stream=stream)
    with torch.cuda.stream(stream):
        latents = vae.encode(x)
    stream.synchronize()
    cpu = VideoVAE.load(export_dir, backend="onnxruntime").encode(x.cpu().numpy())
    assert float((latents.mean.cpu() - torch.from_numpy(cpu.mean)).abs().max()) <= TOL
