#!/usr/bin/env bash
# The prepared GPU check (issue 16): run it whenever a CUDA GPU is lent. Needs a CUDA build of torch; TensorRT and
# onnxruntime-gpu may be absent (their tests skip with the reason). About 5-8 minutes on one GPU:
#   1. the `gpu`-marked tests: golden parity on CUDA in fp32/bf16/fp16, fp16 NaN/Inf on saturated inputs
#      (tests/test_gpu_precision.py) and the TensorRT tests where TensorRT is installed;
#   2. `cvvae bench` of random:cvvae-v1 encode/decode at 17x256x256 and 17x720x1280 (tiled, the model's 576 px
#      tiles) in fp32, fp16 and bf16 on the GPU;
#   3. the bench table appended to docs/benchmarks.md under a heading naming the device.
# Without a GPU it says so and exits 0 without running anything (CI runs that path, and --dry-run).
#
# usage: scripts/gpu_check.sh [--dry-run] [--device cuda[:N]] [--python PATH] [--out DIR] [--docs FILE]
set -euo pipefail

usage() {
    echo "usage: scripts/gpu_check.sh [--dry-run] [--device cuda[:N]] [--python PATH] [--out DIR] [--docs FILE]" >&2
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
DEVICE="cuda"
PYTHON="${PYTHON:-python}"
OUT=""
DOCS="$REPO/docs/benchmarks.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --device|--python|--out|--docs)
            if [[ $# -lt 2 || "$2" == --* ]]; then
                echo "gpu_check: $1 needs a value" >&2; usage; exit 2
            fi
            case "$1" in
                --device) DEVICE="$2" ;;
                --python) PYTHON="$2" ;;
                --out) OUT="$2" ;;
                --docs) DOCS="$2" ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'" >&2; usage; exit 2 ;;
    esac
done
if [[ ! "$DEVICE" =~ ^cuda(:[0-9]+)?$ ]]; then
    echo "gpu_check: --device must be cuda or cuda:N, not '$DEVICE'" >&2; exit 2
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: python '$PYTHON' not found; pass --python PATH (the venv with cvvae-deploy installed)" >&2
    exit 2
fi
OUT="${OUT:-$REPO/docs/benchmarks/gpu-$(date -u +%Y%m%d)}"
INDEX="${DEVICE#cuda}"; INDEX="${INDEX#:}"; INDEX="${INDEX:-0}"

TESTS=("$PYTHON" -m pytest -q -m gpu -rs "$REPO/tests")
BENCH=("$PYTHON" -c "from cvvae.cli import main; main(prog_name='cvvae')" bench --model random:cvvae-v1 --device "$DEVICE"
       --targets torch:fp32,torch:fp16,torch:bf16 --ops encode,decode --frames 17 --frame-size 256x256
       --sizes 720x1280 --size-frames 17 --reps 3 --warmup 1 --gemm-seconds 2 --no-plots --force -o "$OUT")
APPEND=("$PYTHON" "$REPO/scripts/append_gpu_bench.py" "$OUT/bench.md" "$DOCS")

show() { printf '  '; printf '%q ' "$@"; printf '\n'; }
if [[ $DRY_RUN -eq 1 ]]; then
    echo "gpu_check (dry run): on a CUDA GPU this runs, each step under 'timeout':"
    show timeout 240 "${TESTS[@]}"
    show timeout 300 "${BENCH[@]}"
    show "${APPEND[@]}"
    exit 0
fi

if ! GPU="$("$PYTHON" - "$INDEX" <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
index = int(sys.argv[1])
if index >= torch.cuda.device_count():
    sys.exit(f"cuda:{index} does not exist; torch sees {torch.cuda.device_count()} GPU(s)")
print(torch.cuda.get_device_name(index))
EOF
)"; then
    echo "gpu_check: skipped: see the line above; nothing was run" >&2
    exit 0
fi
echo "gpu_check: $GPU ($DEVICE); results in $OUT"
status=0
timeout 240 "${TESTS[@]}" || status=$?
timeout 300 "${BENCH[@]}" || { echo "gpu_check: bench failed or timed out" >&2; exit 1; }
"${APPEND[@]}"
if [[ $status -ne 0 ]]; then
    echo "gpu_check: gpu tests failed (exit $status); the bench was still recorded" >&2
fi
exit $status
