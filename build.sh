#!/usr/bin/env bash
# build.sh: one command from a checkpoint to checked deployment artifacts, on a CPU-only or a GPU machine.
#
#   export (ONNX graphs, each verified against PyTorch in ONNX Runtime)
#   -> INT8 calibration (only with --int8)
#   -> TensorRT engines (where TensorRT and a GPU are missing: skipped with the reason, trtexec lines written)
#   -> parity of every available backend against PyTorch on a real clip, a few frames at small size
#   -> a summary table, with the trtexec and `polygraphy run --trt --onnxrt` lines
#
# The steps are `cvvae deploy` (cvvae/tools/deploy.py, tests/test_deploy.py); this script is the card's entry point and
# passes its options through. Idempotent: a step whose outputs are current is skipped (state: OUT/.build-state.json).
#
# Usage: ./build.sh [--model PATH|random:PRESET] [--out DIR] [--precision fp16|fp32] [--int8] [--clip VIDEO]
#                   [--frames N] [--size HxW] [--force]
# Exit status: 0 when every step that ran succeeded (steps not available here do not count), 1 when one failed,
# 2 for a usage error.

set -uo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if command -v cvvae >/dev/null 2>&1; then
    exec cvvae deploy "$@"
fi
exec "${PYTHON:-python}" -c "from cvvae.cli import main; main()" deploy "$@"
