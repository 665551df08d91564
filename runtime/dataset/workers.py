"""Worker functions, run in Ray tasks and actors or in this process: :func:`decode_clip` reads one clip's frames
(a bad video becomes an error, never an exception) and :class:`ClipEncoder` encodes them with one VideoVAE, drawing
a sample with :func:`clip_seed` when sample latents are kept. Ray workers import them from this module by path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import numpy as np

from .clips import Clip
from .plan import EncoderSpec

log = logging.getLogger(__name__)

EMPTY_FRAMES = np.zeros((0, 1, 1, 3), np.uint8)     # same rank as real frames, so Ray keeps one tensor column
EMPTY_LATENT = np.zeros((0, 0, 0, 0, 0), np.float32)


def decode_clip(row: dict[str, Any]) -> dict[str, Any]:
    """``{"clip": json}`` -> plus ``frames`` (uint8 T,H,W,3) or ``error``; never raises for a bad video."""
    from cvvae.video_io import VideoError, read_video

    clip = Clip.from_json(row["clip"])
    t0 = time.perf_counter()
    frames, error = EMPTY_FRAMES, ""
    try:
        frames, _ = read_video(clip.path, **clip.read_kwargs())
        if frames.shape[0] != clip.num_frames:
            raise VideoError(f"decoded {frames.shape[0]} of the clip's {clip.num_frames} frames (source frames "
                             f"{clip.start}..{clip.end - 1}); the file is probably truncated")
    except Exception as e:  # a corrupt video is recorded in errors.jsonl and skipped, whatever the exception
        frames, error = EMPTY_FRAMES, f"{type(e).__name__}: {e}"
    return {"clip": row["clip"], "frames": frames, "error": error, "decode_s": time.perf_counter() - t0,
            "decode_pid": os.getpid()}


def clip_seed(seed: int, clip_id: str) -> int:
    """Seed of one clip's sample: a function of the run seed and the clip id only (not of scheduling)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()[:8], "big") >> 1


class ClipEncoder:
    """Encodes decoded clips with one VideoVAE: one per Ray actor, or one in this process."""

    def __init__(self, spec: EncoderSpec, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.vae = spec.load()
        self.identity = json.dumps({**self.vae.backend.identity, "backend": self.vae.backend.name,
                                    "precision": self.vae.backend.precision}, sort_keys=True)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = {"clip": row["clip"], "mean": EMPTY_LATENT, "logvar": EMPTY_LATENT, "error": row["error"],
               "stage": "decode" if row["error"] else "", "seed": -1, "decode_s": row["decode_s"], "encode_s": 0.0,
               "decode_pid": row["decode_pid"], "encode_pid": os.getpid(), "identity": self.identity}
        if row["error"]:
            return out
        t0 = time.perf_counter()
        try:
            latents = self.vae.encode(torch.from_numpy(np.array(row["frames"])))  # a copy: Ray's buffers are read-only
            mean, logvar = latents.mean.float().cpu(), latents.logvar.float().cpu()
            if self.spec.latents == "sample":
                clip_id = json.loads(row["clip"])["clip_id"]
                out["seed"] = clip_seed(self.spec.seed, clip_id)
                noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(out["seed"]))
                mean, logvar = mean + torch.exp(0.5 * logvar) * noise, None
            out["mean"] = mean.numpy()
            out["logvar"] = EMPTY_LATENT if logvar is None else logvar.numpy()
        except Exception as e:  # e.g. out of memory on one huge clip: its shard is retried by the next run
            log.warning("encoding clip %s failed: %s", json.loads(row["clip"])["clip_id"], e)
            out.update(error=f"{type(e).__name__}: {e}", stage="encode")
        out["encode_s"] = time.perf_counter() - t0
        return out
