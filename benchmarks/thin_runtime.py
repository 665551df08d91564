"""Figures of the thin runtime (docs/thin-runtime.md): install size, import time, numpy vs torch executor speed.

Three measurements, printed as a table and written as JSON:

1. size of a torch-free virtualenv (the base install: ``python -m venv`` + ``pip install -e .``), as ``du`` counts it,
   with its largest packages;
2. ``import cvvae.runtime`` in a fresh interpreter of that venv (best and median of ``--import-runs``), and whether
   torch got imported;
3. ONNX Runtime encode and decode of the default model's shipped fp32 graphs on the same inputs, through the array-API
   executor on numpy arrays (``cvvae.tiling`` today) and through the torch executor it replaced (``cvvae/tiling.py``
   at ``--baseline-rev``, fed torch tensors as the old OrtComponent did), interleaved run by run so that load on the
   machine hits both alike. Run this part with a Python that has torch (the main environment).

    python benchmarks/thin_runtime.py --base-venv /work/venvs/thin-base --out docs/benchmarks/thin-runtime/thin-runtime.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def du_bytes(path: Path) -> int:
    """Disk usage of a tree (allocated blocks, as ``du`` reports; hard links counted once)."""
    seen, total = set(), 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def venv_size(venv: Path) -> dict:
    site = next(venv.glob("lib/python*/site-packages"))
    packages = sorted(((du_bytes(p), p.name) for p in site.iterdir() if p.is_dir() and not p.name.endswith(
        (".dist-info", "__pycache__"))), reverse=True)
    freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.split()
    return {"venv": str(venv), "total_mb": du_bytes(venv) / 1e6,
            "largest_mb": {name: round(size / 1e6, 1) for size, name in packages[:8]},
            "packages": freeze, "torch_installed": any(p.lower().startswith("torch") for p in freeze)}


def import_time(python: Path, runs: int) -> dict:
    code = ("import time, sys; t = time.perf_counter(); import cvvae.runtime; "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    times, torch_loaded = [], False
    for _ in range(runs):
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
        seconds, loaded = out.split()
        times.append(float(seconds))
        torch_loaded |= loaded == "True"
    return {"python": str(python), "runs": runs, "best_s": min(times), "median_s": statistics.median(times),
            "torch_imported": torch_loaded}


def old_torch_tiling(rev: str) -> types.ModuleType:
    """``cvvae/tiling.py`` as it was at ``rev`` (the torch-only executor), loaded as a module."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:cvvae/tiling.py"], capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType("cvvae_tiling_baseline")
    exec(compile(source.replace("from .plan import", "from cvvae.plan import"), f"{rev}:cvvae/tiling.py", "exec"),
         module.__dict__)
    return module


def executor_speed(frames: int, height: int, width: int, tile: int | None, repeats: int, rev: str,
                   threads: int) -> dict:
    import numpy as np
    import torch

    from cvvae import tiling
    from cvvae.runtime import VideoVAE

    torch.set_num_threads(threads)
    vae = VideoVAE.load(backend="onnxruntime", threads=threads,
                        plan_overrides={"tile_size": tile} if tile else None)
    enc, dec = vae.backend.encoder_graph, vae.backend.decoder_graph
    old = old_torch_tiling(rev)
    in_session = [0.0]  # seconds spent inside ONNX Runtime; the rest of a run is the executor's own work

    def timing(session):
        run = session.run

        def timed_run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                in_session[0] += time.perf_counter() - t0
        session.run = timed_run

    timing(enc.session)
    timing(dec.session)

    def old_fn(graph):  # the OrtComponent of `rev`: torch in, numpy to the session, torch out
        def run(x):
            feed = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32, copy=False))
            results = graph.session.run(graph.outputs, {graph.inputs[0].name: feed})
            out = [torch.from_numpy(r).float() for r in results]
            return torch.cat(out, dim=1) if len(out) == 2 else out[0]
        return run

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 3, frames, height, width)).astype(np.float32)
    plan = vae.plan(frames, height, width)
    z = rng.standard_normal((1, 4, plan.latent_frames, plan.latent_height, plan.latent_width)).astype(np.float32)
    calls = {
        "numpy": {"encode": lambda: tiling.encode_video(vae.backend.encoder, x, plan),
                  "decode": lambda: tiling.decode_video(vae.backend.decoder, z, plan)},
        "torch": {"encode": lambda: old.encode_video(old_fn(enc), torch.from_numpy(x), plan),
                  "decode": lambda: old.decode_video(old_fn(dec), torch.from_numpy(z), plan)},
    }
    runs = {name: {op: [] for op in ops} for name, ops in calls.items()}
    overhead = {name: {op: [] for op in ops} for name, ops in calls.items()}
    results: dict[str, list] = {name: [] for name in calls}
    for r in range(repeats):
        for name, ops in calls.items():
            for op, call in ops.items():
                in_session[0] = 0.0
                t0 = time.perf_counter()
                out = call()
                runs[name][op].append(time.perf_counter() - t0)
                overhead[name][op].append(runs[name][op][-1] - in_session[0])
                if r == 0:
                    results[name].append(np.asarray(out))
    agree = max(float(np.abs(a - b).max()) for a, b in zip(results["numpy"], results["torch"]))
    summary = {name: {op: {"median_s": statistics.median(v), "best_s": min(v), "runs_s": v,
                           "outside_session_median_s": statistics.median(overhead[name][op])}
                      for op, v in ops.items()}
               for name, ops in runs.items()}
    return {"input": [frames, height, width], "tile_size": tile, "tiles": plan.num_tiles, "repeats": repeats,
            "ort_threads": threads, "baseline_rev": rev, "max_abs_difference": agree, **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-venv", type=Path, required=True, help="the torch-free virtualenv to measure")
    parser.add_argument("--import-runs", type=int, default=9)
    parser.add_argument("--baseline-rev", default="c1df271", help="commit whose cvvae/tiling.py is the torch executor")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", default="128x128", help="HxW of the speed runs")
    parser.add_argument("--tile", type=int, default=64, help="tile size (px) of the tiled speed run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))

    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_before": os.getloadavg(),
              "size": venv_size(args.base_venv),
              "import": {"base_venv": import_time(args.base_venv / "bin" / "python", args.import_runs),
                         "this_python": import_time(Path(sys.executable), args.import_runs)},
              "speed": [executor_speed(args.frames, h, w, tile, args.repeats, args.baseline_rev, args.threads)
                        for tile in (None, args.tile)],
              "load_avg_after": os.getloadavg()}
    size, imp = report["size"], report["import"]
    print(f"base venv: {size['total_mb']:.0f} MB, torch installed: {size['torch_installed']}; largest: "
          + ", ".join(f"{k} {v} MB" for k, v in size["largest_mb"].items()))
    for name, r in imp.items():
        print(f"import cvvae.runtime ({name}): best {r['best_s']:.3f} s, median {r['median_s']:.3f} s, "
              f"torch imported: {r['torch_imported']}")
    for s in report["speed"]:
        print(f"{s['input']} tile {s['tile_size']} ({s['tiles']} tiles), median of {s['repeats']}: "
              + "; ".join(f"{op} numpy {s['numpy'][op]['median_s']:.3f} s vs torch {s['torch'][op]['median_s']:.3f} s "
                          f"(outside ONNX Runtime {s['numpy'][op]['outside_session_median_s'] * 1e3:.1f} vs "
                          f"{s['torch'][op]['outside_session_median_s'] * 1e3:.1f} ms)"
                          for op in ("encode", "decode")) + f"; max |diff| {s['max_abs_difference']:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
