"""``cvvae deploy``: the click command over :mod:`cvvae.tools.deploy` (``./build.sh`` calls it)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cvvae.cli import handle_errors, positive_size


@click.command("deploy")
@click.option("--model", "model", default=None, metavar="PATH|random:PRESET",
              help="Checkpoint to deploy (default: the built-in default model, else random:tiny-v1).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
              help="Artifacts folder (export/, engines/, parity/, logs/, the summary).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp16", show_default=True,
              help="Precision of the graphs and engines besides fp32 (int8 comes from --int8).")
@click.option("--int8", is_flag=True, help="Calibrate INT8 graphs on the clip (cvvae calibrate).")
@click.option("--clip", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Real clip for calibration and parity (default: the first of ../shared/data/videos).")
@click.option("--frames", type=click.IntRange(min=1), default=9, show_default=True, help="Parity frames.")
@click.option("--size", default="64x96", show_default=True, help="Parity frame size HxW.")
@click.option("--force", is_flag=True, help="Re-run every step (replaces only what cvvae wrote).")
@click.option("--json", "as_json", is_flag=True, help="Print the run's record (deploy.json) instead of the summary.")
@handle_errors
def deploy(model, out, precision, int8, clip, frames, size, force, as_json) -> None:
    """Export -> verify -> INT8 (--int8) -> TensorRT engines (or trtexec lines) -> parity -> summary, skipping steps
    whose outputs are current; exit 1 when a step fails."""
    from cvvae.errors import DeployError
    from cvvae.tools.deploy import DeployConfig
    from cvvae.tools.deploy import deploy as run

    if clip is not None and not clip.is_file():
        raise click.BadParameter(f"{clip} does not exist", param_hint="--clip")
    config = DeployConfig(out=out, model=model, precision=precision, int8=int8, clip=clip, frames=frames,
                          size=positive_size(size, "--size"), force=force)
    try:
        result = run(config)
    except DeployError as e:
        click.echo(e.result.summary(), err=True)
        raise
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else result.summary())
