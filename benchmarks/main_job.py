"""The README's main job, today's behaviour against the new defaults, interleaved (issue 16).

Job: ``cvvae reconstruct <clip> --max-frames 33 --resize-short-side 256 --side-by-side`` with the default model.
Variants, run A B A B ... each in a fresh process:

* ``before``: ``--precision fp32`` with the C allocator left alone (``CVVAE_ALLOCATOR=system``) and every layer run
  whole (``CVVAE_SLICE_BYTES=0``), i.e. what the CLI did before issue 16 (except the in-place SiLU/residual and
  1xkxk per-frame convs of ``cvvae.blocks.inference_inplace``, which both variants run);
* ``now``: the defaults (``--precision auto``, allocator thresholds raised by cvvae.allocator, frame-sliced
  full-resolution layers (cvvae.slicing), memory budget).

Per run: wall, user and system CPU time, minor page faults and peak RSS of the child (``os.wait4``) and the 1-minute
load average. PSNR vs the input is measured once per variant, untimed, before the video codec: the job's latents
(``--save-latents``) are decoded to .npy pixels with the same precision and compared with the input frames.

    python benchmarks/main_job.py [--rounds 2] [--clip PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO.parent / "shared" / "data" / "videos" / "4896510-hd_1280_720_30fps.mp4"
SELECT = ["--max-frames", "33", "--resize-short-side", "256"]
VARIANTS = {
    "before": (["--precision", "fp32"], {"CVVAE_ALLOCATOR": "system", "CVVAE_SLICE_BYTES": "0"}),
    "now": ([], {}),
}


def cvvae() -> list[str]:
    exe = Path(sys.executable).with_name("cvvae")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cvvae.cli"]


def timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd`` and return the child's own wall/user/sys/faults/peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out}")
    precision = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("precision:")),
                     "?")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "peak_rss_gib": usage.ru_maxrss / 2**20, "load_1min": os.getloadavg()[0], "precision": precision}


def psnr_vs_input(clip: Path, latents: Path, flags: list[str], env: dict[str, str], work: Path) -> float:
    import numpy as np
    import torch

    from cvvae.metrics import psnr
    from cvvae.runtime.api import to_pixels
    from cvvae.video_io import read_video

    out = work / "pixels.npy"
    subprocess.run([*cvvae(), "decode", str(latents), "-o", str(out), "--force", *flags], check=True,
                   env={**os.environ, **env}, capture_output=True)
    frames, _ = read_video(clip, max_frames=33, resize_short_side=256)
    return psnr(to_pixels(frames), torch.from_numpy(np.load(out)).clamp(-1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=CLIP)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cvvae-main-job-"))
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        for r in range(args.rounds):
            for name, (flags, env) in VARIANTS.items():
                cmd = [*cvvae(), "reconstruct", str(args.clip), "-o", str(work / f"{name}.mp4"), *SELECT,
                       "--side-by-side", "--force", "--save-latents", str(work / f"{name}.safetensors"), *flags]
                run = timed(cmd, env)
                runs[name].append(run)
                print(f"round {r + 1} {name:<6} wall {run['wall_s']:6.1f} s  user {run['user_s']:6.1f}  "
                      f"sys {run['sys_s']:5.1f}  faults {run['minor_faults'] / 1e6:5.2f} M  "
                      f"peak {run['peak_rss_gib']:.2f} GiB  load {run['load_1min']:.1f}  ({run['precision']})",
                      flush=True)
        summary = {}
        for name, (flags, env) in VARIANTS.items():
            rows = runs[name]
            summary[name] = {k: statistics.median(row[k] for row in rows)
                             for k in ("wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_gib", "load_1min")}
            summary[name]["precision"] = rows[0]["precision"]
            summary[name]["psnr_vs_input_db"] = psnr_vs_input(args.clip, work / f"{name}.safetensors", flags, env,
                                                              work)
        before, now = summary["before"], summary["now"]
        print(f"\n{'variant':<8} {'wall s':>7} {'user s':>7} {'sys s':>6} {'sys/user':>8} {'faults M':>8} "
              f"{'peak GiB':>8} {'PSNR dB':>8}  precision")
        for name, s in summary.items():
            print(f"{name:<8} {s['wall_s']:>7.1f} {s['user_s']:>7.1f} {s['sys_s']:>6.1f} "
                  f"{s['sys_s'] / s['user_s']:>8.1%} {s['minor_faults'] / 1e6:>8.2f} {s['peak_rss_gib']:>8.2f} "
                  f"{s['psnr_vs_input_db']:>8.3f}  {s['precision']}")
        print(f"speed-up (median wall) {before['wall_s'] / now['wall_s']:.2f}x; "
              f"PSNR difference {now['psnr_vs_input_db'] - before['psnr_vs_input_db']:+.3f} dB")
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
