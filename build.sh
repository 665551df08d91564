#!/usr/bin/env bash
# build.sh: one command from a checkpoint to checked deployment artifacts, on a CPU-only or a GPU machine.
#
#   export (python export/to_onnx.py, which verifies every graph in ONNX Runtime)
#   -> INT8 calibration (only with --int8, and only where `cvvae calibrate` exists)
#   -> TensorRT engines (cvvae build-engines; where TensorRT or a GPU is missing: said so, trtexec lines written)
#   -> parity of every available backend against PyTorch (cvvae parity) on a real clip, a few frames at small size
#   -> a summary table
#
# Idempotent: a step whose outputs are current is skipped. State lives in OUT/.build-state.json: the export is current
# when its manifest names the same checkpoint sha256 (random:PRESET for random weights) and cvvae version, has the
# precision asked for, and neither the manifest (sha256) nor its graphs (size, mtime) changed since it was recorded;
# engines are current when `cvvae build-engines` says so (sidecars: TensorRT, GPU, ONNX sha256, profiles); a parity
# result is current when its inputs (export manifest, engine sidecars, clip, options) hash to the recorded key.
#
# Usage: ./build.sh [--model PATH|random:PRESET] [--out DIR] [--precision fp16|fp32] [--int8] [--clip VIDEO]
#                   [--frames N] [--size HxW] [--force]
# Exit status: 0 when every step that ran succeeded (steps that are not available here do not count), 1 otherwise.

set -uo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL=""
OUT="artifacts"
PRECISION="fp16"
INT8=0
FORCE=0
CLIP=""
FRAMES=9
SIZE="64x96"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --precision) PRECISION="$2"; shift 2 ;;
        --int8) INT8=1; shift ;;
        --clip) CLIP="$2"; shift 2 ;;
        --frames) FRAMES="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build.sh: unknown option $1 (see ./build.sh --help)" >&2; exit 2 ;;
    esac
done
case "$PRECISION" in
    fp32|fp16) ;;
    *) echo "build.sh: --precision must be fp32 or fp16 (int8 graphs come from --int8 calibration)" >&2; exit 2 ;;
esac

PY="${PYTHON:-python}"
if command -v cvvae >/dev/null 2>&1; then CVVAE=(cvvae); else CVVAE=("$PY" -c "from cvvae.cli import main; main()"); fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
EXPORT_DIR="$OUT/export"
ENGINE_DIR="$OUT/engines"
LOGS="$OUT/logs"
mkdir -p "$LOGS" "$OUT/parity"
HELPER="$(mktemp "${TMPDIR:-/tmp}/cvvae-build.XXXXXX.py")"
trap 'rm -f "$HELPER"' EXIT
export BS_OUT="$OUT"

# ----- the bookkeeping (state file, current checks, summary) in one small Python helper -----------------------------
cat > "$HELPER" <<'PYEOF'
import hashlib, json, os, sys, time
from pathlib import Path

OUT = Path(os.environ["BS_OUT"])
STATE, RUN = OUT / ".build-state.json", OUT / ".build-run.json"
# max abs error against PyTorch fp32, per component; the round trip (this backend's encoder feeding its decoder)
# compounds both, so it gets cvvae.export.verify.FP16_END_TO_END's 3e-2 + 2e-2 * max|pixels| (pixels in [-1, 1]).
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}  # max abs error against PyTorch fp32
ROUND_TRIP = {"fp32": 1e-3, "fp16": 5e-2}
# int8 error is not bounded elementwise: it is judged by PSNR against PyTorch fp32 (component, round trip); its
# accuracy contract is the PSNR drop against the input frames that `cvvae calibrate` measures and records
INT8_PSNR_FLOOR = {"component": 30.0, "round_trip": 20.0}


def read(path, default):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write(path, data):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stat(path):
    s = Path(path).stat()
    return [s.st_size, s.st_mtime_ns]


def cvvae_version():
    import importlib.metadata as md
    try:
        return md.version("cvvae-deploy")
    except md.PackageNotFoundError:
        return "unknown"


def graph_files(export_dir, manifest):
    return sorted(f[k] for c in manifest["components"].values() for f in c["files"].values()
                  for k in ("path", "data_path") if f.get(k))


cmd, args = sys.argv[1], sys.argv[2:]
state = read(STATE, {})

if cmd == "default-model":  # prints the built-in default model's folder, or nothing
    from cvvae.loading import DEFAULT_MODEL_DIR
    print(DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").exists() else "")

elif cmd == "model-id":  # the checkpoint's sha256 (what the export manifest records), or random:PRESET
    spec = args[0]
    if spec.startswith("random:"):
        print(spec)
    else:
        import logging
        logging.disable(logging.WARNING)
        from cvvae.loading import load_model
        print(load_model(spec).checkpoint_info.sha256)

elif cmd == "export-current":  # export_dir model_id precision...; exit 0 when current, else print why
    export_dir, model_id, precisions = Path(args[0]), args[1], args[2:]
    m = read(export_dir / "manifest.json", None)
    if m is None:
        print("no export yet"); sys.exit(1)
    why = []
    ckpt = m.get("checkpoint", {})
    made_from = ckpt.get("sha256") or ckpt.get("source")
    if made_from != model_id:
        why.append(f"exported from {made_from}, the model is {model_id}")
    if m.get("tool_versions", {}).get("cvvae") != cvvae_version():
        why.append(f"exported by cvvae {m.get('tool_versions', {}).get('cvvae')}, this is {cvvae_version()}")
    for p in precisions:
        missing = [c for c, e in m["components"].items() if p not in e["files"]]
        if missing:
            why.append(f"no {p} graph for {', '.join(missing)}")
    rec = state.get("export", {})
    if rec.get("manifest_sha256") != sha(export_dir / "manifest.json"):
        why.append("manifest not recorded by build.sh (or changed since)")
    else:
        changed = [f for f in graph_files(export_dir, m)
                   if not (export_dir / f).exists() or stat(export_dir / f) != rec.get("files", {}).get(f)]
        if changed:
            why.append(f"graph files changed since the export: {', '.join(changed)}")
    if why:
        print("; ".join(why)); sys.exit(1)
    print(f"current (checkpoint {model_id[:16]}, cvvae {cvvae_version()})")

elif cmd == "export-record":  # export_dir
    export_dir = Path(args[0])
    m = read(export_dir / "manifest.json", {})
    state["export"] = {"manifest_sha256": sha(export_dir / "manifest.json"), "recorded": time.time(),
                       "files": {f: stat(export_dir / f) for f in graph_files(export_dir, m)}}
    write(STATE, state)

elif cmd == "key":  # name, then words and paths: prints "current" when the recorded key for name matches
    name, parts = args[0], args[1:]
    h = hashlib.sha256(f"{name} {cvvae_version()}".encode())
    for part in parts:
        p = Path(part)
        h.update(part.encode())
        if p.is_file():
            h.update(json.dumps(stat(p)).encode() if p.stat().st_size > 1 << 26 else sha(p).encode())
        elif p.is_dir():
            for f in sorted(x for x in p.iterdir() if x.name.endswith((".json", ".plan"))):
                h.update(f.name.encode() + json.dumps(stat(f)).encode())
    key = h.hexdigest()
    print("current" if state.get("keys", {}).get(name) == key else key)

elif cmd == "key-record":  # name key
    state.setdefault("keys", {})[args[0]] = args[1]
    write(STATE, state)

elif cmd == "step":  # name status seconds detail
    run = read(RUN, {"steps": [], "parity": []})
    run["steps"].append({"step": args[0], "status": args[1], "seconds": args[2], "detail": " ".join(args[3:])})
    write(RUN, run)

elif cmd == "parity":  # result.json backend precision: rows into the run, exit 1 when any row is over tolerance
    rows = read(args[0], [])
    backend, precision = args[1], args[2]
    run = read(RUN, {"steps": [], "parity": []})
    bad = 0
    for r in rows:
        kind = "round_trip" if "round_trip" in r["name"] else "component"
        if precision == "int8":
            tol = f">={INT8_PSNR_FLOOR[kind]:g}dB"
            ok = r["psnr"] >= INT8_PSNR_FLOOR[kind]
        else:
            tol = f"{(ROUND_TRIP if kind == 'round_trip' else TOLERANCE)[precision]:.0e}"
            ok = r["max_abs"] <= float(tol)
        bad += not ok
        run["parity"].append({"backend": backend, "precision": precision, "output": r["name"].split("/", 1)[-1],
                              "max_abs": r["max_abs"], "mean_abs": r["mean_abs"], "psnr": r["psnr"],
                              "tolerance": tol, "ok": ok})
    write(RUN, run)
    sys.exit(1 if bad or not rows else 0)

elif cmd == "reset":
    write(RUN, {"steps": [], "parity": []})

elif cmd == "summary":
    run = read(RUN, {"steps": [], "parity": []})
    print(f"\n== build.sh summary: {OUT} ==")
    print(f"{'step':<10} {'status':<15} {'seconds':>8}  detail")
    for s in run["steps"]:
        print(f"{s['step']:<10} {s['status']:<15} {s['seconds']:>8}  {s['detail']}")
    if run["parity"]:
        print("\nparity against PyTorch fp32 on the same clip and plan (status: max abs <= tolerance; int8: PSNR)")
        print(f"{'backend':<12} {'prec':<5} {'output':<18} {'max abs':>10} {'mean abs':>10} {'PSNR dB':>8} "
              f"{'tolerance':>9}  status")
        for r in run["parity"]:
            psnr = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}"
            print(f"{r['backend']:<12} {r['precision']:<5} {r['output']:<18} {r['max_abs']:>10.3e} "
                  f"{r['mean_abs']:>10.3e} {psnr:>8} {r['tolerance']:>9}  {'ok' if r['ok'] else 'FAIL'}")
    failed = [s["step"] for s in run["steps"] if s["status"].startswith("FAIL")]
    print(f"\nresult: {'FAILED (' + ', '.join(failed) + ')' if failed else 'ok'}")
PYEOF

helper() { "$PY" "$HELPER" "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "[build.sh] $*" >&2; }
FAILED=0
helper reset

# ----- model ------------------------------------------------------------------------------------------------------------
if [[ -z "$MODEL" ]]; then
    DEFAULT="$(helper default-model)"
    if [[ -n "$DEFAULT" ]]; then
        MODEL="$DEFAULT"
        helper step model "default" - "$MODEL (the built-in default model)"
    else
        MODEL="random:tiny-v1"
        say "no built-in default model (cvvae/weights/default); using $MODEL: random weights, so parity checks the pipeline, not quality"
        helper step model "fallback" - "$MODEL (no built-in default model in cvvae/weights/default)"
    fi
else
    helper step model "given" - "$MODEL"
fi

# ----- 1. export ----------------------------------------------------------------------------------------------------------
t0=$(now)
EXPORTED=0
MODEL_ID="$(helper model-id "$MODEL")" || { say "cannot load $MODEL"; MODEL_ID=""; }
PRECISIONS="fp32"; [[ "$PRECISION" != fp32 ]] && PRECISIONS="fp32,$PRECISION"
if [[ -z "$MODEL_ID" ]]; then
    helper step export "FAILED" - "cannot load the model $MODEL"; FAILED=1
elif [[ $FORCE == 0 ]] && why="$(helper export-current "$EXPORT_DIR" "$MODEL_ID" ${PRECISIONS//,/ })"; then
    say "export: $why; skipped"
    helper step export "skipped" - "$EXPORT_DIR is $why"
else
    [[ $FORCE == 1 ]] && why="--force"
    say "export: ${why:-no export yet}; exporting $MODEL ($PRECISIONS)"
    FORCE_ARG=(); [[ -e "$EXPORT_DIR" ]] && FORCE_ARG=(--force)
    if "$PY" "$REPO/export/to_onnx.py" --model "$MODEL" --out "$EXPORT_DIR" --precisions "$PRECISIONS" \
            "${FORCE_ARG[@]}" >"$LOGS/export.log" 2>&1; then
        helper export-record "$EXPORT_DIR"
        EXPORTED=1
        helper step export "done" "$(elapsed "$t0")" "$EXPORT_DIR ($PRECISIONS, verified in ONNX Runtime)"
    else
        tail -n 5 "$LOGS/export.log" >&2
        helper step export "FAILED" "$(elapsed "$t0")" "see $LOGS/export.log"; FAILED=1
    fi
fi
HAVE_EXPORT=0; [[ -f "$EXPORT_DIR/manifest.json" ]] && HAVE_EXPORT=1

if [[ -z "$CLIP" ]]; then
    CLIP="$(ls "$REPO"/../shared/data/videos/*.mp4 2>/dev/null | head -n 1 || true)"
fi

# ----- 2. INT8 calibration ------------------------------------------------------------------------------------------------
if [[ $INT8 == 0 ]]; then
    helper step int8 "not asked" - "pass --int8 to calibrate"
elif ! "${CVVAE[@]}" calibrate --help >/dev/null 2>&1; then
    say "INT8 calibration is not available: this install has no \`cvvae calibrate\` command"
    helper step int8 "not available" - "no \`cvvae calibrate\` command in this install"
elif [[ $HAVE_EXPORT == 0 ]]; then
    helper step int8 "FAILED" - "no export to calibrate"; FAILED=1
elif [[ -z "$CLIP" ]]; then
    helper step int8 "FAILED" - "no clip to calibrate on: pass --clip VIDEO"; FAILED=1
else
    t0=$(now)
    # calibration writes a copy of the export with int8 (QDQ) graphs added; later steps use that copy
    INT8_DIR="$OUT/export-int8"
    if [[ $FORCE == 0 && -f "$INT8_DIR/manifest.json" ]] \
            && "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); sys.exit(0 if m['checkpoint']==json.load(open(sys.argv[2]))['checkpoint'] else 1)" \
               "$INT8_DIR/manifest.json" "$EXPORT_DIR/manifest.json"; then
        EXPORT_DIR="$INT8_DIR"
        helper step int8 "skipped" - "$INT8_DIR is current"
    elif "${CVVAE[@]}" calibrate --export "$EXPORT_DIR" --data "$CLIP" -o "$INT8_DIR" --force \
            >"$LOGS/calibrate.log" 2>&1; then
        EXPORT_DIR="$INT8_DIR"
        helper step int8 "done" "$(elapsed "$t0")" "int8 graphs in $INT8_DIR"
    else
        tail -n 5 "$LOGS/calibrate.log" >&2
        helper step int8 "FAILED" "$(elapsed "$t0")" "see $LOGS/calibrate.log"; FAILED=1
    fi
fi

# ----- 3. TensorRT engines ------------------------------------------------------------------------------------------------
TRT_STATUS="$("$PY" - <<'PYEOF'
import importlib.util
if importlib.util.find_spec("tensorrt") is None:
    print("TensorRT is not installed")
else:
    import torch
    print("ok" if torch.cuda.is_available() else "TensorRT is installed but no CUDA GPU is visible")
PYEOF
)"
HAVE_ENGINES=0
ENGINE_PRECISIONS="$PRECISION"; [[ $INT8 == 1 ]] && grep -q '"int8"' "$EXPORT_DIR/manifest.json" 2>/dev/null \
    && ENGINE_PRECISIONS="$PRECISION int8"
if [[ $HAVE_EXPORT == 0 ]]; then
    helper step engines "FAILED" - "no export to build from"; FAILED=1
elif [[ "$TRT_STATUS" != ok ]]; then
    TRTEXEC="$OUT/trtexec.$PRECISION.sh"
    REBUILD=(); [[ $FORCE == 1 || $EXPORTED == 1 ]] && REBUILD=(--rebuild)
    # the trtexec lines, and the sidecars in $ENGINE_DIR that let the tensorrt backend load what they build
    if "${CVVAE[@]}" build-engines --export "$EXPORT_DIR" --out "$ENGINE_DIR" --precision "$PRECISION" \
            --print-trtexec "${REBUILD[@]}" >"$TRTEXEC" 2>"$LOGS/engines.log"; then
        say "engines: $TRT_STATUS; not building them (trtexec lines: $TRTEXEC; sidecars in $ENGINE_DIR)"
        helper step engines "not available" - "$TRT_STATUS; trtexec lines in $TRTEXEC"
    else
        tail -n 8 "$LOGS/engines.log" >&2
        helper step engines "FAILED" - "trtexec sidecars: see $LOGS/engines.log"; FAILED=1
    fi
else
    for p in $ENGINE_PRECISIONS; do
        t0=$(now)
        REBUILD=(); [[ $FORCE == 1 || $EXPORTED == 1 ]] && REBUILD=(--rebuild)
        if "${CVVAE[@]}" build-engines --export "$EXPORT_DIR" --out "$ENGINE_DIR" --precision "$p" "${REBUILD[@]}" \
                --json >"$OUT/engines.$p.json" 2>"$LOGS/engines.$p.log"; then
            HAVE_ENGINES=1
            status="$("$PY" -c "import json,sys; s={r['status'] for r in json.load(open(sys.argv[1]))}; print('skipped' if s=={'current'} else 'done')" "$OUT/engines.$p.json")"
            helper step "engines" "$status" "$(elapsed "$t0")" "$ENGINE_DIR ($p)"
        else
            tail -n 8 "$LOGS/engines.$p.log" >&2
            helper step engines "FAILED" "$(elapsed "$t0")" "$p: see $LOGS/engines.$p.log"; FAILED=1
        fi
    done
fi

# ----- 4. parity against PyTorch ------------------------------------------------------------------------------------------
run_parity() {  # backend precision model device: the model dir's manifest (and sidecars) key the result
    local backend="$1" precision="$2" model="$3" device="$4" t0 key name="$1-$2"
    local result="$OUT/parity/$name.json"
    t0=$(now)
    key="$(helper key "parity-$name" "$CLIP" "$FRAMES" "$SIZE" "$device" "$EXPORT_DIR/manifest.json" "$model")"
    if [[ "$key" == current && -f "$result" && $FORCE == 0 ]]; then
        say "parity $name: inputs unchanged; skipped"
        helper step parity "skipped" - "$name: $result is current"
    elif "${CVVAE[@]}" parity "$CLIP" --model "$model" --backends "torch,$backend" --precision "$precision" \
            --device "$device" --max-frames "$FRAMES" --size "$SIZE" --json >"$result.tmp" 2>"$LOGS/parity-$name.log"; then
        mv "$result.tmp" "$result"
        helper key-record "parity-$name" "$key"
        helper step parity "done" "$(elapsed "$t0")" "$name on $(basename "$CLIP"), $FRAMES frames at $SIZE"
    else
        rm -f "$result.tmp" "$result"
        tail -n 3 "$LOGS/parity-$name.log" >&2
        helper step parity "FAILED" "$(elapsed "$t0")" "$name: $(tail -n 1 "$LOGS/parity-$name.log" | cut -c1-150)"
        FAILED=1
        return
    fi
    helper parity "$result" "$backend" "$precision" || {
        helper step parity "FAILED" - "$name: error above tolerance (table below)"; FAILED=1; }
}
if [[ -z "$CLIP" || ! -f "$CLIP" ]]; then
    helper step parity "not available" - "no clip (pass --clip VIDEO; looked in ../shared/data/videos)"
elif [[ $HAVE_EXPORT == 0 ]]; then
    helper step parity "FAILED" - "no export to compare"; FAILED=1
else
    run_parity onnxruntime fp32 "$EXPORT_DIR" cpu
    [[ "$PRECISION" != fp32 ]] && run_parity onnxruntime "$PRECISION" "$EXPORT_DIR" cpu
    [[ $INT8 == 1 && -f "$EXPORT_DIR/calibration.json" ]] && run_parity onnxruntime int8 "$EXPORT_DIR" cpu
    if [[ $HAVE_ENGINES == 1 ]]; then
        for p in $ENGINE_PRECISIONS; do run_parity tensorrt "$p" "$ENGINE_DIR" cuda; done
    else
        helper step parity "not available" - "tensorrt: no engines here ($TRT_STATUS)"
    fi
fi

# ----- 5. summary ---------------------------------------------------------------------------------------------------------
helper summary
exit $FAILED
