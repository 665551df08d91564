"""Append a GPU bench (``cvvae bench -o DIR`` on CUDA) to docs/benchmarks.md under a heading naming the device.

Used by scripts/gpu_check.sh; the device name and the run's date come from the bench's own bench.json.

    python scripts/append_gpu_bench.py DIR/bench.md docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def section(bench_md: Path) -> str:
    """The markdown section: heading with the GPU and date, the command, the bench's own table and notes."""
    data = json.loads(bench_md.with_name("bench.json").read_text())
    gpu = data["machine"].get("gpu")
    if not gpu:
        raise SystemExit(f"{bench_md.with_name('bench.json')} names no GPU: it is not a CUDA bench")
    when = data.get("started_utc", "")[:10]
    return (f"\n## GPU: {gpu} ({when}, scripts/gpu_check.sh)\n\n"
            f"random:cvvae-v1 encode/decode at 17x256x256 and 17x720x1280 (the model's 576 px tiles) in torch "
            f"fp32/fp16/bf16 on the GPU; 'time / ref' is relative to fp32, 'of GEMM peak' to the GEMM at the "
            f"target's precision. Raw data: {bench_md.parent.name}/bench.json.\n\n" + bench_md.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_md", type=Path)
    parser.add_argument("docs", type=Path)
    args = parser.parse_args()
    text = section(args.bench_md)
    with args.docs.open("a") as f:
        f.write(text)
    print(f"appended the {args.bench_md} table to {args.docs}")


if __name__ == "__main__":
    main()
