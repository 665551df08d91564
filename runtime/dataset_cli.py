"""Dataset commands: ``cvvae encode-dataset``, ``decode-dataset`` and ``dataset-stats``.

Thin click commands over :mod:`cvvae.runtime.dataset` (layout, resume rules and executors are described there and
in docs/dataset-encoding.md). Ray is imported only when ``--executor ray`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cvvae.cli import DeviceParam, handle_errors, plan_overrides, positive_size
from cvvae.runtime.cli import load_runtime, progress_bar, runtime_options
from cvvae.runtime import dataset as ds
from cvvae.runtime.dataset import ClipPolicy, DatasetError, EncoderSpec, RayOptions


def _model_arg(model_path: str | None) -> str | None:
    """Absolute path for a local checkpoint, so Ray workers with another working directory find it."""
    if model_path and Path(model_path).exists():
        return str(Path(model_path).resolve())
    return model_path


@click.command("encode-dataset")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output folder: shards/, index.json, errors.jsonl. Rerunning the same command resumes it.")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="ray: Ray Data (decode tasks + encoder actor pool); local: this process only.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="auto (the cluster of this node), HOST:6379 or ray://HOST:10001. Default: start a local Ray "
                   "instance sized to this machine (RAY_ADDRESS is honoured).")
@click.option("--ray-runtime-env", default=None, metavar="JSON",
              help="Ray runtime_env (JSON) for the workers, e.g. a pip list with the cvvae-deploy wheel; see "
                   "docs/dataset-encoding.md.")
@click.option("--encoders", type=int, default=None,
              help="Encoder actors (one model each). Default: one per GPU, else CPUs - 1 (one CPU decodes).")
@click.option("--clip-frames", type=int, default=17, show_default=True, help="Frames per clip (1+4k).")
@click.option("--clip-stride", type=int, default=1, show_default=True, help="Take every N-th source frame.")
@click.option("--clip-step", type=int, default=None,
              help="Source frames between clip starts. Default: back to back (no overlap, no gap).")
@click.option("--max-clips-per-video", type=int, default=None, help="Spread at most N clips over each video.")
@click.option("--size", "sizes", multiple=True, metavar="HxW",
              help="Size bucket; repeat for several (each video takes the nearest aspect ratio). Default: source size.")
@click.option("--resize", type=click.Choice(["cover", "stretch"]), default="cover", show_default=True,
              help="cover: scale to cover the bucket and centre-crop; stretch: resize to it exactly.")
@click.option("--clips-per-shard", type=int, default=64, show_default=True)
@click.option("--latents", type=click.Choice(["moments", "sample"]), default="moments", show_default=True,
              help="moments: mean + logvar; sample: one draw per clip (its seed is recorded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --latents sample.")
@click.option("--verify", type=click.Choice(["sha256", "size"]), default="sha256", show_default=True,
              help="How finished shards are checked before they are skipped.")
@click.option("--max-encode-errors", type=int, default=16, show_default=True,
              help="Stop after this many clips failed to encode (decode failures never stop the job).")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@runtime_options
@handle_errors
def encode_dataset(inputs, output, executor, ray_address, ray_runtime_env, encoders, clip_frames, clip_stride,
                   clip_step, max_clips_per_video, sizes, resize, clips_per_shard, latents, seed, verify,
                   max_encode_errors, as_json, model_path, backend, device, precision, batch_tiles, preset,
                   **plan_kw) -> None:
    """Encode the clips of INPUTS (directory, glob, path list, CSV/Parquet manifest) into latent shards."""
    if executor == "local" and (ray_address or ray_runtime_env or (encoders or 1) > 1):
        raise click.UsageError("--ray-address, --ray-runtime-env and --encoders > 1 need --executor ray")
    try:
        runtime_env = json.loads(ray_runtime_env) if ray_runtime_env else None
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--ray-runtime-env") from None
    policy = ClipPolicy(clip_frames, clip_stride, clip_step, max_clips_per_video,
                        tuple(positive_size(s, "--size") for s in sizes), resize)
    spec = EncoderSpec(_model_arg(model_path), backend, device, precision, batch_tiles, preset,
                       plan_overrides(**plan_kw), latents, seed)
    with progress_bar("encode-dataset", None) as update:
        report = ds.encode_dataset(list(inputs), output, policy=policy, encoder=spec,
                                   clips_per_shard=clips_per_shard, executor=executor,
                                   ray=RayOptions(ray_address, runtime_env, encoders), verify=verify,
                                   max_encode_errors=max_encode_errors, on_progress=update)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(f"{output}: shards {report.shards_written} written, {report.shards_skipped} already complete, "
                   f"{report.shards_failed} failed, of {report.shards_total}")
        click.echo(f"encoded {report.clips_encoded} clips ({report.frames_encoded} frames) in "
                   f"{report.encode_wall_s:.1f} s with {report.encoders} {report.executor} encoder(s) on "
                   f"{report.device}: {report.clips_per_s:.2f} clips/s, {report.frames_per_s:.1f} frames/s "
                   f"(plan {report.plan_s:.1f} s)")
        if report.clip_errors or report.videos_skipped:
            click.echo(f"skipped: {report.videos_skipped} videos, {report.clip_errors} clips; "
                       f"see {output / 'errors.jsonl'}")
    if report.shards_failed:
        raise DatasetError(f"{report.shards_failed} shards had clips that failed to encode (see "
                           f"{output / 'errors.jsonl'}); rerun the same command to retry them")


for _param in encode_dataset.params:  # the shared runtime options default to cpu; a dataset job looks at the cluster
    if _param.name == "device":
        _param.default = "auto"
        _param.type = DeviceParam(tensorrt=True, auto=True)
        _param.help = "auto (cuda when the Ray cluster or this machine has GPUs), cpu, cuda[:N]."


@click.command("decode-dataset")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Folder for shard-ID/POS-CLIPID.mp4 (or PNG folders with --format png).")
@click.option("--shard", "shards", multiple=True, help="Only this shard id (repeatable), e.g. 000003.")
@click.option("--limit", type=int, default=None, help="At most N clips.")
@click.option("--format", "fmt", type=click.Choice(["mp4", "png"]), default="mp4", show_default=True)
@click.option("--crf", type=int, default=18, show_default=True, help="H.264 quality (lower is better).")
@click.option("--force", is_flag=True, help="Overwrite existing clips.")
@runtime_options
@handle_errors
def decode_dataset(dataset, output, shards, limit, fmt, crf, force, model_path, backend, device, precision,
                   batch_tiles, preset, **plan_kw) -> None:
    """Decode the clips of an encode-dataset folder back to videos (for evaluation)."""
    vae = load_runtime(model_path, backend, device, precision, batch_tiles, preset, **plan_kw)
    count = {"clips": 0, "frames": 0}
    with progress_bar("decode-dataset", None) as update:
        def on_clip(path: Path, frames: int) -> None:
            count["clips"] += 1
            count["frames"] += frames
            update(count["frames"], None)

        ds.decode_dataset(dataset, output, vae, shards=shards or None, limit=limit, fmt=fmt, crf=crf,
                          overwrite=force, on_clip=on_clip)
    click.echo(f"{dataset} -> {output}: {count['clips']} clips, {count['frames']} frames")


@click.command("dataset-stats")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def dataset_stats(dataset: Path, as_json: bool) -> None:
    """Counts, frames, throughput and errors of an encode-dataset folder."""
    stats = ds.dataset_stats(dataset)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    model = stats["model"] or {}
    sh, cl, fr = stats["shards"], stats["clips"], stats["frames"]
    click.echo(f"folder     {stats['folder']}")
    click.echo(f"model      {model.get('model_source')} (sha256 {str(model.get('model_sha256'))[:12]}, "
               f"scaling {model.get('scaling_factor')}), latents: {stats['latents']}")
    click.echo(f"videos     {stats['videos']} ({stats['videos_skipped']} gave no clips)")
    click.echo(f"shards     {sh['complete']}/{sh['total']} complete, {sh['pending']} pending")
    click.echo(f"clips      {cl['encoded']}/{cl['planned']} encoded, {cl['errors']} failed to decode")
    click.echo(f"frames     {fr['encoded']}/{fr['planned']}; {stats['bytes'] / 2**20:.1f} MiB of latents")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(stats["errors_by_kind"].items())) or "none"
    click.echo(f"errors     {errors}")
    for run in stats["runs"]:
        click.echo(f"run        {run['started_at']} {run['status']}: {run['executor']} x{run['encoders']} on "
                   f"{run['device']}, {run['clips_encoded']} clips / {run['frames_encoded']} frames in "
                   f"{run['encode_wall_s'] or 0:.1f} s = {run['frames_per_s'] or 0:.1f} frames/s")
