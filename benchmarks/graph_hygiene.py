"""Graph hygiene measured (issue 14, part 4; docs/export.md): the exporter's raw graph, onnx-graphsurgeon's
``fold_constants()`` + ``cleanup()`` + ``toposort()``, and the export's ``clean_graph`` (onnxslim).

Per component: nodes per op type, initializers and their bytes, serialized size, ONNX Runtime CPU run time (median
of ``--repeats`` after one warm-up, 2 threads) on one input and the max abs error against PyTorch fp32. To compare
with the hand-written passes these replaced, run it on the commit before (``git checkout 19c42d6``): there
``clean_graph`` is ours.

    python benchmarks/graph_hygiene.py [--model random:cvvae-v1] [--frames 9] [--size 64] [--json out.json]

Needs the torch extra and onnx-graphsurgeon (``pip install onnx-graphsurgeon``; no extra installs it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx


def graphsurgeon_clean(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))
    while True:  # folding a Shape can expose more constants
        before = len(graph.nodes)
        graph.fold_constants().cleanup()
        if len(graph.nodes) == before:
            break
    return onnx.shape_inference.infer_shapes(gs.export_onnx(graph.toposort()), data_prop=True)


def stats(model: onnx.ModelProto) -> dict[str, Any]:
    init_bytes = sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    return {"nodes": len(model.graph.node), "initializers": len(model.graph.initializer), "init_bytes": init_bytes,
            "file_bytes": model.ByteSize(), "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items()))}


def timed_run(model: onnx.ModelProto, feed: dict[str, np.ndarray], repeats: int) -> tuple[list[np.ndarray], float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint or random:PRESET (default: the built-in default)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from cvvae.export import contract
    from cvvae.export.contract import COMPONENT_SPECS
    from cvvae.export.to_onnx import clean_graph, component_module, export_raw, sample_input
    from cvvae.export.verify import check_tensorrt_ready
    from cvvae.loading import load_model

    torch.set_num_threads(2)
    model = load_model(args.model).eval()
    cfg = model.config
    result: dict[str, Any] = {"model": args.model or "default", "frames": args.frames, "size": args.size,
                              "load": os.getloadavg(), "components": {}}
    for component in contract.COMPONENTS:
        spec = COMPONENT_SPECS[component]
        module = component_module(model, component)
        raw = export_raw(module, spec, sample_input(model, component), opset=contract.DEFAULT_OPSET,
                         exporter="torchscript", scratch=Path(f".graph-hygiene-{component}"))
        channels = {"pixels": cfg.in_channels if component == contract.ENCODER else cfg.out_channels,
                    "latent": cfg.latent_channels}
        g = torch.Generator().manual_seed(1)
        if component == contract.ENCODER:
            x = torch.rand((1, cfg.in_channels, args.frames, args.size, args.size), generator=g) * 2 - 1
        else:
            x = torch.randn((1, cfg.latent_channels, cfg.num_latent_frames(args.frames),
                             args.size // cfg.spatial_compress, args.size // cfg.spatial_compress), generator=g)
        with torch.no_grad():
            ref = module(x)
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        feed = {spec.input_names[0]: x.numpy()}
        rows = {}
        for name, clean in (("raw", None), ("graphsurgeon", graphsurgeon_clean),
                            ("clean_graph", lambda m: clean_graph(m, spec, channels))):
            t = time.perf_counter()
            graph = raw if clean is None else clean(copy.deepcopy(raw))
            seconds = time.perf_counter() - t
            out, run_s = timed_run(graph, feed, args.repeats)
            rows[name] = {**stats(graph), "clean_s": round(seconds, 2), "ort_s": round(run_s, 3),
                          "max_err": max(float(np.abs(o - r).max()) for o, r in zip(out, ref)),
                          "trt_issues": len(check_tensorrt_ready(graph))}
            row = rows[name]
            print(f"{component:<8} {name:<13} nodes {row['nodes']:>5}  inits {row['initializers']:>4} "
                  f"({row['init_bytes'] / 2**20:.2f} MiB)  file {row['file_bytes'] / 2**20:.2f} MiB  "
                  f"clean {row['clean_s']:>6.2f} s  ORT {row['ort_s']:.3f} s  max err {row['max_err']:.2e}  "
                  f"TRT issues {row['trt_issues']}", flush=True)
        result["components"][component] = rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
