"""Calibrate the plan's activation-memory estimate (cvvae.plan.activation_elements) against measured peak RSS.

Each case runs in a fresh process with the runtime's allocator settings (cvvae.allocator.keep_memory): load the
model, run the component once on a tile of the given size (warm-up), reset the kernel's peak-RSS mark
(/proc/self/clear_refs = 5) and run it again; the measured activation memory is VmHWM minus the RSS just before.
The ratio measured / counted (elements x 4 bytes) over the cases is what ``ACTIVATION_CALIBRATION`` must cover
(``SLICED_ACTIVATION_CALIBRATION`` for the frame-sliced layers of the torch reference, the default; run with
``CVVAE_SLICE_BYTES=0`` to calibrate whole layers, as ONNX Runtime and TensorRT run them).

    python benchmarks/memory_calibration.py --cases default:decode:17x256x256 random:cvvae-v1:decode:17x96x96
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_CASES = ("default:decode:17x256x256", "default:encode:17x256x256", "default:decode:17x384x384",
                 "random:tiny-v1:decode:17x256x256", "random:tiny-v1:encode:17x256x256",
                 "random:cvvae-v1:decode:17x96x128", "random:cvvae-v1:encode:17x96x128")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_once(model: str, direction: str, frames: int, height: int, width: int, threads: int) -> dict:
    """In the child: peak RSS above the RSS before one encoder/decoder call on one tile."""
    from cvvae.allocator import keep_memory, release_memory

    keep_memory()
    import torch

    from cvvae.loading import load_model
    from cvvae.plan import activation_elements, slice_limit

    torch.set_num_threads(threads)
    m = load_model(None if model == "default" else model)
    cfg = m.config
    gen = torch.Generator().manual_seed(0)
    if direction == "encode":
        x, fn = torch.rand(1, 3, frames, height, width, generator=gen) * 2 - 1, m.encoder
    else:
        lt = (frames - 1) // cfg.time_compress + 1
        s = cfg.spatial_compress
        x, fn = torch.randn(1, cfg.latent_channels, lt, height // s, width // s, generator=gen), m.decoder
    with torch.no_grad():
        fn(x)
        release_memory()
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kb("VmRSS")
        y = fn(x)
    peak = _status_kb("VmHWM")
    # the torch reference runs large layers frame-sliced unless CVVAE_SLICE_BYTES=0: count them the same way
    sliced = slice_limit() > 0
    counted = activation_elements(cfg, direction, frames, height, width,
                                  slice_elements=slice_limit() // 4 if sliced else None) * 4
    measured = (peak - base) * 1024 - y.numel() * 4  # the output stays alive; the estimate counts it separately
    return {"model": model, "direction": direction, "shape": [frames, height, width], "base_mb": base / 1024,
            "peak_mb": peak / 1024, "measured_mb": measured / 2**20, "counted_mb": counted / 2**20,
            "ratio": measured / counted, "sliced": sliced}


def measure(case: str, threads: int) -> dict:
    model, direction, shape = case.rsplit(":", 2)
    t, h, w = (int(v) for v in shape.split("x"))
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import memory_calibration as m; "
            f"print(json.dumps(m.measure_once({model!r}, {direction!r}, {t}, {h}, {w}, {threads})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="MODEL:DIRECTION:TxHxW")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    print(f"{'case':<40} {'base MB':>8} {'measured MB':>12} {'counted MB':>11} {'ratio':>6}", flush=True)
    for case in args.cases:
        r = measure(case, args.threads)
        rows.append(r)
        print(f"{case:<40} {r['base_mb']:>8.0f} {r['measured_mb']:>12.0f} {r['counted_mb']:>11.0f} "
              f"{r['ratio']:>6.2f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
