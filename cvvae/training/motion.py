"""Synthetic motion over still pictures: pan, zoom, rotate and two-layer parallax clips (training data, spec 8.3).

The offline training footage (two clips, eleven photos) has little motion, and a CV-VAE trained on it reconstructs
its latent key frames (0, 4, 8, ...) but smears the frames between them when things move. Real moving footage is
not available offline, so we make it: a virtual camera moves over a still picture (a photo or one training frame)
with a constant velocity, zoom rate or angular speed, and for parallax a second picture, cut out by a soft ellipse,
slides over the first at another speed.

Every frame is one bilinear resampling of the source (``torch.nn.functional.grid_sample``, ``align_corners=False``)
at the source position of each output pixel:

    source(x) = center_t + R(angle_t) . (x - c) / magnification_t          (c: centre of the output crop)

so a pan of ``v`` px/frame gives frame ``t+1`` = frame ``t`` shifted by exactly ``v`` px, and integer speeds copy
pixels unchanged. Parameters are drawn from a ``numpy.random.Generator``, so a clip is a pure function of the
generator's state (the sampler's determinism relies on that). The trajectory is kept inside the source picture, so
no padding is ever sampled for the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

MotionKind = Literal["pan", "zoom", "rotate", "parallax"]
MOTION_KINDS: tuple[str, ...] = ("pan", "zoom", "rotate", "parallax")


@dataclass(frozen=True)
class MotionLimits:
    """Largest motions drawn (speeds are drawn uniformly up to these, in output pixels per frame)."""

    max_speed: float = 12.0  # pan / parallax layer speed, px per frame (the real training clips move ~0-3)
    max_zoom: float = 0.03  # |log magnification| per frame (0.03: x1.6 over 16 frames)
    max_rotation: float = 3.0  # degrees per frame


def warp_frames(source: np.ndarray, centers: np.ndarray, size: int, *, magnifications: np.ndarray | None = None,
                angles: np.ndarray | None = None, padding: str = "border") -> np.ndarray:
    """Resample ``source`` (H,W,3 uint8) into T square frames of ``size`` px: uint8 (T,size,size,3).

    ``centers``: (T,2) source coordinates (x, y; pixel centres at integers) of the output crop's centre at each
    frame; ``magnifications`` (T,) > 1 zooms in; ``angles`` (T,) radians rotate the camera.
    """
    t = centers.shape[0]
    h, w = source.shape[:2]
    mags = np.ones(t) if magnifications is None else np.asarray(magnifications, dtype=np.float64)
    angs = np.zeros(t) if angles is None else np.asarray(angles, dtype=np.float64)
    offset = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    oy, ox = np.meshgrid(offset, offset, indexing="ij")  # (size, size)
    cos, sin = (np.cos(angs) / mags)[:, None, None], (np.sin(angs) / mags)[:, None, None]
    sx = centers[:, 0, None, None] + cos * ox - sin * oy
    sy = centers[:, 1, None, None] + sin * ox + cos * oy
    # pixel coordinates -> grid_sample's normalised coordinates (align_corners=False: pixel i spans [i-.5, i+.5])
    grid = np.stack([(2.0 * sx + 1.0) / w - 1.0, (2.0 * sy + 1.0) / h - 1.0], axis=-1)
    src = torch.from_numpy(np.array(source, dtype=np.float32)).permute(2, 0, 1)[None]  # a copy: photos are read-only
    out = F.grid_sample(src.expand(t, -1, -1, -1), torch.from_numpy(grid).float(), mode="bilinear",
                        padding_mode=padding, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ellipse_masks(centers: np.ndarray, radii: tuple[float, float], size: int) -> np.ndarray:
    """(T,size,size) float masks of an ellipse with semi-axes ``radii`` (x, y) at ``centers`` (T,2, output px),
    1 inside, 0 outside, with a one-pixel linear edge (no aliasing flicker when it moves by fractions of a pixel)."""
    ax = np.arange(size, dtype=np.float64)
    dx = (ax[None, None, :] - centers[:, 0, None, None]) / radii[0]
    dy = (ax[None, :, None] - centers[:, 1, None, None]) / radii[1]
    distance = np.sqrt(dx * dx + dy * dy)
    return np.clip((1.0 - distance) * min(radii) + 0.5, 0.0, 1.0)


def _fit_center(rng: np.random.Generator, extent_lo: np.ndarray, extent_hi: np.ndarray, length: int) -> float | None:
    """A start coordinate ``c`` with c + extent_lo >= 0 and c + extent_hi <= length - 1: every sampled pixel centre
    lies inside the picture (None: no room)."""
    lo, hi = -extent_lo.min(), length - 1 - extent_hi.max()
    if lo > hi:
        return None
    return float(rng.uniform(lo, hi))


def _place_path(rng: np.random.Generator, path: np.ndarray, half: np.ndarray | float, source: np.ndarray
                ) -> np.ndarray | None:
    """``path`` (frames, 2: x, y) moved to a random start where every frame's +-``half`` window stays inside
    ``source``; None where no start fits."""
    start = []
    for axis, length in ((0, source.shape[1]), (1, source.shape[0])):
        c = _fit_center(rng, path[:, axis] - half, path[:, axis] + half, length)
        if c is None:
            return None
        start.append(c)
    return path + np.array(start)


def pan(rng: np.random.Generator, source: np.ndarray, frames: int, size: int, velocity: tuple[float, float]
        ) -> np.ndarray | None:
    """The camera moves by ``velocity`` (vx, vy) output px per frame over ``source``; None if it does not fit."""
    steps = np.arange(frames, dtype=np.float64)
    half = (size - 1) / 2.0  # farthest sampled pixel centre from the crop centre
    path = np.stack([steps * velocity[0], steps * velocity[1]], axis=1)
    placed = _place_path(rng, path, half, source)
    if placed is None:
        return None
    # content at output x is source x + path: the picture slides by -velocity in the output
    return warp_frames(source, placed, size, padding="border")


def zoom(rng: np.random.Generator, source: np.ndarray, frames: int, size: int, rate: float,
         drift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray | None:
    """Magnification exp(rate * t) around a (slowly drifting) centre; None if the widest frame does not fit."""
    steps = np.arange(frames, dtype=np.float64)
    mags = np.exp(rate * steps)
    half = ((size - 1) / 2.0) / mags  # farthest sampled pixel centre of each frame, in source px
    path = np.stack([steps * drift[0], steps * drift[1]], axis=1)
    placed = _place_path(rng, path, half, source)
    if placed is None:
        return None
    return warp_frames(source, placed, size, magnifications=mags, padding="border")


def rotate(rng: np.random.Generator, source: np.ndarray, frames: int, size: int, degrees_per_frame: float
           ) -> np.ndarray | None:
    """The camera turns by ``degrees_per_frame`` about the crop centre; None if the rotated crop does not fit."""
    angles = np.deg2rad(degrees_per_frame) * np.arange(frames, dtype=np.float64)
    half = np.full(frames, ((size - 1) / 2.0) * math.sqrt(2.0))  # any rotation of the square stays in this circle
    start = []
    for length in (source.shape[1], source.shape[0]):
        c = _fit_center(rng, -half, half, length)
        if c is None:
            return None
        start.append(c)
    centers = np.tile(np.array(start), (frames, 1))
    return warp_frames(source, centers, size, angles=angles, padding="border")


def parallax(rng: np.random.Generator, background: np.ndarray, foreground: np.ndarray, frames: int, size: int,
             back_velocity: tuple[float, float], front_velocity: tuple[float, float]) -> np.ndarray | None:
    """A soft ellipse cut from ``foreground`` slides over a panning ``background`` at another speed (two depths)."""
    back = pan(rng, background, frames, size, back_velocity)
    if back is None:
        return None
    steps = np.arange(frames, dtype=np.float64)[:, None]
    radii = (float(rng.uniform(0.2, 0.45) * size), float(rng.uniform(0.2, 0.45) * size))
    v = np.array(front_velocity, dtype=np.float64)
    # the layer's centre crosses the frame: at mid-clip it is near the middle of the crop
    middle = (size - 1) / 2.0 + rng.uniform(-0.25, 0.25, size=2) * size
    centers = middle + (steps - (frames - 1) / 2.0) * v  # (T,2) output px
    fh, fw = foreground.shape[:2]
    anchor = np.array([rng.uniform(radii[0], max(radii[0], fw - radii[0])),
                       rng.uniform(radii[1], max(radii[1], fh - radii[1]))])
    # the layer's texture moves with it: output x shows foreground at anchor + (x - centre_t)
    src_centers = anchor + (size - 1) / 2.0 - centers
    front = warp_frames(foreground, src_centers, size, padding="border").astype(np.float32)
    mask = ellipse_masks(centers, radii, size)[..., None].astype(np.float32)
    out = mask * front + (1.0 - mask) * back.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _velocity(rng: np.random.Generator, speed: float) -> tuple[float, float]:
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return speed * math.cos(angle), speed * math.sin(angle)


def synthesize(rng: np.random.Generator, kind: str, source: np.ndarray, frames: int, size: int,
               limits: MotionLimits = MotionLimits(), second: np.ndarray | None = None) -> np.ndarray:
    """One clip of ``kind`` over ``source`` at a random speed within ``limits``: uint8 (frames,size,size,3).

    A speed too fast for the picture is halved until the path fits (a picture of at least ``size*1.5`` px always
    fits at speed 0); ``second`` is the foreground picture of a parallax clip (``source`` itself when None).
    """
    if kind not in MOTION_KINDS:
        raise InputError(f"unknown motion kind {kind!r}; expected one of {', '.join(MOTION_KINDS)}")
    scale = 1.0
    for _ in range(12):
        if kind == "pan":
            clip = pan(rng, source, frames, size, _velocity(rng, scale * rng.uniform(0.0, limits.max_speed)))
        elif kind == "zoom":
            rate = scale * rng.uniform(-limits.max_zoom, limits.max_zoom)
            clip = zoom(rng, source, frames, size, rate, _velocity(rng, scale * rng.uniform(0.0, 2.0)))
        elif kind == "rotate":
            clip = rotate(rng, source, frames, size, scale * rng.uniform(-limits.max_rotation, limits.max_rotation))
        else:
            back = _velocity(rng, scale * rng.uniform(0.0, limits.max_speed / 2.0))
            front = _velocity(rng, scale * rng.uniform(0.0, limits.max_speed))
            clip = parallax(rng, source, source if second is None else second, frames, size, back, front)
        if clip is not None:
            return clip
        scale /= 2.0
    raise InputError(f"picture of {source.shape[1]}x{source.shape[0]} px is too small for {kind} crops of {size} px")
