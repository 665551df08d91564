"""Inference-only memory savings (cvvae.blocks.inference_inplace, issue 16): in-place SiLU and residual sums, per-frame
convs as 1xkxk 3D convs. Same numbers, no effect on training or export."""

from __future__ import annotations

import warnings

import pytest
import torch

from cvvae import blocks
from cvvae.loading import create_model


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-sd3"])
def test_inference_in_place_equals_the_autograd_forward(preset):
    model = create_model(preset, seed=0).eval()
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = model.config.latent_channels
    with torch.no_grad():
        assert blocks.inference_inplace()
        fast_moments = model.encoder(x)
        fast_pixels = model.decoder(fast_moments[:, :z])
    assert not blocks.inference_inplace()  # autograd on: the forward keeps every input backward needs
    moments = model.encoder(x)
    pixels = model.decoder(moments[:, :z].detach())
    # same math; the per-frame convs run as 1xkxk 3D convs there, a different summation order
    assert (fast_moments - moments.detach()).abs().max() < 1e-4  # the golden tolerance
    assert (fast_pixels - pixels.detach()).abs().max() < 1e-4
    pixels.square().mean().backward()  # the training forward is still differentiable
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


def test_inference_in_place_is_off_while_tracing():
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(blocks.inference_inplace())
        return x * 2

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: still what torch.onnx.export runs
        torch.jit.trace(probe, torch.ones(2), check_trace=False)
    assert seen == [False]


@pytest.mark.parametrize("kernel, padding", [(3, 1), (1, 0)])
def test_per_frame_conv_in_inference_equals_the_frames_into_batch_form(kernel, padding):
    conv = blocks.Conv2dWithExtraDim(8, 6, kernel, padding=padding)
    x = torch.randn(2, 8, 5, 12, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = conv(x)
    assert fast.shape == (2, 6, 5, 12, 10) and fast.is_contiguous()
    assert (fast - conv(x).detach()).abs().max() < 1e-5
