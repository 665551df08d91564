"""PSNR/SSIM helpers and the video-VAE / image-VAE compatibility measure."""

from __future__ import annotations

import math

import pytest
import torch

from cvvae.training.compat import measure_compat
from cvvae.errors import InputError
from cvvae.training.image_vae import IMAGE_PRESETS, ImageVAE
from cvvae.training.inflate import inflate
from cvvae.loading import create_model
from cvvae.metrics import psnr, psnr_per_frame, ssim_video


def test_psnr_by_hand():
    a = torch.zeros(1, 3, 2, 4, 4)
    assert psnr(a, a.clone()) == math.inf
    # [-1, 1] data, range 2: an offset of 0.1 everywhere gives MSE 0.01 and 10*log10(4/0.01) = 26.0206 dB
    assert psnr(a + 0.1, a) == pytest.approx(26.020599913279625)
    # the same pair mapped to [0, 1] with range 1 gives the same figure (MSE 0.0025)
    assert psnr((a + 0.1 + 1) / 2, (a + 1) / 2, data_range=1.0) == pytest.approx(26.020599913279625)
    b = a.clone()
    b[:, :, 1] = 0.2                                            # frame 0 exact, frame 1 MSE 0.04 -> 20 dB
    assert psnr_per_frame(b, a) == [math.inf, pytest.approx(20.0)]
    assert psnr(b, a) == pytest.approx(10 * math.log10(4 / 0.02))


def test_ssim_identical_and_degraded():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 2, 16, 16, generator=g) * 2 - 1
    mean, per_frame = ssim_video(a, a.clone())
    assert mean == pytest.approx(1.0) and per_frame == [pytest.approx(1.0)] * 2
    mean, per_frame = ssim_video(a, (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(-1, 1))
    assert 0 < mean < 0.9 and len(per_frame) == 2
    with pytest.raises(ValueError, match="smaller than SSIM's 11x11 window"):
        ssim_video(a[..., :10, :16], a[..., :10, :16])


def test_ssim_is_wang_on_unit_floats():
    """Flat frames pin the definition: pixels 0 and 0.2 in [-1, 1] are 0.5 and 0.6 in [0, 1], so SSIM is the
    luminance term (2*0.5*0.6 + C1) / (0.5^2 + 0.6^2 + C1) with C1 = (0.01 * 1)^2 (data range 1): 0.98361. On [-1, 1]
    with range 2 it would be 0.0099, on uint8 frames (128 vs 153, range 255) 0.9843."""
    a = torch.zeros(1, 3, 1, 16, 16)
    mean, _ = ssim_video(a, a + 0.2)
    assert mean == pytest.approx((2 * 0.5 * 0.6 + 1e-4) / (0.5**2 + 0.6**2 + 1e-4), abs=1e-6)


@pytest.fixture(scope="module")
def image_vae() -> ImageVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ImageVAE(IMAGE_PRESETS["tiny-image"]).eval()


def test_measure_compat_on_tiny_models(image_vae):
    frames = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    video_vae = create_model("tiny-v1", seed=0)
    result = measure_compat(video_vae, image_vae, frames)
    numbers = [result[k] for k in ("video_psnr", "video_ssim", "image_decoder_psnr", "image_decoder_ssim")]
    assert all(math.isfinite(v) for v in numbers)
    assert len(result["video_psnr_per_frame"]) == 9 and len(result["video_ssim_per_frame"]) == 9
    assert len(result["image_decoder_psnr_per_frame"]) == 3 and len(result["image_decoder_ssim_per_frame"]) == 3
    assert result["num_latent_frames"] == 3 and result["mapping"] == "slice"
    first = measure_compat(video_vae, image_vae, frames, mapping="first")
    assert len(first["image_decoder_psnr_per_frame"]) == 1
    assert first["video_psnr"] == result["video_psnr"]


def test_inflated_model_reads_like_the_image_vae(image_vae):
    """A static clip through the inflated model: its latent decodes with the image decoder like its own frames."""
    frame = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    video_vae = inflate(image_vae).eval()
    result = measure_compat(video_vae, image_vae, frame.expand(-1, -1, 5, -1, -1).contiguous())
    with torch.no_grad():
        image_rec = image_vae.decode(image_vae.encode(frame[:, :, 0]).mean).clamp(-1, 1)
    expected = psnr(image_rec, frame[:, :, 0])
    # the image decoder sees (almost) the image latent: eps 1e-5 vs 1e-6 is the only encoder difference
    assert result["image_decoder_psnr"] == pytest.approx(expected, abs=0.05)


def test_measure_compat_rejects_misaligned_input(image_vae):
    video_vae = create_model("tiny-v1", seed=0)
    with pytest.raises(InputError, match="keep the first 9 frames"):
        measure_compat(video_vae, image_vae, torch.zeros(1, 3, 10, 32, 32))
    with pytest.raises(InputError, match="multiple of 8"):
        measure_compat(video_vae, image_vae, torch.zeros(1, 3, 9, 36, 32))
    with pytest.raises(InputError, match="unknown mapping"):
        measure_compat(video_vae, image_vae, torch.zeros(1, 3, 9, 32, 32), mapping="last")
