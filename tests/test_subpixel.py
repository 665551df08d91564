"""The conv after nearest upsampling computed on the low-resolution frames (cvvae.subpixel, issue 16): equal to the
written Upsample3D (upsample, pad, conv, interleave) for both variants, only in float32/float64 pure inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvvae import blocks
from cvvae.loading import create_model
from cvvae.subpixel import nearest_up_conv, phase_weights


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _written(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad_mode: str, n: int) -> torch.Tensor:
    up = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    up = F.pad(up, (1, 1, 1, 1)) if pad_mode == "zeros" else F.pad(up, (1, 1, 1, 1, 0, 0), mode="replicate")
    y = F.conv3d(up, weight, bias)
    b, _, t, h, w = y.shape
    return y.reshape(b, n, -1, t, h, w).permute(0, 2, 3, 1, 4, 5).flatten(2, 3)


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (6, 4)])
def test_phase_convs_equal_upsample_then_conv(pad_mode, n, size):
    x = _rand(2, 8, 4, *size, seed=1).double()
    weight, bias = _rand(n * 6, 8, 3, 3, 3, seed=2).double(), _rand(n * 6, seed=3).double()
    got = nearest_up_conv(x, weight, bias, pad_mode=pad_mode, time_factor=n)
    want = _written(x, weight, bias, pad_mode, n)
    assert got.shape == want.shape == (2, 6, 2 * n, 2 * size[0], 2 * size[1])
    assert (got - want).abs().max() < 1e-12  # float64: the folded taps are exact sums
    got32 = nearest_up_conv(x.float(), weight.float(), bias.float(), pad_mode=pad_mode, time_factor=n)
    assert got32.dtype == torch.float32 and (got32 - want).abs().max() / want.abs().max() < 2e-6


def test_phase_weights_fold_the_kernel_rows_each_phase_reads():
    weight = torch.arange(9.0).reshape(1, 1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    phases = phase_weights(weight)[:, 0, 0]
    assert phases.shape == (4, 2, 2) and phases.dtype == torch.float32
    # phase (0, 0): row i-1 is kernel row 0, row i is rows 1+2; column j-1 is column 0, column j columns 1+2
    assert phases[0].tolist() == [[0.0, 3.0], [9.0, 24.0]]
    assert phases[3].tolist() == [[8.0, 7.0], [13.0, 8.0]]  # (1, 1): rows 0+1 then 2, columns 0+1 then 2
    assert phases.sum((1, 2)).tolist() == [36.0] * 4  # every phase reads every tap once
    with pytest.raises(ValueError, match="3x3 spatial kernel"):
        phase_weights(torch.zeros(1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="5 output channels do not split into 2 frames"):
        nearest_up_conv(torch.zeros(1, 1, 3, 2, 2), torch.zeros(5, 1, 3, 3, 3), None, pad_mode="zeros", time_factor=2)


@pytest.mark.parametrize("variant", ["v1", "sd3"])
@pytest.mark.parametrize("up_time", [True, False])
def test_upsample_in_inference_equals_the_written_form(variant, up_time):
    torch.manual_seed(4)
    layer = blocks.Upsample3D(8, up_time=up_time, variant=variant).eval()
    x = _rand(1, 8, 3, 5, 6, seed=5)
    with torch.no_grad():
        assert layer.subpixel(x)
        fast = layer(x)
    written = layer(x.requires_grad_()).detach()  # autograd on: the form written in forward (and exported)
    assert not layer.subpixel(x)
    assert fast.shape == written.shape == (1, 8, 5 if up_time else 3, 10, 12)
    assert (fast - written).abs().max() < 2e-5


def test_half_precisions_keep_the_written_upsample():
    layer = blocks.Upsample3D(4, up_time=True, variant="v1").eval().to(torch.bfloat16)
    x = _rand(1, 4, 2, 3, 3, seed=6).bfloat16()
    with torch.no_grad():
        assert not layer.subpixel(x)
        fast = layer(x)
    assert torch.equal(fast, layer(x.requires_grad_()).detach())  # bitwise: the same ops ran


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-sd3"])
def test_decoder_with_phase_convs_equals_the_written_decoder(preset):
    model = create_model(preset, seed=0).eval()
    z = _rand(1, model.config.latent_channels, 3, 4, 6, seed=7)
    with torch.no_grad():
        fast = model.decoder(z)
    written = model.decoder(z.requires_grad_()).detach()
    assert fast.shape == written.shape == (1, 3, 9, 32, 48)
    assert (fast - written).abs().max() < 1e-4  # the golden tolerance
