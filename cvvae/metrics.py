"""Image and video quality metrics on pixels in [-1, 1]: PSNR (torch) and SSIM (scikit-image, imported lazily).

PSNR uses ``data_range`` 2.0 for [-1, 1] data, which equals PSNR on the same data mapped to [0, 1] with range 1.
SSIM follows the common video-VAE evaluation: frames are mapped to uint8 ([-1, 1] -> [0, 255], rounded) and compared
with ``skimage.metrics.structural_similarity(..., channel_axis=-1, data_range=255)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """10.log10(range^2 / MSE) over all elements; ``inf`` for identical tensors."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    mse = (a.detach().double() - b.detach().double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def psnr_per_frame(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> list[float]:
    """PSNR of each frame t of (B,C,T,H,W) videos, over the batch, channels and pixels of that frame."""
    if a.shape != b.shape or a.ndim != 5:
        raise ValueError(f"psnr_per_frame: expected equal (B,C,T,H,W) shapes, got {tuple(a.shape)}, {tuple(b.shape)}")
    return [psnr(a[:, :, i], b[:, :, i], data_range) for i in range(a.shape[2])]


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(B,C,T,H,W) in [-1, 1] -> uint8 array (B,T,H,W,C)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def _structural_similarity():
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:
        raise ImportError("SSIM needs scikit-image: pip install scikit-image (or cvvae-deploy[dev])") from e
    return structural_similarity


def ssim_video(a: torch.Tensor, b: torch.Tensor) -> tuple[float, list[float]]:
    """SSIM of (B,C,T,H,W) videos in [-1, 1]: (mean over all frames, per-frame values averaged over the batch)."""
    if a.shape != b.shape or a.ndim != 5:
        raise ValueError(f"ssim_video: expected equal (B,C,T,H,W) shapes, got {tuple(a.shape)}, {tuple(b.shape)}")
    if min(a.shape[3:]) < 7:
        raise ValueError(f"ssim_video: frames of {a.shape[3]}x{a.shape[4]} px are smaller than SSIM's 7x7 window")
    structural_similarity = _structural_similarity()
    ua, ub = to_uint8_frames(a), to_uint8_frames(b)
    values = np.array([[structural_similarity(ua[i, t], ub[i, t], channel_axis=-1, data_range=255)
                        for t in range(ua.shape[1])] for i in range(ua.shape[0])])
    per_frame = values.mean(axis=0).tolist()
    return float(values.mean()), per_frame
