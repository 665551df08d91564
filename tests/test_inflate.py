"""Inflating the image VAE into CV-VAE v1 (spec 9): exact properties on a tiny float64 model.

Measured on this file's model (tiny-image widths 32/64/64/64, seeded random weights with non-trivial norms and
biases, float64, 32x32 frames = 4x4 latents; decoder outputs reach ~2.1):

* encoder, 1 frame, eps matched (1e-5):        max |3D - 2D| 6e-16 (exact)
* encoder, static 9-frame video, eps matched:  1.8e-15 at every latent frame
* encoder, 1 frame, image eps 1e-6 vs 1e-5:    3.0e-5
* decoder temporal attention, "identity" init: relative error of T(S(x)) vs S(x) 4.4e-4 at C=64, 2e-6 at SD's
  C=512 (float32: 3.6e-6); "plain" 6.2, "zero" 1.0
* decoder, 1 frame, post_quant_conv applied explicitly (fold_quant_convs=False): max 3.7e-4 (eps 1e-6: 5.8e-4)
* decoder, 1 frame, post_quant_conv folded, its bias zeroed: 3.9e-4 (the fold itself is exact)
* decoder, 1 frame, post_quant_conv folded, bias ~ N(0, 0.05^2): max 0.21, mean 0.028 (128x128 frames: max 0.08,
  mean 0.007): conv_in differs on the latent border, and GroupNorm spreads that to every pixel
"""

from __future__ import annotations

import pytest
import torch

from cvvae.blocks import SpatialAttentionV1
from cvvae.training.image_vae import IMAGE_PRESETS, AttnBlock2D, ImageVAE
from cvvae.training.inflate import inflate, inflate_kernel, temporal_attention_state

TINY = IMAGE_PRESETS["tiny-image"]


def make_image_vae(eps: float, seed: int = 0) -> ImageVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageVAE(TINY.replace(eps=eps)).double()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.05)
                elif "norm" in name:
                    p.normal_(1, 0.2)
    return model.eval()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def image_vae() -> ImageVAE:
    return make_image_vae(1e-5)


@pytest.fixture(scope="module")
def inflated(image_vae):
    return inflate(image_vae).eval()


@pytest.fixture(scope="module")
def frame() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_kernel_taps():
    w2 = torch.arange(8.0).reshape(2, 1, 2, 2)
    w3 = inflate_kernel(w2, 3, 2)
    assert w3.shape == (2, 1, 3, 2, 2) and torch.equal(w3[:, :, 2], w2) and not w3[:, :, :2].any()


def test_config_and_tap_placement(image_vae, inflated):
    cfg = inflated.config
    assert cfg.widths == (32, 64, 64, 64) and cfg.layers_per_block == 2 and cfg.latent_channels == 4
    assert inflate(image_vae, tile_spatial_size=64, chunk_frames=8).config.tile_spatial_size == 64
    sd = inflated.state_dict()
    w2 = image_vae.encoder.down[0].block[0].conv1.weight
    assert torch.equal(sd["encoder.down.0.block.0.conv1.weight"][:, :, 2], w2)   # causal: last tap
    assert not sd["encoder.down.0.block.0.conv1.weight"][:, :, :2].any()
    w2 = image_vae.decoder.up[1].upsample.conv.weight
    up = sd["decoder.up.1.upsample.conv.weight"]                                   # time-upsampling: 2C outputs
    assert up.shape == (128, 64, 3, 3, 3)
    assert torch.equal(up[:64, :, 1], w2) and torch.equal(up[64:, :, 1], w2) and not up[:, :, 0].any()
    assert torch.equal(sd["decoder.up.1.upsample.conv.bias"], image_vae.decoder.up[1].upsample.conv.bias.repeat(2))
    assert torch.equal(sd["encoder.down.1.block.0.nin_shortcut.weight"][:, :, 0],
                       image_vae.encoder.down[1].block[0].nin_shortcut.weight)
    assert not sd["decoder.mid.attn_1.q_t.weight"].any()  # uniform attention over frames at init ...
    assert sd["decoder.mid.attn_1.k_t.weight"].abs().sum() > 0  # ... but k_t random, so q_t gets gradients
    with pytest.raises(NotImplementedError, match="SD3"):
        inflate(image_vae, variant="sd3")
    with pytest.raises(ValueError, match="temporal_attention_init"):
        inflate(image_vae, temporal_attention_init="random")


@torch.no_grad()
def test_single_frame_encoder_is_exact(image_vae, inflated, frame):
    got = inflated.encoder(frame[:, :, None])
    assert got.shape == (1, 8, 1, 4, 4)
    assert max_abs(got[:, :, 0], image_vae.moments(frame)) < 1e-5  # measured 6e-16
    # unfolded: the 3D encoder ends before quant_conv
    raw = inflate(image_vae, fold_quant_convs=False).encoder(frame[:, :, None])[:, :, 0]
    assert max_abs(raw, image_vae.encoder(frame)) < 1e-5


@torch.no_grad()
def test_static_video_gives_the_image_latent_at_every_latent_frame(image_vae, inflated, frame):
    video = frame[:, :, None].expand(-1, -1, 9, -1, -1)
    got = inflated.encoder(video)
    assert got.shape == (1, 8, 3, 4, 4)
    assert max_abs(got, image_vae.moments(frame)[:, :, None].expand_as(got)) < 1e-5  # measured 1.8e-15


@torch.no_grad()
def test_groupnorm_eps_mismatch_is_small_but_not_zero(frame):
    image_vae = make_image_vae(1e-6)  # SD's eps; CV-VAE v1 uses 1e-5 (spec 2.1)
    diff = max_abs(inflate(image_vae).encoder(frame[:, :, None])[:, :, 0], image_vae.moments(frame))
    assert 1e-8 < diff < 1e-3  # measured 3.0e-5


def _spatial_and_temporal(image_vae, model, latent):
    """S(h) of the 2D mid attention and T(S'(h)) of the inflated one, on the same mid-block input h."""
    h = image_vae.decoder.mid.block_1(image_vae.decoder.conv_in(image_vae.post_quant_conv(latent)))
    s = image_vae.decoder.mid.attn_1(h) - h
    u = model.decoder.mid.attn_1(h[:, :, None])[:, :, 0] - h
    return s, u


@torch.no_grad()
def test_temporal_attention_identity_init(image_vae, latent):
    errors = {}
    for init in ("identity", "plain", "zero"):
        s, u = _spatial_and_temporal(image_vae, inflate(image_vae, temporal_attention_init=init), latent)
        errors[init] = ((u - s).norm() / s.norm()).item()
    assert errors["identity"] < 3e-3  # measured 4.4e-4: 2 of 64 directions dropped + ~1e-4 shrink
    assert errors["plain"] > 0.5 and errors["zero"] == pytest.approx(1.0)


@torch.no_grad()
def test_temporal_attention_identity_init_at_sd_width():
    """C=512 as in SD's mid block: the 2 dropped directions matter far less than at C=64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a2 = AttnBlock2D(512, eps=1e-5, groups=32).double()
        a2.norm.weight.normal_(1, 0.2)
        for p in (a2.norm.bias, a2.q.bias, a2.k.bias, a2.v.bias, a2.proj_out.bias):
            p.normal_(0, 0.05)
        x = torch.randn(1, 512, 6, 6, dtype=torch.float64) * 3 + 1
    a3 = SpatialAttentionV1(512, eps=1e-5, groups=32, temporal=True).double()
    sd = {**a3.state_dict(), **a2.state_dict()}  # k_t keeps a3's random init
    sd.update(temporal_attention_state(sd, "", "identity"))
    a3.load_state_dict(sd)
    s = a2(x) - x
    static = x[:, :, None].expand(-1, -1, 3, -1, -1)
    u = a3(static) - static
    assert ((u - s[:, :, None]).norm() / (s.norm() * 3 ** 0.5)).item() < 2e-5  # measured 2e-6


@torch.no_grad()
def test_single_frame_decoder(image_vae, latent):
    ref = image_vae.decode(latent)
    unfolded = inflate(image_vae, fold_quant_convs=False)
    diff_unfolded = max_abs(unfolded.decoder(image_vae.post_quant_conv(latent)[:, :, None])[:, :, 0], ref)
    assert diff_unfolded < 5e-3  # measured 3.7e-4 on outputs up to ~2.1: the temporal attention's error

    folded = inflate(image_vae)
    diff_folded = max_abs(folded.decoder(latent[:, :, None])[:, :, 0], ref)
    assert diff_folded > diff_unfolded  # measured 0.21: the border term of the folded post_quant_conv bias

    no_bias = make_image_vae(1e-5)
    no_bias.post_quant_conv.bias.zero_()
    diff_no_bias = max_abs(inflate(no_bias).decoder(latent[:, :, None])[:, :, 0], no_bias.decode(latent))
    assert diff_no_bias < 5e-3  # measured 3.9e-4: with a zero bias the fold is exact


@torch.no_grad()
def test_folded_post_quant_conv_is_exact_inside_the_border(image_vae, inflated, latent):
    ref = image_vae.decoder.conv_in(image_vae.post_quant_conv(latent))
    got = inflated.decoder.conv_in(latent[:, :, None])[:, :, 0]
    assert max_abs(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1]) < 1e-12
    assert max_abs(got, ref) > 1e-4  # the border cells see the bias through zero-padded taps


@torch.no_grad()
def test_static_latent_video_decodes_to_the_single_frame_decode(inflated, latent):
    single = inflated.decoder(latent[:, :, None])
    video = inflated.decoder(latent[:, :, None].expand(-1, -1, 3, -1, -1))
    assert video.shape == (1, 3, 9, 32, 32)
    assert max_abs(video, single.expand_as(video)) < 1e-10


def test_temporal_attention_is_trainable_from_the_init(inflated):
    attn = inflated.decoder.mid.attn_1
    h = torch.randn(1, 64, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    attn.zero_grad()
    attn(h).pow(2).sum().backward()
    assert attn.q_t.weight.grad.abs().sum() > 0 and attn.proj_out_t.weight.grad.abs().sum() > 0
    attn.zero_grad()
