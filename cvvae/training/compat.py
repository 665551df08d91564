"""How well a video VAE reconstructs a clip, and how well its latents read through the image VAE's decoder.

The second number is the point of CV-VAE: its latent of a video, decoded frame by frame by SD's image decoder, should
look like the input frames that the latent frames stand for (:func:`cvvae.training.losses.map_frames`, "slice" = frames
0, 4, 8, ...). A high ``image_decoder_psnr`` means the latent space is compatible with models trained on the image
VAE's latents.

Both reconstructions are clamped to [-1, 1] before the metrics, as the official scripts clamp before writing video.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .image_vae import ImageVAE
from .losses import MAPPINGS, decode_frames, map_frames
from ..metrics import psnr, psnr_per_frame, ssim_video
from ..model import CVVAE
from ..plan import PlanSettings


@torch.no_grad()
def measure_compat(video_vae: CVVAE, image_vae: ImageVAE, frames: torch.Tensor, mapping: str = "slice", *,
                   settings: PlanSettings | None = None, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Reconstruction quality of ``video_vae`` and image-decoder compatibility of its latent means.

    ``frames``: (B,3,T,H,W) in [-1, 1] with T = 1 + 4k and H, W multiples of 8. ``settings`` are the chunk/tile
    settings of ``video_vae.encode``/``decode`` (the model's config when None). Returns plain data:
    ``video_psnr``, ``video_ssim`` and ``video_psnr_per_frame``/``video_ssim_per_frame`` (T values);
    ``image_decoder_psnr``/``image_decoder_ssim`` and their per-frame lists (T' values, one per compared latent frame).
    """
    if mapping not in MAPPINGS:
        raise InputError(f"unknown mapping {mapping!r}; expected one of {', '.join(MAPPINGS)}")
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise InputError(f"frames must be (B,3,T,H,W) in [-1, 1], got {tuple(frames.shape)}")
    cfg = video_vae.config
    t, h, w = frames.shape[2:]
    if cfg.padded_frames(t) != t:
        keep = cfg.num_output_frames(cfg.num_latent_frames(t))
        raise InputError(f"{t} frames is not 1 + {cfg.time_compress}k; keep the first {keep} frames "
                         "(as the official scripts do) so latent frames and target frames line up")
    if (cfg.padded_pixels(h), cfg.padded_pixels(w)) != (h, w):
        raise InputError(f"frame size {h}x{w} is not a multiple of {cfg.spatial_compress}; crop or resize first")
    if image_vae.config.z_channels != cfg.latent_channels:
        raise InputError(f"image VAE has {image_vae.config.z_channels} latent channels, the video VAE "
                         f"{cfg.latent_channels}; they cannot share latents")

    encoded = video_vae.encode(frames, settings)
    mean = encoded.mean
    xrec = video_vae.decode(mean, num_frames=t, height=h, width=w, settings=settings).clamp(-1, 1)
    x = frames.to(xrec.dtype)
    video_ssim, video_ssim_frames = ssim_video(xrec, x)

    target = map_frames(frames, mapping, cfg.time_compress, generator)
    latent = mean[:, :, : target.shape[2]].to(device=image_vae.decoder.conv_in.weight.device, dtype=image_vae.dtype)
    x2d = decode_frames(image_vae, latent).clamp(-1, 1)
    target = target.to(x2d)
    image_ssim, image_ssim_frames = ssim_video(x2d, target)
    return {
        "mapping": mapping,
        "num_frames": t,
        "num_latent_frames": mean.shape[2],
        "video_psnr": psnr(xrec, x),
        "video_ssim": video_ssim,
        "video_psnr_per_frame": psnr_per_frame(xrec, x),
        "video_ssim_per_frame": video_ssim_frames,
        "image_decoder_psnr": psnr(x2d, target),
        "image_decoder_ssim": image_ssim,
        "image_decoder_psnr_per_frame": psnr_per_frame(x2d, target),
        "image_decoder_ssim_per_frame": image_ssim_frames,
    }
