"""Image and video quality metrics, one definition each: PSNR and SSIM (the trainer, compat, accuracy, the report,
clip evaluation, the comparisons of :mod:`cvvae.compare` and the bf16 guard all use these).

* PSNR: ``10 * log10(data_range^2 / MSE)`` over all elements, the MSE in float64; ``inf`` for identical inputs.
  ``data_range`` 2.0 for pixels in [-1, 1], which equals PSNR on the same data mapped to [0, 1] with range 1.
* SSIM: Wang et al. (2004) as the field computes it: Gaussian 11x11 window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  population covariances, on frames clamped to [-1, 1] and mapped to [0, 1] floats (data range 1), per channel, then
  averaged over channels and pixels: ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)``. Frames need at least 11x11 pixels.

Inputs are numpy arrays or torch tensors (converted by :func:`cvvae.arrays.to_numpy`; torch is never imported here,
so the thin runtime can use the module). scikit-image (the ``torch`` extra) is imported only for SSIM.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .arrays import to_numpy
from .errors import InputError
from .extras import lazy_import

SSIM_WINDOW = 11  # Gaussian sigma 1.5, truncated at 3.5 sigma: radius 5


def _float64(x: Any) -> np.ndarray:
    return to_numpy(x).astype(np.float64)


def psnr_from_mse(mse: float, data_range: float = 2.0) -> float:
    """PSNR in dB of a mean squared error; ``inf`` when it is 0."""
    return math.inf if mse <= 0 else 10.0 * math.log10(data_range ** 2 / mse)


def psnr(a: Any, b: Any, data_range: float = 2.0) -> float:
    """10.log10(range^2 / MSE) over all elements; ``inf`` for identical arrays."""
    if tuple(a.shape) != tuple(b.shape):
        raise InputError(f"psnr: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return psnr_from_mse(float(np.mean((_float64(a) - _float64(b)) ** 2)), data_range)


def psnr_per_frame(a: Any, b: Any, data_range: float = 2.0) -> list[float]:
    """PSNR of each frame t of (B,C,T,H,W) videos, over the batch, channels and pixels of that frame."""
    if tuple(a.shape) != tuple(b.shape) or len(a.shape) != 5:
        raise InputError(f"psnr_per_frame: expected equal (B,C,T,H,W) shapes, got {tuple(a.shape)}, {tuple(b.shape)}")
    mse = np.mean((_float64(a) - _float64(b)) ** 2, axis=(0, 1, 3, 4))
    return [psnr_from_mse(float(m), data_range) for m in mse]


def to_uint8_frames(video: Any) -> np.ndarray:
    """(B,C,T,H,W) in [-1, 1] -> uint8 array (B,T,H,W,C) (for pictures; the metrics work on floats)."""
    x = np.round((np.clip(to_numpy(video).astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)
    return x.transpose(0, 2, 3, 4, 1)


def _unit_frames(video: Any) -> np.ndarray:
    """(B,C,T,H,W) in [-1, 1] -> float64 (B,T,H,W,C) in [0, 1]."""
    return ((np.clip(_float64(video), -1, 1) + 1) / 2).transpose(0, 2, 3, 4, 1)


def ssim_video(a: Any, b: Any) -> tuple[float, list[float]]:
    """SSIM of (B,C,T,H,W) videos in [-1, 1]: (mean over all frames, per-frame values averaged over the batch)."""
    if tuple(a.shape) != tuple(b.shape) or len(a.shape) != 5:
        raise InputError(f"ssim_video: expected equal (B,C,T,H,W) shapes, got {tuple(a.shape)}, {tuple(b.shape)}")
    if min(a.shape[3:]) < SSIM_WINDOW:
        raise InputError(f"ssim_video: frames of {a.shape[3]}x{a.shape[4]} px are smaller than SSIM's "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    structural_similarity = lazy_import("skimage.metrics", "SSIM").structural_similarity
    ua, ub = _unit_frames(a), _unit_frames(b)
    values = np.array([[structural_similarity(ua[i, t], ub[i, t], channel_axis=-1, data_range=1.0,
                                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                        for t in range(ua.shape[1])] for i in range(ua.shape[0])])
    return float(values.mean()), values.mean(axis=0).tolist()


__all__ = ["SSIM_WINDOW", "psnr", "psnr_from_mse", "psnr_per_frame", "ssim_video", "to_uint8_frames"]
