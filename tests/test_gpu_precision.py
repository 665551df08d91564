"""On a CUDA GPU (issue 16): golden parity in fp32/bf16/fp16 and no NaN/Inf in fp16 on saturated inputs.

fp32 must reproduce the official tensors to 1e-4 (TF32 off). bf16 and fp16 are judged by PSNR against the golden
fp32 tensors; the limits below are first-run limits set before any GPU was lent to this project (the CPU's emulated
bf16 gives 40-50 dB on these random-weight checkpoints): scripts/gpu_check.sh prints the measured figures, tighten
them from there. Skipped (with the reason) where torch sees no CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_cases
from cvvae.metrics import psnr

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_PSNR_DB = {"bf16": 30.0, "fp16": 40.0}   # decoded pixels and latent means vs the golden fp32 tensors
FP32_TOL = 1e-4


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("golden", ["public-v1-tiny", "public-sd3-tiny"])
def test_golden_on_cuda(golden, precision):
    from conftest import golden_dir
    from cvvae.loading import load_model

    path = golden_dir(golden)
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 support")
    model = load_model(path / "checkpoint", device="cuda", dtype=DTYPES[precision])
    ref = load_file(str(path / "reference.safetensors"))
    for case in golden_cases(golden):
        x = ref[f"{case}.input"].to("cuda", DTYPES[precision])
        result = model.encode(x)
        mean = result.mean.float().cpu()
        z = ref[f"{case}.latent_mean"].to("cuda", DTYPES[precision])
        decoded = model.decode(z, num_frames=result.num_frames, height=result.height, width=result.width)
        decoded = decoded.float().cpu()
        assert torch.isfinite(mean).all() and torch.isfinite(decoded).all(), f"{case}: NaN/Inf in {precision}"
        if precision == "fp32":
            assert (mean - ref[f"{case}.latent_mean"]).abs().max().item() <= FP32_TOL, case
            assert (decoded - ref[f"{case}.decoded"]).abs().max().item() <= FP32_TOL, case
        else:
            span = float(ref[f"{case}.latent_mean"].max() - ref[f"{case}.latent_mean"].min())
            latent_db = psnr(mean, ref[f"{case}.latent_mean"], data_range=span)
            pixel_db = psnr(decoded, ref[f"{case}.decoded"])
            print(f"{golden} {case} {precision}: latent {latent_db:.1f} dB, decoded {pixel_db:.1f} dB")
            assert min(latent_db, pixel_db) >= MIN_PSNR_DB[precision], (case, latent_db, pixel_db)


def _saturated(frames: int, size: int) -> list[torch.Tensor]:
    """Pixels at the ends of the range: all white, all black, and a one-pixel checkerboard of both."""
    white = torch.ones(1, 3, frames, size, size)
    board = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 2.0 - 1
    return [white, -white, board.expand(1, 3, frames, size, size).contiguous()]


@pytest.mark.parametrize("model_path", [None, "random:cvvae-v1"])
def test_fp16_stays_finite_on_saturated_inputs(model_path):
    from cvvae.runtime import VideoVAE

    vae = VideoVAE.load(model_path, device="cuda", precision="fp16")
    for x in _saturated(17, 256):
        latents = vae.encode(x.cuda())
        assert torch.isfinite(latents.mean).all() and torch.isfinite(latents.logvar).all()
        big = latents.mean * 4  # latents far outside the training range
        assert torch.isfinite(vae.decode(big)).all()
