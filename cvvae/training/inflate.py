"""Initialise a CV-VAE v1 from an SD image VAE by inflating its 2D kernels into 3D ones (spec section 9).

The official repository has no inflation code; this recipe makes the 3D model reproduce the image VAE per frame:

* causal encoder 3D convs (conv_in, resnet conv1, conv_out, Downsample3D convs) get the 2D kernel in the **last**
  temporal tap (``W3[:, :, 2] = W2``), so output frame t is the 2D conv of input frame t. With the time-striding
  downsamples this makes latent j the 2D encoding of frame 4j (the "slice" target of spec 8.2) when GroupNorm
  statistics are per frame, and exactly the 2D encoding for a single frame or a static video;
* non-causal decoder 3D convs (conv_in, conv1, conv_out, Upsample3D convs) get it in the **centre** tap; a
  time-upsampling conv (2C outputs) gets W2 and the bias in both channel halves, so upsampling in time holds frames;
* 1x1x1 ``nin_shortcut`` convs: ``W3[:, :, 0] = W2``; per-frame 2D convs, the spatial attention and norms are copied.

Quant convs (``fold_quant_convs=True``): CV-VAE v1 has no quant_conv/post_quant_conv (spec 1.1) and its latent is
SD's latent after quant_conv (the space the UNet sees, spec 8.1). The 1x1 ``quant_conv`` (Q, q) is folded into
``encoder.conv_out`` exactly: W' = Q.W (on channel dims), b' = Q.b + q. The 1x1 ``post_quant_conv`` (P, p) is folded
into ``decoder.conv_in``: W'[o,i] = sum_k W[o,k] P[k,i], b' = b + sum_{k,taps} W[o,k,taps] p[k]. This is exact
except on the 1-pixel border of the latent: there, conv_in's zero padding used to pad P.z + p with zeros, while the
folded bias assumes every tap sees p (a one-conv layer cannot express this). With ``fold_quant_convs=False`` the
quant convs are dropped: the 3D latent is then the image encoder's raw (pre-quant_conv) space and the decoder expects
post_quant_conv's output, so the model is not latent-compatible until trained.

Temporal attention (decoder ``mid.attn_1``, ``temporal_attention_init``). The block returns x + T(S(x)), with
S the spatial attention (GroupNorm, q/k/v, SDPA, proj_out) and T(s) = proj_out_t(Attn_t(LN(s))) over frames. The 2D
block is x + S(x), so T should be the identity. For a static video (or T = 1) attention over identical frames
returns v whatever q_t/k_t are, so T(s) = O.(V.LN(s) + b_v) + b_o: a linear map of LayerNorm(s). LayerNorm removes
each token's channel mean and divides by its own std, i.e. it loses 2 of the C dimensions of s; no linear map can
undo that, so no init is exact. Options, all with q_t = 0 (uniform attention: a moving video gets the frame mean of
the spatial branch) and k_t left at PyTorch's random default init (seeded by torch's global RNG): with q_t = k_t = 0
neither would ever receive a gradient (dL/dq_t is proportional to k and dL/dk_t to q), so temporal attention could
never learn to look at particular frames.

* ``"identity"`` (default, best): linearise LayerNorm. Every parameter of S after the attention softmax is linear, so
  we may rewrite the spatial ``proj_out`` freely and undo it in ``proj_out_t``. Write s - g0 = G.z (G = P.V.diag(gamma),
  g0 = s's constant part, z the attention-averaged GroupNorm output) and keep its coordinates h = U^T.(s - g0) on G's
  top C-2 left singular vectors U. Put h in the subspace E = {v : v_0 = 0, sum(v) = 0} and a constant offset K on
  channel 0: s' = E.h + K.e0. LayerNorm centres s' to E.h + K.(e0 - 1/C) and divides by its std
  sqrt((|h|^2 + K'^2)/C + eps) with K'^2 = K^2.(1 - 1/C); E^T removes the offset direction exactly, so
  proj_out_t = (sqrt(K'^2 + C.eps)/sqrt(C)).U.E^T with bias g0 returns U.U^T.(s - g0).(1 - O(|h|^2/K^2)) + g0.
  The remaining error is (a) the 2 weakest directions of G (LayerNorm loses 2 dimensions, so this is the minimum;
  their singular values are far below the typical one for a full-rank G) and (b) a relative |h|^2/(2K^2) shrink;
  K = 64.||G||_F makes (b) about 1e-4. The large value sits in one channel that T ignores (the other channels only
  shift by K/C), so fp16 rounding of it does not reach the output: in float16 the block's error (1e-2 relative at
  C=512) equals the 2D block's own float16 rounding error. LayerNorm's variance is about K^2/C: compute its
  statistics in fp32 (PyTorch does; in TensorRT keep the normalization layer in fp32).
* ``"plain"``: v_t = proj_out_t = identity, LN weight 1 / bias 0: T(s) = LN(s), right direction, wrong per-token scale
  and mean. Kept for comparison.
* ``"zero"``: proj_out_t = 0, so the block returns x: drops S(x) entirely.

The measured errors on the tiny test model are in tests/test_inflate.py.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, InputError
from ..model import CVVAE
from .image_vae import ImageVAE

log = logging.getLogger(__name__)

TemporalInit = Literal["identity", "plain", "zero"]
TEMPORAL_INITS: tuple[str, ...] = ("identity", "plain", "zero")
TEMPORAL_OFFSET_SCALE = 64.0  # K = scale * ||G||_F; relative shrink of the linearised LayerNorm ~ 1/(2 scale^2)
TEMPORAL_DROPPED_DIMS = 2  # LayerNorm loses the channel mean and the token scale
_TEMPORAL_KEYS = ("norm_t", "q_t", "k_t", "v_t", "proj_out_t")


def inflated_config(image_vae: ImageVAE, *, variant: str = "v1", **config_overrides: Any) -> ModelConfig:
    """The CV-VAE config with the image VAE's widths, depth and latent channels (plus chunk/tile overrides)."""
    cfg = image_vae.config
    return ModelConfig(variant=variant, widths=cfg.widths, layers_per_block=cfg.num_res_blocks,
                       latent_channels=cfg.z_channels, in_channels=cfg.in_channels, out_channels=cfg.out_ch,
                       norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor,
                       shift_factor=cfg.shift_factor, **config_overrides)


def inflate_kernel(w2: torch.Tensor, kt: int, tap: int) -> torch.Tensor:
    """A 4D conv weight (O,I,kh,kw) as a 5D one (O,I,kt,kh,kw) with the 2D kernel in temporal tap ``tap``."""
    w3 = w2.new_zeros(w2.shape[0], w2.shape[1], kt, *w2.shape[2:])
    w3[:, :, tap] = w2
    return w3


def _inflate_tensor(key: str, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """One 3D-model tensor from the same-named 2D tensor (see the module docstring for the rules)."""
    src = source
    if target.ndim == 5 and src.ndim == 4:
        kt = target.shape[2]
        tap = kt - 1 if key.startswith("encoder.") else kt // 2  # causal encoder: last tap; decoder: centre
        src = inflate_kernel(src, kt, tap)
    if ".upsample.conv." in key and target.shape[0] == 2 * src.shape[0]:
        src = torch.cat([src, src], dim=0)  # time-upsampling conv: both output halves hold the 2D conv
    if src.shape != target.shape:
        raise CheckpointError(f"cannot inflate {key}: 2D shape {tuple(source.shape)} vs 3D shape {tuple(target.shape)}")
    return src.to(target.dtype)


def _fold_quant_convs(sd: dict[str, torch.Tensor], image_vae: ImageVAE) -> None:
    """Fold quant_conv into encoder.conv_out and post_quant_conv into decoder.conv_in (in place, on 3D weights)."""
    if image_vae.quant_conv is not None:
        q = image_vae.quant_conv.weight.detach()[:, :, 0, 0].to(sd["encoder.conv_out.weight"].dtype)
        qb = image_vae.quant_conv.bias.detach().to(q.dtype)
        w, b = sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"]
        sd["encoder.conv_out.weight"] = torch.einsum("ok,kithw->oithw", q, w)
        sd["encoder.conv_out.bias"] = q @ b + qb
    if image_vae.post_quant_conv is not None:
        p = image_vae.post_quant_conv.weight.detach()[:, :, 0, 0].to(sd["decoder.conv_in.weight"].dtype)
        pb = image_vae.post_quant_conv.bias.detach().to(p.dtype)
        w, b = sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"]
        sd["decoder.conv_in.weight"] = torch.einsum("okthw,ki->oithw", w, p)
        sd["decoder.conv_in.bias"] = b + torch.einsum("okthw,k->o", w, pb)


def _offset_basis(channels: int, dtype: torch.dtype) -> torch.Tensor:
    """E: orthonormal columns spanning {v : v_0 = 0, sum(v) = 0}, shape (C, C-2)."""
    n = channels - 1
    centred = torch.eye(n, dtype=dtype) - 1.0 / n
    q, _ = torch.linalg.qr(centred[:, : n - 1])  # any n-1 columns of the centring matrix are independent
    e = torch.zeros(channels, n - 1, dtype=dtype)
    e[1:] = q
    return e


def temporal_attention_state(sd: dict[str, torch.Tensor], prefix: str, mode: str) -> dict[str, torch.Tensor]:
    """New tensors for the decoder's temporal attention (and, for "identity", its spatial proj_out).

    ``sd`` holds the inflated tensors under ``prefix`` (e.g. ``decoder.mid.attn_1.``); see the module docstring.
    """
    if mode not in TEMPORAL_INITS:
        raise InputError(f"temporal_attention_init={mode!r}; expected one of {', '.join(TEMPORAL_INITS)}")
    dtype = sd[prefix + "proj_out.weight"].dtype
    c = sd[prefix + "proj_out.weight"].shape[0]
    eye, zeros = torch.eye(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    # k_t is not set: it keeps its random init so that q_t (zero: uniform attention) receives gradients
    out = {"norm_t.weight": torch.ones(c, dtype=torch.float64), "norm_t.bias": zeros,
           "q_t.weight": torch.zeros(c, c, dtype=torch.float64), "q_t.bias": zeros,
           "v_t.weight": eye, "v_t.bias": zeros, "proj_out_t.weight": eye, "proj_out_t.bias": zeros}
    if mode == "zero":
        out["proj_out_t.weight"] = torch.zeros(c, c, dtype=torch.float64)
    elif mode == "identity":
        get = lambda name: sd[prefix + name].detach().to(torch.float64)  # noqa: E731
        p, pb = get("proj_out.weight")[:, :, 0, 0], get("proj_out.bias")
        v, vb = get("v.weight")[:, :, 0, 0], get("v.bias")
        gamma, beta = get("norm.weight"), get("norm.bias")
        g = p @ v @ torch.diag(gamma)          # s = g @ z + g0, z = attention-averaged normalised tokens
        g0 = p @ (v @ beta + vb) + pb
        u = torch.linalg.svd(g)[0][:, : c - TEMPORAL_DROPPED_DIMS]
        e = _offset_basis(c, torch.float64)
        k = TEMPORAL_OFFSET_SCALE * max(torch.linalg.matrix_norm(g).item(), 1e-6)
        k_centred_sq = k * k * (1.0 - 1.0 / c)  # |K.(e0 - 1/C)|^2 after LayerNorm's centring
        ln_eps = 1e-5  # nn.LayerNorm eps of norm_t (spec 2.8)
        out["proj_out.weight"] = (e @ u.T @ p)[:, :, None, None]
        out["proj_out.bias"] = e @ u.T @ (pb - g0)
        out["proj_out.bias"][0] += k
        out["proj_out_t.weight"] = math.sqrt(k_centred_sq + c * ln_eps) / math.sqrt(c) * (u @ e.T)
        out["proj_out_t.bias"] = g0
    return {prefix + name: t.to(dtype) for name, t in out.items()}


def inflate(image_vae: ImageVAE, *, variant: str = "v1", fold_quant_convs: bool = True,
            temporal_attention_init: TemporalInit = "identity", **config_overrides: Any) -> CVVAE:
    """A CV-VAE whose encoder/decoder reproduce ``image_vae`` per frame (spec 9); same dtype and device.

    ``config_overrides`` go to :class:`~cvvae.config.ModelConfig` (chunk_frames, tile_spatial_size, ...).
    """
    if variant == "sd3":
        raise NotImplementedError(
            "inflating into the SD3 variant is not implemented: its replicate padding and symmetric stride-2 "
            "downsampling (spec 7, 9) shift the sampling grid relative to any 2D VAE, so no inflation reproduces it; "
            "use variant='v1'"
        )
    if variant != "v1":
        raise InputError(f"unknown variant {variant!r}; expected 'v1'")
    if temporal_attention_init not in TEMPORAL_INITS:
        raise InputError(f"temporal_attention_init={temporal_attention_init!r}; "
                         f"expected one of {', '.join(TEMPORAL_INITS)}")
    if image_vae.config.eps != 1e-5:
        log.info("image VAE GroupNorm eps %g differs from CV-VAE v1's 1e-5: the inflated model is close, not exact",
                 image_vae.config.eps)
    if not fold_quant_convs and (image_vae.quant_conv is not None or image_vae.post_quant_conv is not None):
        log.warning("fold_quant_convs=False: quant convs dropped; the 3D latent space is not the image VAE's")
    ref = next(image_vae.parameters())
    model = CVVAE(inflated_config(image_vae, variant=variant, **config_overrides)).to(dtype=ref.dtype,
                                                                                      device=ref.device)
    src = {k: v.detach() for k, v in image_vae.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    attn_prefix = "decoder.mid.attn_1."
    for key, target in model.state_dict().items():
        if key.startswith(attn_prefix) and key[len(attn_prefix):].split(".")[0] in _TEMPORAL_KEYS:
            sd[key] = target  # default init; temporal_attention_state overwrites all but k_t
            continue
        if key not in src:
            raise CheckpointError(f"image VAE has no tensor {key} to inflate (is it an ldm-layout ImageVAE?)")
        sd[key] = _inflate_tensor(key, target, src[key])
    if fold_quant_convs:
        _fold_quant_convs(sd, image_vae)
    sd.update(temporal_attention_state(sd, attn_prefix, temporal_attention_init))
    model.load_state_dict(sd, strict=True)
    return model
