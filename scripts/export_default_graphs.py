#!/usr/bin/env python
"""Export the built-in default model's ONNX graphs next to its weights (package data of the thin runtime).

The torch-free base install runs the default model through ONNX Runtime from ``cvvae/weights/default/onnx/``
(docs/thin-runtime.md). This script makes that directory from ``cvvae/weights/default`` with the toolkit's exporter
(``cvvae.export``: verification against the PyTorch reference included); its manifest records the weights' sha256,
and tests/thin/test_default_graphs.py fails when the weights change without the graphs being exported again:

    python scripts/export_default_graphs.py            # after retraining the default model (needs the torch extra)
    python scripts/export_default_graphs.py --model DIR  # another model folder: writes DIR/onnx

The export is written atomically and replaces the previous one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,fp16", help="Comma list (fp32 is always included).")
    parser.add_argument("--model", type=Path, default=None,
                        help="Model folder whose onnx/ to write (default: the shipped cvvae/weights/default).")
    args = parser.parse_args(argv)

    from cvvae.default_model import DEFAULT_MODEL_DIR
    from cvvae.export.to_onnx import ExportConfig, export_model
    from cvvae.loading import load_model

    model_dir = args.model or DEFAULT_MODEL_DIR
    graphs = model_dir / "onnx"
    model = load_model(model_dir)
    config = ExportConfig(precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()))
    manifest = export_model(model, graphs, config, overwrite=True, on_progress=print)
    for component, entry in manifest.components.items():
        for precision, graph in entry.files.items():
            print(f"{component} {precision}: {graph.path}, {graph.size_bytes / 2**20:.1f} MiB")
    print(f"weights sha256 {manifest.checkpoint['sha256']} -> {graphs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
