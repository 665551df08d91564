"""Frame mappings and the latent-regularised loss (spec 8.2), checked against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from cvvae.training.image_vae import IMAGE_PRESETS, ImageVAE
from cvvae.training.losses import LatentRegularizedLoss, map_frames, num_target_frames, random_frame_indices
from cvvae.model import DiagonalGaussian


def frame_index_video(t: int, batch: int = 1) -> torch.Tensor:
    """(B,1,T,1,1) whose value is the frame index (plus 100 per batch item)."""
    x = torch.arange(t, dtype=torch.float64).reshape(1, 1, t, 1, 1).repeat(batch, 1, 1, 1, 1)
    return x + 100 * torch.arange(batch, dtype=torch.float64).reshape(batch, 1, 1, 1, 1)


def values(x: torch.Tensor, b: int = 0) -> list[float]:
    return x[b, 0, :, 0, 0].tolist()


def test_slice_mean_first_by_hand():
    x = frame_index_video(9)
    assert values(map_frames(x, "slice")) == [0, 4, 8]
    assert values(map_frames(x, "mean")) == [0, 2.5, 6.5]        # (1+2+3+4)/4, (5+6+7+8)/4
    assert values(map_frames(x, "first")) == [0]
    x11 = frame_index_video(11)                                     # frames 9 and 10 fill no group
    assert values(map_frames(x11, "slice")) == [0, 4, 8] and values(map_frames(x11, "mean")) == [0, 2.5, 6.5]
    x5 = frame_index_video(5)
    assert values(map_frames(x5, "mean", time_compress=2)) == [0, 1.5, 3.5]   # (1+2)/2, (3+4)/2
    assert values(map_frames(x5, "slice", time_compress=2)) == [0, 2, 4]
    assert [num_target_frames(9, m) for m in ("slice", "mean", "random", "first")] == [3, 3, 3, 1]


def test_single_frame_reduces_to_frame_zero():
    x = frame_index_video(1) + 7
    for mode in ("first", "slice", "mean", "random"):
        assert values(map_frames(x, mode)) == [7]


def test_random_mapping_ranges_sharing_and_seed():
    x = frame_index_video(13, batch=2)
    seen: list[set[float]] = [set(), set(), set(), set()]
    for seed in range(40):
        out = map_frames(x, "random", generator=torch.Generator().manual_seed(seed))
        picked = values(out)
        assert picked[0] == 0
        assert 1 <= picked[1] <= 4 and 5 <= picked[2] <= 8 and 9 <= picked[3] <= 12
        assert values(out, 1) == [v + 100 for v in picked]          # one index set for the whole batch
        for j, v in enumerate(picked):
            seen[j].add(v)
    assert seen == [{0}, {1, 2, 3, 4}, {5, 6, 7, 8}, {9, 10, 11, 12}]  # every frame of a group gets drawn
    a = random_frame_indices(13, generator=torch.Generator().manual_seed(3))
    b = random_frame_indices(13, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown mapping"):
        map_frames(x, "last")


def constant_image_vae(value: float, moments: list[float] | None = None) -> ImageVAE:
    """Every weight zero: decode() returns ``value`` everywhere (conv_out's bias); encode() returns ``moments``."""
    vae = ImageVAE(IMAGE_PRESETS["tiny-image"]).double()
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        vae.decoder.conv_out.bias.fill_(value)
        if moments is not None:
            vae.quant_conv.bias.copy_(torch.tensor(moments, dtype=torch.float64))
    return vae


def posterior(mean: float, logvar: float, shape=(1, 4, 2, 1, 1)) -> DiagonalGaussian:
    return DiagonalGaussian(torch.full(shape, mean, dtype=torch.float64), torch.full(shape, logvar,
                                                                                     dtype=torch.float64))


def test_nll_and_kl_without_image_decoder_by_hand():
    loss_fn = LatentRegularizedLoss(None, kl_weight=0.5)
    x = torch.zeros(2, 1, 2, 1, 1, dtype=torch.float64)
    xrec = torch.tensor([0.5, -1.5, 1.0, 2.0], dtype=torch.float64).reshape(2, 1, 2, 1, 1)
    z = torch.zeros(2, 4, 1, 1, 1, dtype=torch.float64)
    post = posterior(1.0, 0.0, (2, 4, 1, 1, 1))   # KL per element 0.5*(1 + 1 - 1 - 0) = 0.5; 4 per item -> 2
    loss, logs = loss_fn(x, xrec, z, post)
    # nll = (0.5 + 1.5 + 1 + 2) / (B*T = 4) = 1.25; KL = 2; loss = 1.25 + 0.5 * 2
    assert logs["nll"] == pytest.approx(1.25) and logs["kl"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(2.25)
    with torch.no_grad():
        loss_fn.logvar.fill_(math.log(2.0))
    loss, logs = loss_fn(x, xrec, z, posterior(0.0, math.log(2.0), (2, 4, 1, 1, 1)))
    # nll = (5/2 + 4 ln 2) / 4; KL per element 0.5*(0 + 2 - 1 - ln 2), 4 elements per item
    assert logs["nll"] == pytest.approx((2.5 + 4 * math.log(2.0)) / 4)
    assert logs["kl"] == pytest.approx(4 * 0.5 * (1 - math.log(2.0)))
    assert loss.item() == pytest.approx((2.5 + 4 * math.log(2.0)) / 4 + 0.5 * 4 * 0.5 * (1 - math.log(2.0)))
    # PSNR of xrec on [-1, 1] data: MSE = (0.25 + 2.25 + 1 + 4) / 4 = 1.875
    assert logs["psnr"] == pytest.approx(10 * math.log10(4 / 1.875))


def test_rec2d_term_by_hand():
    decoder = constant_image_vae(0.5)
    x = (torch.arange(5, dtype=torch.float64) / 10).reshape(1, 1, 5, 1, 1).expand(1, 3, 5, 8, 8).contiguous()
    z = torch.randn(1, 4, 2, 1, 1, dtype=torch.float64)
    # slice targets: frames 0 and 4 (values 0 and 0.4); the decoder says 0.5 -> |.| = 0.5 and 0.1 on 3*64 pixels
    rec2d_sum = 3 * 64 * (0.5 + 0.1)
    loss_fn = LatentRegularizedLoss(decoder, mapping="slice", rec2d_weight=2.0)
    loss, logs = loss_fn(x, x.clone(), z, posterior(0.0, 0.0))
    assert logs["nll_3d"] == 0 and logs["kl"] == 0
    assert logs["nll_2d"] == pytest.approx(rec2d_sum / 2)        # / (B * T' = 2)
    assert loss.item() == pytest.approx(2.0 * rec2d_sum / 2)
    assert logs["psnr"] == math.inf
    assert logs["psnr_2d"] == pytest.approx(10 * math.log10(4 / ((0.25 + 0.01) / 2)))
    # mean targets: frame 0 and mean(1..4)/10 = 0.25 -> |.| = 0.5 and 0.25; logvar_2d = ln 2
    loss_fn = LatentRegularizedLoss(decoder, mapping="mean")
    with torch.no_grad():
        loss_fn.logvar_2d.fill_(math.log(2.0))
    loss, logs = loss_fn(x, x.clone(), z, posterior(0.0, 0.0))
    n = 2 * 3 * 64
    assert loss.item() == pytest.approx((3 * 64 * (0.5 + 0.25) / 2 + n * math.log(2.0)) / 2)
    # first: only frame 0 against the first latent frame -> 0.5 on 3*64 pixels, / (B * 1)
    loss, logs = LatentRegularizedLoss(decoder, mapping="first")(x, x.clone(), z, posterior(0.0, 0.0))
    assert loss.item() == pytest.approx(3 * 64 * 0.5)


def test_perceptual_and_encoder_constraint_by_hand():
    x = torch.zeros(1, 3, 5, 8, 8, dtype=torch.float64)
    calls = []

    def perceptual(a, b):
        calls.append(a.shape)
        return torch.full((a.shape[0], 1, 1, 1), 2.0, dtype=a.dtype)

    loss_fn = LatentRegularizedLoss(None, perceptual=perceptual, perceptual_weight=0.25)
    _, logs = loss_fn(x, x.clone(), torch.zeros(1, 4, 2, 1, 1), posterior(0.0, 0.0))
    assert calls == [(5, 3, 8, 8)]                              # (B*T) frames
    assert logs["nll_3d"] == pytest.approx(0.25 * 2.0 * x.numel() / 5)
    encoder = constant_image_vae(0.0, moments=[1.0, -2.0, 0.5, 0.0, 0, 0, 0, 0])
    loss_fn = LatentRegularizedLoss(None, encoder_constraint_weight=3.0, image_encoder_for_constraint=encoder)
    loss, logs = loss_fn(x, x.clone(), torch.zeros(1, 4, 2, 1, 1), posterior(0.0, 0.0))
    assert logs["encoder_constraint"] == pytest.approx((1 + 2 + 0.5 + 0) / 4)
    assert loss.item() == pytest.approx(3.0 * 3.5 / 4)
    with pytest.raises(ValueError, match="image_encoder_for_constraint"):
        LatentRegularizedLoss(None, encoder_constraint_weight=1.0)


def test_gradients_reach_z_and_logvars_but_not_the_frozen_decoder():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = ImageVAE(IMAGE_PRESETS["tiny-image"])
    loss_fn = LatentRegularizedLoss(decoder, mapping="random")
    loss_fn.train()
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    xrec = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    z = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    loss, _ = loss_fn(x, xrec, z, DiagonalGaussian(z, torch.zeros_like(z)), generator=torch.Generator())
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and xrec.grad.abs().sum() > 0
    assert loss_fn.logvar.grad is not None and loss_fn.logvar_2d.grad is not None
    assert all(p.grad is None for p in decoder.parameters())
