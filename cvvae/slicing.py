"""Frame-sliced inference: full-resolution layers run a few frames at a time (spec 2.1, 2.5-2.7; issue 16).

Why: at full resolution one activation of a chunk is hundreds of MB (default model, 17x256x456: 508 MB), and a
resnet holds several at once (input, normalised copy, padded copy, conv output). Nothing but GroupNorm couples
frames beyond a conv's 3-frame reach, and GroupNorm spans time (spec 2.1): its statistics come from every frame of
the chunk. So a layer runs in two passes: the statistics of the whole tensor, read slice by slice and combined
exactly (Chan et al.'s pairwise update, in float64), then normalise -> SiLU -> conv on a few output frames at a
time, each slice gathering the input frames its temporal kernel reaches (the halo) and padding in time only where
the whole tensor would be padded. The result equals the unsliced layer up to float rounding.

Only in pure inference (:func:`cvvae.blocks.inference_inplace`: no autograd, tracing or export, so the ONNX graphs
and training are untouched) and only for tensors above :data:`cvvae.plan.SLICE_BYTES`; smaller ones run whole as
before. Which frames form a slice is decided with the chunk/tile plan (:func:`cvvae.plan.frame_slices`), whose memory
estimate counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvvae.plan import SLICE_BYTES, SLICE_BYTES_ENV, Slices, frame_slices, slice_bytes, slice_limit

__all__ = ["SLICE_BYTES", "SLICE_BYTES_ENV", "Slices", "frame_slices", "slice_bytes", "slice_limit", "TimeWindow",
           "SlicedConv", "gather", "map_frames", "output_slices", "Moments", "GroupNormSiLU"]


@dataclass(frozen=True)
class TimeWindow:
    """How a layer reads time: output frame j reads padded input frames ``stride*j .. stride*j + kernel - 1``,
    where the input is padded by ``front``/``back`` frames (copies of the edge frame, or zeros)."""

    kernel: int = 1
    stride: int = 1
    front: int = 0
    back: int = 0
    replicate: bool = False

    def out_frames(self, frames: int) -> int:
        return (frames + self.front + self.back - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class SlicedConv:
    """A conv as its time window plus ``run``: the conv on frames already padded in time (space as the layer pads)."""

    window: TimeWindow
    run: Callable[[torch.Tensor], torch.Tensor]


def gather(x: torch.Tensor, window: TimeWindow, j0: int, j1: int,
           prologue: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The input frames that output frames ``j0:j1`` read, after ``prologue``, padded in time as the whole tensor is."""
    frames = x.shape[2]
    first = window.stride * j0 - window.front
    last = window.stride * (j1 - 1) + window.kernel - 1 - window.front  # inclusive, in unpadded frame numbers
    lo, hi = max(first, 0), min(last, frames - 1)
    xs = x[:, :, lo:hi + 1]
    if prologue is not None:
        xs = prologue(xs)
    front, back = lo - first, last - hi
    if not (front or back):
        return xs
    if window.replicate:
        parts = [xs[:, :, :1].expand(-1, -1, front, -1, -1)] if front else []
        parts.append(xs)
        if back:
            parts.append(xs[:, :, -1:].expand(-1, -1, back, -1, -1))
    else:
        shape = list(xs.shape)
        parts = [xs.new_zeros(shape[:2] + [front] + shape[3:])] if front else []
        parts.append(xs)
        if back:
            parts.append(xs.new_zeros(shape[:2] + [back] + shape[3:]))
    return torch.cat(parts, dim=2)


def map_frames(x: torch.Tensor, conv: SlicedConv, slices: Slices,
               prologue: Callable[[torch.Tensor], torch.Tensor] | None = None,
               moments: Moments | None = None) -> torch.Tensor:
    """``conv(prologue(x))`` computed ``slices`` (ranges of output frames) at a time into one output tensor;
    ``moments`` also gathers the output's GroupNorm statistics while each slice is fresh."""
    out = None
    for j0, j1 in slices:
        y = conv.run(gather(x, conv.window, j0, j1, prologue))
        if moments is not None:
            moments.add(y)
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], slices[-1][1], *y.shape[3:]))
        out[:, :, j0:j1] = y
        del y
    return out


def output_slices(x: torch.Tensor, window: TimeWindow, channels_out: int | None = None) -> Slices | None:
    """Slices of the output of a layer with ``window`` on ``x``, sized by the larger of its input and output."""
    out_frames = window.out_frames(x.shape[2])
    per_frame = x[0, 0, 0].numel() * x.shape[0] * x.element_size()
    channels = max(x.shape[1], channels_out or 0)
    return frame_slices(out_frames, per_frame * channels * max(x.shape[2], out_frames))


class Moments:
    """Per (batch, group) mean and variance of a B,C,T,H,W tensor over (C/G, T, H, W), gathered slice by slice.

    Each slice's moments come from ``torch.native_group_norm`` (eps 0; var = 1/rstd^2), the kernel GroupNorm itself
    uses, which is about 3x faster here than ``var_mean`` over a strided view; slices are merged with Chan et al.'s
    pairwise update in float64.
    """

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    @classmethod
    def of(cls, x: torch.Tensor, groups: int) -> Moments:
        """The moments of all of ``x``, read a few frames at a time."""
        moments = cls(groups)
        frames = x.shape[2]
        for t0, t1 in frame_slices(frames, x.numel() * 4) or [(0, frames)]:
            moments.add(x[:, :, t0:t1])
        return moments

    def add(self, xs: torch.Tensor) -> None:
        b, c, t, h, w = xs.shape
        xs = xs.to(torch.float32).contiguous()  # the kernel wants a contiguous input; float32 statistics
        _, mean, rstd = torch.native_group_norm(xs, None, None, b, c, t * h * w, self.groups, 0.0)
        mean = mean.double().view(b, self.groups)
        m2 = rstd.double().view(b, self.groups).pow(-2) * (n := c // self.groups * t * h * w)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        return self.m2 / self.count


class GroupNormSiLU:
    """GroupNorm with the statistics of a whole tensor (:class:`Moments`), then SiLU, applied to any time slice.

    ``F.group_norm`` applies its per (batch, group) mean and variance as one scale and shift per channel; the same
    here, so a slice is normalised exactly as the whole tensor would be.
    """

    def __init__(self, norm: nn.GroupNorm, moments: Moments) -> None:
        per_channel = norm.num_channels // norm.num_groups
        rstd = (moments.variance() + norm.eps).rsqrt()
        scale = rstd.repeat_interleave(per_channel, dim=1)
        shift = -moments.mean.repeat_interleave(per_channel, dim=1) * scale
        if norm.affine:
            scale = scale * norm.weight.double()
            shift = shift * norm.weight.double() + norm.bias.double()
        self.scale = scale.float()[:, :, None, None, None]
        self.shift = shift.float()[:, :, None, None, None]

    def __call__(self, xs: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(self.shift, xs, self.scale)
        return F.silu(y, inplace=True).to(xs.dtype)
