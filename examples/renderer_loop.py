#!/usr/bin/env python
"""Embed the CV-VAE runtime in a renderer-style loop (docs/thin-runtime.md); needs only the base install.

A renderer makes frames one at a time. This program

1. pushes every frame into an :class:`~cvvae.runtime.api.EncodeSession` as soon as it is "rendered"; each temporal
   chunk's latents come back as soon as its frames are in, and are copied into a latent buffer the caller owns;
2. decodes those latents chunk by chunk into a frame buffer the caller owns (one chunk long, reused), handing each
   chunk to a sink (a video file with ``-o``, else a running checksum);
3. reports progress through callbacks, and prints the peak memory: it stays flat as ``--frames`` grows, because at
   most one chunk of frames is held at any time.

    python examples/renderer_loop.py --frames 65 --size 128x160 -o out.mp4
    python examples/renderer_loop.py --model EXPORT_DIR --device cuda   # any export; ONNX Runtime's CUDA provider

Thread safety: use one VideoVAE per thread (as here), or guard a shared one with a lock of your own.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np

from cvvae.runtime import Latents, VideoVAE
from cvvae.video_io import VideoWriter, tensor_to_frames


def render(index: int, height: int, width: int) -> np.ndarray:
    """Stand-in for the host application's renderer: one uint8 RGB frame (H, W, 3), moving gradients."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.sin(x / 17 + index / 6)
    g = np.cos(y / 13 - index / 9)
    b = np.sin((x + y) / 29 + index / 11)
    return (127.5 * (np.stack([r, g, b], axis=-1) + 1)).astype(np.uint8)


def progress(what: str):
    """A progress callback (frames done, total) that redraws one line on stderr."""
    return lambda done, total: print(f"\r{what} {done}/{total} frames", end="", file=sys.stderr)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=65)
    parser.add_argument("--size", default="128x160", help="HxW of the rendered frames")
    parser.add_argument("--model", default=None, help="export directory (default: the built-in model's graphs)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or tensorrt[:N] (ONNX Runtime providers)")
    parser.add_argument("-o", "--output", default=None, help="write the decoded frames to this video")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))

    vae = VideoVAE.load(args.model, backend="onnxruntime", device=args.device)
    plan = vae.plan(args.frames, height, width)

    # 1. encode while rendering: the caller owns the latent buffer (sized from the plan up front)
    mean = np.empty((1, vae.config.latent_channels, plan.latent_frames, plan.latent_height, plan.latent_width),
                    np.float32)
    filled = 0

    def keep(chunks: list) -> None:
        nonlocal filled
        for chunk_mean, _logvar, _plan in chunks:
            if chunk_mean.ndim == 5:  # an empty item only carries the final plan
                mean[:, :, filled:filled + chunk_mean.shape[2]] = chunk_mean
                filled += chunk_mean.shape[2]

    session = vae.encode_session(total_frames=args.frames, on_progress=progress("encode"))
    t0 = time.perf_counter()
    for i in range(args.frames):
        keep(session.push(render(i, height, width)[None]))  # (1, H, W, 3): each frame as soon as it is rendered
    keep(session.finish())
    assert filled == plan.latent_frames
    encode_s = time.perf_counter() - t0
    print(file=sys.stderr)

    # 2. decode chunk by chunk into a caller-owned, reused frame buffer
    frames = np.empty(((vae.settings.chunk_frames or args.frames) + 1, height, width, 3), np.uint8)
    latents = Latents(mean, None, args.frames, height, width)
    checksum, decoded = 0, 0
    t0 = time.perf_counter()
    with VideoWriter(args.output, 24.0, overwrite=True) if args.output else nullcontext() as writer:
        for pixels in vae.decode_stream(latents, on_progress=progress("decode")):
            n = pixels.shape[2]
            frames[:n] = tensor_to_frames(pixels[0])
            if writer is not None:
                writer.write(frames[:n])
            checksum = (checksum + int(frames[:n].sum(dtype=np.uint64))) % 2**32
            decoded += n
    decode_s = time.perf_counter() - t0
    print(file=sys.stderr)
    print(f"{args.frames} frames of {height}x{width}: encode {encode_s:.2f} s, decode {decode_s:.2f} s, "
          f"latent {tuple(mean.shape)}, decoded {decoded} frames (checksum {checksum:08x}), "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
