"""Whole-clip held-out evaluation of a CV-VAE: every 17-frame window, key frames vs the frames between them.

Why: a 17-frame excerpt chosen where little moves hides what a 4x temporal VAE does under motion. Its latent key
frames (input frames 0, 4, 8, ..., spec 5) are reconstructed well; the three frames between two key frames are what
the decoder has to interpolate, and they collapse first when things move (issue 15).

Protocol (:func:`evaluate_clip`): the whole clip (every frame, resized to height ``height``, width keeping the aspect
in multiples of 8; all three held-out clips are landscape, so the height is the short side) is cut into
non-overlapping windows of ``window`` = 17 frames starting at frame 0; each window is encoded and decoded on its own
with the model's chunk/tile plan (``CVVAE.encode``/``decode``, as ``cvvae reconstruct`` does; 17 frames are exactly
one temporal chunk), in fp32 from the posterior mean. The ``T mod 17`` frames after the last whole window are not
evaluated (reported as ``frames_left_out``). Within a window, frames 0, 4, 8, 12, 16 are the latent key frames, the
others the in-between frames. The image-decoder PSNR (compatibility, :mod:`.compat`) decodes each latent frame
with the image VAE and compares it with the key frame it stands for ("slice" mapping).

PSNR is :mod:`cvvae.metrics`' (range 2 on [-1, 1]); the mean of a window is the PSNR of its mean squared error over
all its frames, the clip and overall means are means of window PSNRs.

Scene cuts (:func:`scene_cuts`): a window holding a hard cut asks the VAE to reconstruct two shots whose frames share
latents and the decoder's temporal context, which no video VAE with 4x temporal compression does well (it is
normally run per shot). The figures over all windows stay the headline; the worst window *within a shot* is reported
next to them so that the two causes of a bad window (motion, a cut) can be told apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import InputError
from .image_vae import ImageVAE
from .losses import decode_frames, map_frames
from ..metrics import psnr, psnr_from_mse, psnr_per_frame
from ..model import CVVAE

WINDOW = 17
CUT_PSNR = 14.0  # dB between consecutive input frames; below it a new shot starts. At 128 px the hard cuts of bikes
                 # measure 7.9-11.9 dB, every other pair of frames of the three held-out clips 16.8 dB or more.


def window_starts(num_frames: int, window: int = WINDOW) -> list[int]:
    """First frames of the non-overlapping ``window``-frame windows of a ``num_frames`` clip (a partial tail is
    left out)."""
    if window < 1:
        raise InputError(f"window={window} must be >= 1")
    return list(range(0, num_frames - window + 1, window))


def scene_cuts(clip: torch.Tensor, threshold: float = CUT_PSNR) -> list[int]:
    """Frames of ``clip`` ((1,3,T,H,W) in [-1, 1]) that start a new shot: PSNR against the frame before below
    ``threshold`` dB (a hard cut; fades and dissolves are not detected)."""
    if clip.shape[2] < 2:
        return []
    return [t + 1 for t, v in enumerate(psnr_per_frame(clip[:, :, 1:], clip[:, :, :-1])) if v < threshold]


def holds_cut(start: int, window: int, cuts: Iterable[int]) -> bool:
    """Whether frames ``start .. start+window-1`` span a cut (a cut frame c splits frames c-1 and c)."""
    return any(start < c < start + window for c in cuts)


def key_frame_mask(window: int = WINDOW, time_compress: int = 4) -> list[bool]:
    """True for the latent key frames 0, 4, 8, ... of a window."""
    return [i % time_compress == 0 for i in range(window)]


def _mean_psnr(values: Iterable[float]) -> float:
    """PSNR of the mean squared error behind several PSNR values (range 2), i.e. the pooled PSNR of the frames."""
    mses = [4.0 / 10 ** (v / 10) for v in values]
    return psnr_from_mse(sum(mses) / len(mses))


@torch.no_grad()
def evaluate_clip(model: CVVAE, clip: torch.Tensor, image_vae: ImageVAE | None = None, *,
                  window: int = WINDOW, reconstruct: bool = True) -> dict[str, Any]:
    """Per-window and per-frame PSNR of ``model`` on ``clip`` ((1,3,T,H,W) in [-1, 1]), see the module doc.

    ``reconstruct=False`` only encodes and measures the image-decoder PSNR (an ablation is compared on that alone,
    and the encoder is the cheaper half); it needs ``image_vae``.
    """
    if clip.ndim != 5 or clip.shape[0] != 1:
        raise InputError(f"clip must be (1,3,T,H,W), got {tuple(clip.shape)}")
    if not reconstruct and image_vae is None:
        raise InputError("reconstruct=False measures the image-decoder PSNR only: pass image_vae")
    total = clip.shape[2]
    starts = window_starts(total, window)
    if not starts:
        raise InputError(f"clip of {total} frames holds no whole {window}-frame window")
    tc = model.config.time_compress
    keys = key_frame_mask(window, tc)
    model = model.float().eval()
    windows, per_frame = [], []
    for start in starts:
        x = clip[:, :, start:start + window].float()
        enc = model.encode(x)
        w: dict[str, Any] = {"start": start}
        if reconstruct:
            xrec = model.decode(enc.mean, num_frames=enc.num_frames, height=enc.height, width=enc.width).clamp(-1, 1)
            frames = psnr_per_frame(xrec, x)
            per_frame.extend(frames)
            key = [v for v, k in zip(frames, keys) if k]
            between = [v for v, k in zip(frames, keys) if not k]
            w.update(psnr=psnr(xrec, x), key_psnr=_mean_psnr(key),
                     between_psnr=_mean_psnr(between) if between else None, min_frame_psnr=min(frames))
        if image_vae is not None:
            target = map_frames(x, "slice", tc)
            x2d = decode_frames(image_vae, enc.mean[:, :, : target.shape[2]].float()).clamp(-1, 1)
            w["image_decoder_psnr"] = psnr(x2d, target)
        windows.append(w)
    result: dict[str, Any] = {
        "frames": total, "height": int(clip.shape[3]), "width": int(clip.shape[4]), "window": window,
        "windows": windows, "frames_left_out": total - len(starts) * window, "reconstructed": reconstruct,
        "cuts": scene_cuts(clip),
    }
    if reconstruct:
        worst = min(windows, key=lambda w: w["psnr"])
        result.update(mean_psnr=sum(w["psnr"] for w in windows) / len(windows), worst_psnr=worst["psnr"],
                      worst_start=worst["start"], key_psnr=sum(w["key_psnr"] for w in windows) / len(windows),
                      between_psnr=sum(w["between_psnr"] for w in windows) / len(windows) if window > 1 else None,
                      per_frame_psnr=per_frame)
    if image_vae is not None:
        result["image_decoder_psnr"] = sum(w["image_decoder_psnr"] for w in windows) / len(windows)
    return result


def summarize(per_clip: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Over all windows of all clips: mean and worst window PSNR, key vs in-between, image-decoder PSNR (the
    video figures only when every clip was reconstructed, the image-decoder one when every clip has it); with the
    clips' ``cuts`` (:func:`scene_cuts`) also the windows holding a cut and the worst window within a shot."""
    windows = [(name, w) for name, r in per_clip.items() for w in r["windows"]]
    if not windows:
        raise InputError("no windows to summarize")

    def label(name: str, w: dict[str, Any]) -> str:
        return f"{name} frames {w['start']}-{w['start'] + per_clip[name]['window'] - 1}"

    out: dict[str, Any] = {"windows": len(windows)}
    if all("psnr" in w for _, w in windows):
        worst_name, worst = min(windows, key=lambda nw: nw[1]["psnr"])
        out.update(mean_psnr=sum(w["psnr"] for _, w in windows) / len(windows), worst_psnr=worst["psnr"],
                   worst_window=label(worst_name, worst),
                   key_psnr=sum(w["key_psnr"] for _, w in windows) / len(windows),
                   between_psnr=sum(w["between_psnr"] for _, w in windows) / len(windows))
        out["key_minus_between_db"] = out["key_psnr"] - out["between_psnr"]
        if all("cuts" in r for r in per_clip.values()):
            within = [(name, w) for name, w in windows
                      if not holds_cut(w["start"], per_clip[name]["window"], per_clip[name]["cuts"])]
            out["windows_with_cuts"] = len(windows) - len(within)
            if within:
                name, worst = min(within, key=lambda nw: nw[1]["psnr"])
                out.update(worst_psnr_within_shots=worst["psnr"], worst_window_within_shots=label(name, worst))
    if all("image_decoder_psnr" in w for _, w in windows):
        out["image_decoder_psnr"] = sum(w["image_decoder_psnr"] for _, w in windows) / len(windows)
    return out


def plot_per_frame(name: str, results: dict[str, dict[str, Any]], path: Path) -> Path:
    """PNG of per-frame PSNR over the evaluated frames of one clip, one line per model (``label -> result``),
    key frames marked, window borders dotted, scene cuts (the results' ``cuts``) in red. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fsutil import atomic_path

    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=110)
    for label, r in results.items():
        values = r["per_frame_psnr"]
        line, = ax.plot(range(len(values)), values, lw=1.0, label=f"{label} (mean {r['mean_psnr']:.2f} dB)")
        keys = [i for i in range(len(values)) if (i % r["window"]) % 4 == 0]
        ax.plot(keys, [values[i] for i in keys], "o", ms=2.5, color=line.get_color())
    first = next(iter(results.values()))
    for start in range(first["window"], len(first["per_frame_psnr"]), first["window"]):
        ax.axvline(start - 0.5, color="0.8", lw=0.6, ls=":")
    for k, cut in enumerate(c for c in first.get("cuts", []) if c < len(first["per_frame_psnr"])):
        ax.axvline(cut - 0.5, color="tab:red", lw=0.8, alpha=0.5, label="scene cut" if k == 0 else None)
    ax.set_xlabel(f"frame ({first['window']}-frame windows; dots: latent key frames 0, 4, 8, ... of each window)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{name}: {first['frames']} frames at {first['height']}x{first['width']}, per-frame PSNR")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
