"""Re-record the CPU figures of docs/benchmarks.md (the same two runs as the `cvvae bench` commands listed there).

    python benchmarks/record_cpu_figures.py --out docs/benchmarks --force

1. ``full``: the full-size architecture (random:cvvae-v1) and the built-in default model, encode and decode, 17 and
   65 frames at 64x64 and 17 frames at 96x96, against the reference (~20 min on 2 busy cores);
2. ``tiny``: random:tiny-v1, encode/decode/round trip, 17/65/257 frames at 64x64 (flat streaming memory) and
   17 frames at 64x64/128x128 (~15 min).

Each writes bench.json, bench.md and the plots into OUT/NAME (OUT/NAME-Nthread with --threads N). The figures depend on the machine's load: the
load average is recorded with every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from cvvae.tools.bench import BenchConfig, run_bench, write_results

RUNS = {
    "full": BenchConfig(models=("random:cvvae-v1", "default"), ops=("encode", "decode"), frames=(17, 65),
                        frame_size=(64, 64), sizes=((64, 64), (96, 96)), size_frames=17, reps=2),
    "tiny": BenchConfig(models=("random:tiny-v1",), frames=(17, 65, 257), frame_size=(64, 64),
                        sizes=((64, 64), (128, 128)), size_frames=17, reps=2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--threads", type=int, default=None, help="Threads (default: usable cores).")
    parser.add_argument("--force", action="store_true", help="Replace existing OUT/NAME directories.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.runs:
        cfg = RUNS[name] if args.threads is None else dataclasses.replace(RUNS[name], threads=args.threads)
        result = run_bench(cfg, on_progress=logging.getLogger(name).info)
        suffix = "" if args.threads is None else f"-{args.threads}thread"
        write_results(result, args.out / f"{name}{suffix}", overwrite=args.force)
        print(result.markdown())


if __name__ == "__main__":
    main()
