"""Training loss with CV-VAE's latent regularisation (spec section 8.2).

The 3D latent z is also decoded frame by frame by the frozen image decoder; its output must match frames of the input
picked by a mapping function (:func:`map_frames`). That keeps the 3D latent space readable by the image decoder, i.e.
compatible with models trained on the image VAE's latents. The loss is

    nll = sum(rec / e^logvar + logvar) / (B*T) + rec2d_weight * sum(rec2d / e^logvar_2d + logvar_2d) / (B*T')
    loss = nll + kl_weight * KL + encoder_constraint_weight * L1(mean, image_encoder_mean)

with ``rec = |x - xrec|`` (+ ``perceptual_weight * perceptual(x, xrec)`` per frame when a perceptual callable such as
LPIPS is given), ``rec2d = |map(x) - image_decoder(z)|`` (L1 only, as the official loss), ``logvar`` and
``logvar_2d`` learned scalars (init 0) and ``KL = sum over C,T,H,W of the posterior's KL to N(0, I), averaged over
the batch``.

The optional encoder-side term is a simple replacement for the official ``EncoderConstraint`` variant (which crashes,
spec 8.2): the frozen image encoder encodes the "slice" frames x[:, :, ::4] and the 3D posterior mean is pulled
towards that latent mean with a mean absolute error.

Not included: the adversarial term (3D PatchGAN discriminator with hinge loss and adaptive weight, spec 8.2). The
official config enables it from step 1 with weight 0.5; a training script that wants it adds ``d_weight * g_loss`` to
this loss and trains the discriminator itself.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from ..errors import InputError
from ..metrics import psnr
from ..model import DiagonalGaussian
from .image_vae import ImageVAE

Mapping = Literal["first", "slice", "mean", "random"]
MAPPINGS: tuple[str, ...] = ("first", "slice", "mean", "random")


def num_target_frames(num_frames: int, mode: str, time_compress: int = 4) -> int:
    """T' of :func:`map_frames`: 1 for "first", else 1 + (T-1)//time_compress."""
    return 1 if mode == "first" else 1 + (num_frames - 1) // time_compress


def random_frame_indices(num_frames: int, time_compress: int = 4,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Frame 0, then one index drawn uniformly from 4j-3 .. 4j for each latent j >= 1 (drawn on the CPU)."""
    groups = (num_frames - 1) // time_compress
    offsets = torch.randint(time_compress, (groups,), generator=generator)
    starts = 1 + time_compress * torch.arange(groups)
    return torch.cat([torch.zeros(1, dtype=torch.long), starts + offsets])


def map_frames(x: torch.Tensor, mode: Mapping, time_compress: int = 4,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The input frames that the image decoder's per-latent-frame output is compared with (spec 8.2).

    ``x`` is (B,C,T,H,W); the result is (B,C,T',H,W) with T' = 1 + (T-1)//time_compress (1 for "first"):

    * "slice": frames 0, 4, 8, ... (the last frame of each 4-frame group);
    * "mean": frame 0, then the mean of frames 4j-3 .. 4j;
    * "random": frame 0, then one frame drawn from 4j-3 .. 4j; one index set for the whole batch;
    * "first": frame 0 only (the paper's variant; compare with the first latent frame only).

    Trailing frames that fill no group (T = 1+4k+r) are ignored. T = 1 gives frame 0 for every mode.
    """
    if x.ndim != 5:
        raise InputError(f"map_frames expects (B,C,T,H,W), got {tuple(x.shape)}")
    if mode not in MAPPINGS:
        raise InputError(f"unknown mapping {mode!r}; expected one of {', '.join(MAPPINGS)}")
    t, c = x.shape[2], time_compress
    groups = (t - 1) // c
    if mode == "first" or groups == 0:
        return x[:, :, :1]
    if mode == "slice":
        return x[:, :, : 1 + c * groups : c]
    if mode == "mean":
        grouped = x[:, :, 1 : 1 + c * groups].unflatten(2, (groups, c)).mean(dim=3)
        return torch.cat([x[:, :, :1], grouped], dim=2)
    return x[:, :, random_frame_indices(t, c, generator).to(x.device)]


def decode_frames(image_vae: ImageVAE, z: torch.Tensor) -> torch.Tensor:
    """The image decoder applied to every latent frame: (B,z,T',h,w) -> (B,3,T',H,W)."""
    b, t = z.shape[0], z.shape[2]
    images = image_vae.decode(z.transpose(1, 2).flatten(0, 1))
    return images.unflatten(0, (b, t)).transpose(1, 2)


def encode_frames(image_vae: ImageVAE, x: torch.Tensor) -> DiagonalGaussian:
    """The image encoder applied to every frame: (B,3,T,H,W) -> posterior over (B,z,T,h,w)."""
    b, t = x.shape[0], x.shape[2]
    moments = image_vae.moments(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, t)).transpose(1, 2)
    return DiagonalGaussian.from_moments(moments)


class LatentRegularizedLoss(nn.Module):
    """Reconstruction + latent regularisation by a frozen image decoder + KL (spec 8.2), without the GAN term.

    ``perceptual(x, xrec)`` (optional, e.g. LPIPS) receives (N,3,H,W) frame batches in [-1, 1] and returns one
    distance per frame (any shape with N elements); it is weighted by ``perceptual_weight`` and broadcast onto every
    pixel of its frame, as the official loss does.
    """

    def __init__(self, image_decoder: ImageVAE | None, *, mapping: Mapping = "random", kl_weight: float = 1.0,
                 rec2d_weight: float = 1.0, learn_logvar: bool = True, encoder_constraint_weight: float = 0.0,
                 image_encoder_for_constraint: ImageVAE | None = None,
                 perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 perceptual_weight: float = 0.5, time_compress: int = 4) -> None:
        super().__init__()
        if mapping not in MAPPINGS:
            raise InputError(f"unknown mapping {mapping!r}; expected one of {', '.join(MAPPINGS)}")
        if encoder_constraint_weight and image_encoder_for_constraint is None:
            raise InputError("encoder_constraint_weight > 0 needs image_encoder_for_constraint (a frozen ImageVAE)")
        self.mapping = mapping
        self.kl_weight = kl_weight
        self.rec2d_weight = rec2d_weight
        self.encoder_constraint_weight = encoder_constraint_weight
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.time_compress = time_compress
        self.logvar = nn.Parameter(torch.zeros(()), requires_grad=learn_logvar)
        self.logvar_2d = nn.Parameter(torch.zeros(()), requires_grad=learn_logvar)
        self.image_decoder = self._frozen(image_decoder)
        self.image_encoder = self._frozen(image_encoder_for_constraint if encoder_constraint_weight else None)

    @staticmethod
    def _frozen(vae: ImageVAE | None) -> ImageVAE | None:
        if vae is not None:
            vae.requires_grad_(False).eval()
        return vae

    def train(self, mode: bool = True) -> "LatentRegularizedLoss":
        super().train(mode)
        for vae in (self.image_decoder, self.image_encoder):
            if vae is not None:
                vae.eval()
        return self

    def _rec(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        rec = (x - xrec).abs()
        if self.perceptual is not None and self.perceptual_weight:
            b, t = x.shape[0], x.shape[2]
            frames = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731
            p = self.perceptual(frames(x).contiguous(), frames(xrec).contiguous()).reshape(b, t)
            rec = rec + self.perceptual_weight * p[:, None, :, None, None]
        return rec

    def forward(self, x: torch.Tensor, xrec: torch.Tensor, z: torch.Tensor, posterior: DiagonalGaussian, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``x``/``xrec`` (B,3,T,H,W) in [-1, 1]; ``z`` the posterior sample the decoder saw (B,z,T',h,w)."""
        if x.shape != xrec.shape:
            raise InputError(f"x {tuple(x.shape)} and xrec {tuple(xrec.shape)} differ in shape")
        b, t = x.shape[0], x.shape[2]
        rec = self._rec(x, xrec)
        nll = (rec / self.logvar.exp() + self.logvar).sum() / (b * t)
        logs: dict[str, float] = {"rec": rec.detach().mean().item(), "psnr": psnr(xrec.detach(), x),
                                  "nll_3d": nll.item()}
        if self.image_decoder is not None:
            target = map_frames(x, self.mapping, self.time_compress, generator)
            t2 = target.shape[2]
            if z.shape[2] < t2:
                raise InputError(f"{z.shape[2]} latent frames cannot cover {t2} target frames of a {t}-frame video")
            # rec2d_weight 0 (an unregularised baseline): still measured and logged, but without a graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.rec2d_weight != 0):
                # back to z's dtype: under bf16 autocast the sum below stays in fp32
                xrec_2d = decode_frames(self.image_decoder, z[:, :, :t2].to(self.image_decoder.dtype)).to(z.dtype)
                rec2d = (target.to(xrec_2d.dtype) - xrec_2d).abs()
                nll_2d = (rec2d / self.logvar_2d.exp() + self.logvar_2d).sum() / (b * t2)
            nll = nll + self.rec2d_weight * nll_2d
            logs.update(rec2d=rec2d.detach().mean().item(), nll_2d=nll_2d.item(),
                        psnr_2d=psnr(xrec_2d.detach(), target), logvar_2d=self.logvar_2d.item())
        kl = posterior.kl().sum() / b
        loss = nll + self.kl_weight * kl
        if self.image_encoder is not None:
            with torch.no_grad():
                slices = map_frames(x, "slice", self.time_compress).to(self.image_encoder.dtype)
                image_mean = encode_frames(self.image_encoder, slices).mean.to(posterior.mean.dtype)
            constraint = (posterior.mean[:, :, : image_mean.shape[2]] - image_mean).abs().mean()
            loss = loss + self.encoder_constraint_weight * constraint
            logs["encoder_constraint"] = constraint.item()
        logs.update(loss=loss.item(), nll=nll.item(), kl=kl.item(), logvar=self.logvar.item())
        return loss, logs
