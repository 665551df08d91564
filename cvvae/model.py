"""The CV-VAE model: encoder + decoder, posterior, and the chunked/tiled encode/decode (spec sections 1, 5, 6).

``CVVAE`` has exactly two children, ``encoder`` and ``decoder``, so its state_dict keys equal the official
checkpoints' keys. ``encode``/``decode`` execute the shared :mod:`cvvae.plan` with the PyTorch modules; they accept
any frame count and size (padding to 1+4k frames and multiples of 8, cropped back on decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import tiling
from .config import ModelConfig
from .errors import InputError
from .modules_sd3 import DecoderSD3, EncoderSD3
from .modules_v1 import DecoderV1, EncoderV1
from .plan import PlanSettings, VideoPlan, make_latent_plan, make_plan

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class DiagonalGaussian:
    """The posterior over latents (spec 6.1): logvar clamped to [-30, 20]."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) summed over C,T,H,W, one value per batch item."""
        var = torch.exp(self.logvar)
        return 0.5 * (self.mean.pow(2) + var - 1.0 - self.logvar).flatten(1).sum(1)


@dataclass
class EncodeResult:
    """Latent distribution of a video plus what decoding needs to give back the original frames."""

    posterior: DiagonalGaussian
    num_frames: int
    height: int
    width: int
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        return self.posterior.mean

    @property
    def logvar(self) -> torch.Tensor:
        return self.posterior.logvar


def as_video_batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Accept (B,3,T,H,W), (3,T,H,W) or an image batch (B,3,H,W); return 5D and whether a batch dim was added."""
    if x.ndim == 5:
        return x, False
    if x.ndim == 4 and x.shape[0] == 3:
        return x.unsqueeze(0), True
    if x.ndim == 4:
        return x.unsqueeze(2), False
    raise InputError(f"expected pixels of shape (B,3,T,H,W), (3,T,H,W) or (B,3,H,W); got {tuple(x.shape)}")


class CVVAE(nn.Module):
    """CV-VAE v1 (``CVVAEModel``) or SD3 variant (``CVVAESD3Model``), chosen by ``config.variant``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_info = None  # set by cvvae.loading: where the weights came from
        if config.variant == "v1":
            self.encoder: nn.Module = EncoderV1(config)
            self.decoder: nn.Module = DecoderV1(config)
        else:
            self.encoder = EncoderSD3(config)
            self.decoder = DecoderSD3(config)

    # ----- plan ---------------------------------------------------------------------------------------------
    def plan_settings(self, **overrides: Any) -> PlanSettings:
        return PlanSettings.from_config(self.config, **overrides)

    def plan(self, num_frames: int, height: int, width: int, settings: PlanSettings | None = None) -> VideoPlan:
        return make_plan(settings or self.plan_settings(), num_frames, height, width)

    # ----- encode / decode ----------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.shape[1] != channels:
            raise InputError(f"{what} must have {channels} channels on dim 1, got shape {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor, settings: PlanSettings | None = None) -> EncodeResult:
        """Encode pixels in [-1, 1] of any frame count and size with the chunk/tile plan."""
        x, _ = as_video_batch(x)
        self._check_input(x, self.config.in_channels, "pixels")
        plan = self.plan(x.shape[2], x.shape[3], x.shape[4], settings)
        moments = tiling.encode_video(self.encoder, x.to(self.dtype), plan)
        return EncodeResult(DiagonalGaussian.from_moments(moments), plan.num_frames, plan.height, plan.width,
                            plan.describe())

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, num_frames: int | None = None, height: int | None = None,
               width: int | None = None, settings: PlanSettings | None = None) -> torch.Tensor:
        """Decode latents (B,z,L,h,w) with the plan; crop to the original size when it is given."""
        if z.ndim == 4:
            z = z.unsqueeze(2)
        self._check_input(z, self.config.latent_channels, "latents")
        plan = make_latent_plan(settings or self.plan_settings(), z.shape[2], z.shape[3], z.shape[4],
                                num_frames=num_frames, height=height, width=width)
        return tiling.decode_video(self.decoder, z.to(self.dtype), plan)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction through the raw encoder/decoder (no chunking or tiling), as in training (spec 8.1)."""
        posterior = DiagonalGaussian.from_moments(self.encoder(x))
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decoder(z)

    # ----- properties ---------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
