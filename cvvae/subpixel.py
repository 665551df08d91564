"""A 3x3 conv after 2x nearest upsampling, computed on the low-resolution input (spec 2.7, Upsample3D; issue 16).

Nearest upsampling repeats every pixel 2x2, so output pixel (2i+a, 2j+b) of ``conv3x3(up(x))`` reads only two rows
(i-1, i for a = 0; i, i+1 for a = 1) and two columns of ``x``: the 3x3 kernel folds into one 2x2 kernel per phase
(a, b), whose taps are sums of the original taps. One conv with the four phase kernels stacked on the output channels
(2x2 kernel, on ``x`` padded by one pixel) then gives every phase; its outputs are interleaved into the full-size
image. Same numbers up to float rounding (the summed taps are rounded once), 2.25x fewer multiply-adds than the
conv at full resolution, and the upsampled input (4x the pixels of ``x``) is never made.

Zero padding of the upsampled image equals zero padding of ``x`` by one pixel; replicate padding likewise (the
upsampled border pixel is ``x``'s border pixel), so this serves v1 (zeros) and SD3 (replicate) alike. Time is not
upsampled here: the caller pads and windows time exactly as for the conv it replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# _FOLD[a] maps the 3 kernel rows onto the 2 low-resolution rows that phase a reads (rows i-1, i for a = 0; i, i+1
# for a = 1), in the coordinates of x padded by one pixel, where phase a's first row is a.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, kt, 3, 3) -> (4*O, C, kt, 2, 2): the 2x2 kernel of phase (a, b) in output channels (2a+b)*O .. +O.

    Summed in float64 and rounded once to the weight's dtype."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"phase_weights needs a 3x3 spatial kernel, got {tuple(weight.shape)}")
    fold = _FOLD.to(weight.device)
    phases = torch.einsum("aik,octkl,bjl->aboctij", fold, weight.double(), fold)
    return phases.flatten(0, 2).to(weight.dtype)


def nearest_up_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, pad_mode: str,
                    time_factor: int = 1) -> torch.Tensor:
    """``conv3d(pad_space(up2x(x), 1), weight, bias)`` with time interleaving, from the low-resolution ``x``.

    ``x``: (B, C, T', H, W), already padded in time as the replaced conv's input is; ``weight``: (n*C_out, C, kt, 3, 3)
    with n = ``time_factor``; ``pad_mode``: "zeros" or "replicate" (the spatial padding of the upsampled image).
    Returns (B, C_out, n*T, 2H, 2W), T = T' - kt + 1, where output channel half k of frame t becomes frame n*t + k
    (Upsample3D's interleave).
    """
    b, _, _, h, w = x.shape
    out_channels = weight.shape[0]
    if out_channels % time_factor:
        raise ValueError(f"{out_channels} output channels do not split into {time_factor} frames")
    xp = F.pad(x, (1, 1, 1, 1)) if pad_mode == "zeros" else F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate")
    y = F.conv3d(xp, phase_weights(weight), None if bias is None else bias.repeat(4))  # (B, 4*O, T, H+1, W+1)
    del xp
    t, c = y.shape[2], out_channels // time_factor
    out = y.new_empty((b, c, time_factor * t, 2 * h, 2 * w))
    grid = out.view(b, c, t, time_factor, h, 2, w, 2)
    for phase in range(4):
        a, col = divmod(phase, 2)
        part = y[:, phase * out_channels:(phase + 1) * out_channels, :, a:a + h, col:col + w]
        grid[:, :, :, :, :, a, :, col] = part.unflatten(1, (time_factor, c)).permute(0, 2, 3, 1, 4, 5)
    return out
