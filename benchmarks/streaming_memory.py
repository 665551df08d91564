"""Peak memory of streaming decode vs video length (runtime issue: flat memory).

Each measurement runs in a fresh process: load the model, warm up with one chunk, reset the kernel's peak-RSS mark
(/proc/self/clear_refs = 5), then decode N frames chunk by chunk into a sink that keeps nothing, and report VmHWM.

    python benchmarks/streaming_memory.py --model random:tiny-v1 --frames 17 65 257 --size 128x160
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_once(model: str, frames: int, height: int, width: int, backend: str, threads: int) -> dict:
    """Run inside the child process: peak RSS of decoding ``frames`` frames."""
    import torch

    from cvvae.runtime import VideoVAE

    torch.set_num_threads(threads)
    vae = VideoVAE.load(model, backend=backend)
    z_ch, s, tc = vae.config.latent_channels, vae.config.spatial_compress, vae.config.time_compress
    latent_frames = (frames - 1) // tc + 1
    z = torch.randn(1, z_ch, latent_frames, height // s, width // s, generator=torch.Generator().manual_seed(0))
    for _ in vae.decode_stream(z[:, :, :5]):  # warm-up: allocator pools and lazy init
        pass
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    done = 0
    for pixels in vae.decode_stream(z):
        done += pixels.shape[2]
    return {"frames": done, "peak_rss_mb": _status_kb("VmHWM") / 1024, "rss_before_mb": base / 1024,
            "height": height, "width": width}


def measure(model: str, frames: int, height: int, width: int, backend: str = "torch", threads: int = 1,
            mmap_threshold: int | None = 1 << 20) -> dict:
    """Measure in a fresh Python process so that peaks do not carry over.

    ``mmap_threshold`` fixes glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_): by default glibc raises it as large
    blocks are freed, so activation buffers drift onto the heap and the peak RSS wanders by tens of MB between
    identical runs; a fixed threshold makes the figure repeatable. ``None`` keeps glibc's default behaviour.
    """
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import streaming_memory as m; "
            f"print(json.dumps(m.measure_once({model!r}, {frames}, {height}, {width}, {backend!r}, {threads})))")
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny-v1")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 65, 257])
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    rows = [measure(args.model, n, h, w, args.backend, args.threads) for n in args.frames]
    print(f"{'frames':>7} {'peak RSS MB':>12} {'RSS before MB':>14}")
    for r in rows:
        print(f"{r['frames']:>7} {r['peak_rss_mb']:>12.1f} {r['rss_before_mb']:>14.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
