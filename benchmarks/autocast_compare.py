"""Our fp16 rule against NVIDIA ModelOpt AutoCast on the same fp32 graphs (issue 14, part 4; docs/export.md).

For each component of the model it exports the fp32 graph (``cvvae.export``: the graph ``cvvae export`` writes) and
makes three fp16 graphs from it:

* ``ours``: :mod:`cvvae.export.precision` (``Fp16Rule``: statistics/exponential ops, attention logits and tensors
  reaching ``max_abs`` on the calibration clip stay fp32; fp16 I/O);
* ``autocast``: ``modelopt.onnx.autocast.convert_to_mixed_precision`` with its defaults (``data_max`` 512,
  ``init_max`` 65504) on the same calibration clip, fp16 I/O (``keep_io_types=False``);
* ``autocast+rule``: AutoCast with our rule's fp32 nodes as ``nodes_to_exclude`` and ``data_max`` = our ``max_abs``.

Then it runs every graph in ONNX Runtime's CPU provider on real clips (``/work/shared/data/videos/*.mp4``, the first
frames resized; the decoder decodes the fp32 encoder's latent mean of the same clip) and reports, against the fp32
graph: nodes computing in fp32 (non-Cast nodes with a float32 output), Cast nodes, max and mean absolute error,
file size and whether the TensorRT check passes. ONNX Runtime's CPU provider lacks fp16 kernels for some ops (it
inserts casts and computes those in fp32), so the errors measure fp16 storage of weights and activations between
ops, not fp16 arithmetic inside every op; that is the same for all three graphs.

    python benchmarks/autocast_compare.py [--model random:cvvae-v1] [--frames 9] [--size 64] [--json out.json]

Needs the export extra and ``nvidia-modelopt`` (see docs/export.md for how it was installed without a CUDA torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

VIDEOS = Path("/work/shared/data/videos")


def fp32_compute_nodes(model: onnx.ModelProto) -> int:
    """Non-Cast nodes with a float32 output (after shape inference): the nodes an fp16 engine runs in fp32."""
    from cvvae.export.precision import tensor_types

    types = tensor_types(onnx.shape_inference.infer_shapes(model))
    return sum(1 for n in model.graph.node if n.op_type != "Cast"
               and any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output if o))


def describe(model: onnx.ModelProto, path: Path) -> dict[str, Any]:
    from cvvae.export.verify import check_tensorrt_ready

    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "fp32_nodes": fp32_compute_nodes(model), "casts": ops.get("Cast", 0),
            "mib": round(path.stat().st_size / 2**20, 2), "trt_issues": check_tensorrt_ready(model)}


def real_clips(frames: int, size: int) -> list[tuple[str, np.ndarray]]:
    """(name, 1x3xTxHxW float32 in [-1, 1]) for each clip under VIDEOS: the first ``frames`` frames at size x size."""
    from cvvae.video_io import read_video

    out = []
    for path in sorted(VIDEOS.glob("*.mp4")):
        rgb, _ = read_video(path, max_frames=frames, size=(size, size))
        x = rgb.astype(np.float32).transpose(3, 0, 1, 2)[None] / 127.5 - 1.0
        out.append((path.stem.split("-")[0], np.ascontiguousarray(x)))
    if not out:
        raise SystemExit(f"no clips in {VIDEOS}")
    return out


def autocast(fp32_path: Path, calib: dict[str, np.ndarray], workdir: Path, **kw: Any) -> onnx.ModelProto:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    npz = workdir / f"{fp32_path.stem}.calib.npz"
    np.savez(npz, **calib)
    return convert_to_mixed_precision(str(fp32_path), low_precision_type="fp16", calibration_data=str(npz),
                                      keep_io_types=False, **kw)


def errors(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float]:
    diffs = [np.abs(got[k].astype(np.float64) - ref[k]) for k in ref]
    return max(float(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint or random:PRESET (default: the built-in default)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from cvvae.export import contract
    from cvvae.export.precision import Fp16Rule, Precision, convert_precision, select_fp32_nodes
    from cvvae.export.to_onnx import ExportConfig, export_component_fp32
    from cvvae.export.verify import calibration_feeds, run_graph
    from cvvae.onnxrt import ort_session
    from cvvae.loading import load_model

    model = load_model(args.model).eval()
    rule = Fp16Rule()
    clips = real_clips(args.frames, args.size)
    calibration = calibration_feeds(model)
    config = ExportConfig(precisions=("fp32",), verify=False)
    rows: list[dict[str, Any]] = []
    latents: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="autocast-") as tmp:
        work = Path(tmp)
        for component in contract.COMPONENTS:
            base = export_component_fp32(model, component, config, work / f"scratch-{component}")
            fp32_path = work / f"{component}.onnx"
            onnx.save_model(base, str(fp32_path))
            feeds = calibration[component]
            t = time.perf_counter()
            selection = select_fp32_nodes(base, feeds, rule, work)
            graphs: dict[str, tuple[onnx.ModelProto, float]] = {
                "ours": (convert_precision(base, Precision.FP16, selection.fp32_nodes, io_low=rule.low_io),
                         time.perf_counter() - t)}
            t = time.perf_counter()
            graphs["autocast"] = (autocast(fp32_path, feeds[0], work), time.perf_counter() - t)
            exclude = ["^" + re.escape(name) + "$" for name in selection.fp32_nodes]
            t = time.perf_counter()
            graphs["autocast+rule"] = (autocast(fp32_path, feeds[0], work, nodes_to_exclude=exclude,
                                                data_max=rule.max_abs), time.perf_counter() - t)
            sessions = {"fp32": ort_session(fp32_path)}
            for name, (proto, _) in graphs.items():
                path = work / f"{component}.{name}.onnx"
                onnx.save_model(proto, str(path))
                sessions[name] = ort_session(path)
            refs = {}
            for clip, x in clips:
                feed = {contract.ENCODER_INPUT: x} if component == contract.ENCODER else \
                    {spec_input(component): latents[clip]}
                refs[clip] = (feed, run_graph(sessions["fp32"], feed))
                if component == contract.ENCODER:
                    latents[clip] = refs[clip][1][contract.ENCODER_OUTPUTS[0]]
            for name, (proto, seconds) in graphs.items():
                per_clip = [errors(ref, run_graph(sessions[name], feed)) for feed, ref in refs.values()]
                row = {"component": component, "engine": name, "convert_s": round(seconds, 1),
                       **describe(proto, work / f"{component}.{name}.onnx"),
                       "max_err": max(e[0] for e in per_clip), "mean_err": float(np.mean([e[1] for e in per_clip]))}
                rows.append(row)
                print(f"{component:<8} {name:<14} fp32 nodes {row['fp32_nodes']:>4}/{row['nodes']:<4} "
                      f"casts {row['casts']:>4}  max {row['max_err']:.3e}  mean {row['mean_err']:.3e}  "
                      f"{row['mib']:>7.2f} MiB  {row['convert_s']:>6.1f} s  trt issues {len(row['trt_issues'])}",
                      flush=True)
    try:
        from importlib.metadata import version
        modelopt_version = version("nvidia-modelopt")
    except Exception:
        modelopt_version = "?"
    result = {"model": args.model or "default", "frames": args.frames, "size": args.size,
              "clips": [c for c, _ in clips], "rule": rule.as_dict(), "modelopt": modelopt_version,
              "machine": platform.processor() or platform.machine(), "load": os.getloadavg(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def spec_input(component: str) -> str:
    from cvvae.export.contract import COMPONENT_SPECS

    return COMPONENT_SPECS[component].input_names[0]


if __name__ == "__main__":
    main()
