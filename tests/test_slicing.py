"""Frame-sliced inference (cvvae.slicing, issue 16): every sliced layer equals the whole-tensor layer, in both
variants, at every slice size, including chunks whose frame count does not divide evenly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvvae import blocks, slicing
from cvvae.loading import create_model

TOL = 2e-5  # float rounding of a different summation order (golden tolerance: 1e-4)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _whole_and_sliced(run, limit: int = 1):
    """``run()`` with slicing off, then with ``limit`` bytes per slice (1: one frame per slice everywhere)."""
    with torch.no_grad():
        with slicing.slice_bytes(None):
            whole = run()
        with slicing.slice_bytes(limit):
            parts = run()
    return whole, parts


def test_frame_slices_cover_every_frame_once():
    assert slicing.frame_slices(17, 100) is None  # below the limit: runs whole
    with slicing.slice_bytes(30):
        assert slicing.frame_slices(17, 100) == [(0, 6), (6, 12), (12, 17)]
        assert slicing.frame_slices(1, 100) is None  # one frame cannot be sliced in time
        assert slicing.frame_slices(5, 10_000) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    with slicing.slice_bytes(None):
        assert slicing.frame_slices(17, 1 << 40) is None


@pytest.mark.parametrize("frames", [1, 2, 5, 9])
def test_group_norm_statistics_gathered_by_slices_equal_group_norm(frames):
    norm = nn.GroupNorm(4, 16, eps=1e-5)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = _rand(2, 16, frames, 6, 7) * 3 + 1
    with torch.no_grad(), slicing.slice_bytes(x[:, :, :1].numel() * 4):  # one frame per slice
        fused = slicing.GroupNormSiLU(norm, slicing.Moments.of(x, 4))(x.clone())
        assert (fused - torch.nn.functional.silu(norm(x))).abs().max() < 1e-5


@pytest.mark.parametrize("make", [
    lambda: blocks.CausalConv3d(6, 5, 3, padding=1),                              # encoder: frame 0 repeated twice
    lambda: blocks.CausalConv3d(6, 5, 3, padding=1, spatial_pad_mode="replicate"),
    lambda: blocks.CausalConv3d(6, 5, 3, stride=(2, 2, 2), padding=1, spatial_pad_mode="replicate"),
    lambda: nn.Conv3d(6, 5, 3, padding=1),                                        # decoder: zeros in time
    lambda: nn.Conv3d(6, 5, 3, padding=1, padding_mode="replicate"),
    lambda: nn.Conv3d(6, 5, 1),
    lambda: blocks.Conv2dWithExtraDim(6, 5, 3, padding=1),
], ids=["causal", "causal-replicate", "causal-strided", "zeros", "replicate", "1x1x1", "per-frame"])
@pytest.mark.parametrize("frames", [1, 4, 7])
def test_every_conv_kind_sliced_one_frame_at_a_time_equals_the_whole_conv(make, frames):
    torch.manual_seed(0)
    conv = make()
    x = _rand(1, 6, frames, 9, 8)
    sliced = blocks.sliced_conv(conv)
    with torch.no_grad():
        whole = conv(x)
        parts = slicing.map_frames(x, sliced, [(j, j + 1) for j in range(whole.shape[2])])
    assert parts.shape == whole.shape
    assert (parts - whole).abs().max() < TOL


@pytest.mark.parametrize("variant", ["v1", "sd3"])
@pytest.mark.parametrize("down_time", [True, False])
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_sliced_downsample_equals_whole(variant, down_time, frames):
    torch.manual_seed(1)
    layer = blocks.Downsample3D(8, down_time=down_time, variant=variant).eval()
    x = _rand(1, 8, frames, 12, 10)
    whole, parts = _whole_and_sliced(lambda: layer(x))
    assert parts.shape == whole.shape
    assert (parts - whole).abs().max() < TOL


@pytest.mark.parametrize("variant", ["v1", "sd3"])
@pytest.mark.parametrize("up_time", [True, False])
@pytest.mark.parametrize("frames", [1, 3, 5])
def test_sliced_upsample_equals_whole(variant, up_time, frames):
    torch.manual_seed(2)
    layer = blocks.Upsample3D(8, up_time=up_time, variant=variant).eval()
    x = _rand(1, 8, frames, 5, 6)
    whole, parts = _whole_and_sliced(lambda: layer(x))
    assert parts.shape == whole.shape == (1, 8, 2 * frames - 1 if up_time else frames, 10, 12)
    assert (parts - whole).abs().max() < TOL


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-sd3"])
@pytest.mark.parametrize("limit, batch", [(1, 1), (500_000, 1), (1, 2)])  # 1: one frame per slice everywhere;
# 500 kB: 3 and 6 frames per slice at the two finest levels, the rest whole
def test_sliced_model_equals_whole_model(preset, limit, batch):
    model = create_model(preset, seed=0).eval()
    x = torch.rand(batch, 3, 9, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = model.config.latent_channels
    moments, sliced_moments = _whole_and_sliced(lambda: model.encoder(x), limit)
    pixels, sliced_pixels = _whole_and_sliced(lambda: model.decoder(moments[:, :z]), limit)
    assert sliced_moments.shape == moments.shape and sliced_pixels.shape == pixels.shape == (batch, 3, 9, 32, 48)
    assert (sliced_moments - moments).abs().max() < 1e-4  # the golden tolerance
    assert (sliced_pixels - pixels).abs().max() < 1e-4


def test_bf16_model_sliced_keeps_its_dtype_and_is_as_close_to_fp32_as_whole():
    reference = create_model("tiny-v1", seed=0).eval()
    model = create_model("tiny-v1", seed=0).eval().to(torch.bfloat16)
    z = _rand(1, 4, 2, 2, 2)  # small: bf16 is emulated (slow) on CPUs without AVX512-BF16
    with torch.no_grad():
        fp32 = reference.decoder(z)
    whole, parts = _whole_and_sliced(lambda: model.decoder(z.bfloat16()))
    assert parts.dtype == torch.bfloat16 and parts.shape == whole.shape == (1, 3, 5, 16, 16)
    # bf16 rounds differently per slice (its statistics are gathered in float64 here), not worse
    whole_err, parts_err = (whole.float() - fp32).abs(), (parts.float() - fp32).abs()
    assert parts_err.mean() <= 1.1 * whole_err.mean() and parts_err.max() <= 1.1 * whole_err.max()
    assert parts_err.mean() < 0.01


def test_slicing_is_off_under_autograd():
    block = blocks.ResnetBlock3D(8, 8, causal=False, pad_mode="zeros", eps=1e-5, groups=4,
                                 shortcut_name="nin_shortcut")
    x = _rand(1, 8, 5, 6, 6).requires_grad_()
    with slicing.slice_bytes(1):
        y = block(x)  # autograd on: the whole-tensor path, which backward can run through
        y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
