"""Export the full-size CV-VAE (random weights, 182 M parameters) and report time and peak memory.

    python benchmarks/export_full_size.py [--model random:cvvae-v1] [--out DIR] [--precisions fp32,fp16]
                                          [--no-verify] [--json]

Not part of the test suite (minutes on a 2-core machine). Prints, per phase, wall time and the process's peak
resident set size (ru_maxrss, which never decreases), then the verification table and the fp16 rule's outcome.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:cvvae-v1")
    parser.add_argument("--out", type=Path, default=None, help="export directory (default: a temporary one)")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--components", default="encoder,decoder")
    parser.add_argument("--exporter", default="torchscript")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary export directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    import torch

    from cvvae.export.precision import parse_precisions
    from cvvae.export.to_onnx import ExportConfig, export_model, parse_components
    from cvvae.export.verify import OutputComparison, format_table
    from cvvae.loading import load_model

    torch.set_num_threads(2)
    phases: list[dict] = []
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        now = time.perf_counter() - t0
        phases.append({"t_s": round(now, 1), "peak_rss_gib": round(peak_rss_gib(), 2), "step": msg})
        print(f"[{now:7.1f} s, peak RSS {peak_rss_gib():5.2f} GiB] {msg}", file=sys.stderr, flush=True)

    model = load_model(args.model)
    progress(f"loaded {args.model}: {model.num_parameters():,} parameters")
    scratch = None
    out = args.out
    if out is None:
        scratch = Path(tempfile.mkdtemp(prefix="cvvae-export-bench-"))
        out = scratch / "export"
    config = ExportConfig(components=parse_components(args.components), precisions=parse_precisions(args.precisions),
                          exporter=args.exporter, verify=not args.no_verify)
    try:
        manifest = export_model(model, out, config, overwrite=args.out is not None, on_progress=progress)
        total = time.perf_counter() - t0
        files = {f"{c}/{p}": {"path": f.path, "MB": round(f.size_bytes / 1e6, 1),
                              "io": sorted(set(f.io_dtypes.values())),
                              "fp32_nodes": (f.fp16_rule or {}).get("fp32_nodes"),
                              "fp32_by_reason": (f.fp16_rule or {}).get("fp32_by_reason"),
                              "max_abs_seen": (f.fp16_rule or {}).get("max_abs_seen"),
                              "verified": f.verified.get("status"),
                              "max_abs_by_output": f.verified.get("max_abs_by_output")}
                 for c, e in manifest.components.items() for p, f in e.files.items()}
        result = {"model": args.model, "parameters": model.num_parameters(), "total_s": round(total, 1),
                  "peak_rss_gib": round(peak_rss_gib(), 2), "files": files, "phases": phases,
                  "torch_threads": torch.get_num_threads()}
        comparisons = [OutputComparison(**{k: v for k, v in c.items() if k != "passed"})
                       for e in manifest.components.values() for f in e.files.values()
                       for c in f.verified.get("comparisons", [])]
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for key, f in files.items():
                print(f"{key:<14} {f['path']:<20} {f['MB']:>8.1f} MB  io {','.join(f['io'])}  "
                      f"verification {f['verified']}"
                      + (f"  fp32 nodes {f['fp32_nodes']} {f['fp32_by_reason']} max|x| {f['max_abs_seen']:.4g}"
                         if f["fp32_nodes"] is not None else ""))
            if comparisons:
                print(format_table(comparisons))
            print(f"total {total:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")
    finally:
        if scratch is not None and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
