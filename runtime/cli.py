"""Runtime commands: ``cvvae encode``, ``decode``, ``reconstruct``, ``parity`` and ``doctor``.

Encode/decode take tensors (``.npy`` pixels in [-1,1], ``.safetensors``/``.npy`` latents) or videos (any file
ffmpeg reads in; ``.mp4``/``.mkv``/``.mov``/``.webm`` or a PNG-frame folder out). Every command runs through
:class:`cvvae.runtime.VideoVAE`, so every backend executes the same chunk/tile plan.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from ..cli import handle_errors, plan_options, plan_overrides
from ..errors import InputError
from ..codec_io import read_pixels, save_npy
from ..fsutil import check_writable_target
from ..latent_io import load_latents
from ..arrays import to_numpy
from .api import Latents, VideoVAE
from .video_io import VideoWriter, output_kind, probe_video, tensor_to_frames

TENSOR_SUFFIXES = (".npy", ".safetensors")


def runtime_options(fn):
    """--model / --backend / --device / --precision / --batch-tiles."""
    options = [
        click.option("--model", "model_path", default=None, metavar="PATH",
                     help="Checkpoint (torch), export dir (onnxruntime) or engine dir (tensorrt); random:PRESET for "
                          "random weights. Default: the built-in default model."),
        click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None,
                     help="Default: torch where PyTorch is installed, else onnxruntime (the base install)."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda[:N] (tensorrt[:N] for ORT's TRT EP)."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32",
                     show_default=True),
        click.option("--batch-tiles", is_flag=True, help="Run equal-shape tiles in one batched call (exact)."),
        click.option("--preset", default=None, help="Architecture preset for a bare weights file (torch backend)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return plan_options(fn)


def video_read_options(fn):
    options = [
        click.option("--start", type=int, default=0, help="First source frame."),
        click.option("--end", type=int, default=None, help="Stop before this source frame."),
        click.option("--stride", type=int, default=1, help="Take every N-th frame."),
        click.option("--max-frames", type=int, default=None),
        click.option("--size", default=None, metavar="HxW", help="Resize to exactly HxW."),
        click.option("--resize-short-side", type=int, default=None, help="Resize keeping aspect ratio."),
        click.option("--center-crop", default=None, metavar="HxW", help="Centre crop after resizing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def parse_hw(value: str | None, option: str) -> tuple[int, int] | None:
    """``"256x448"`` -> ``(256, 448)`` (None stays None); a bad value is a usage error naming ``option``."""
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 256x448, got {value!r}", param_hint=option) from None
    return h, w


def read_kwargs(start, end, stride, max_frames, size, resize_short_side, center_crop) -> dict[str, Any]:
    kw: dict[str, Any] = {"start": start, "end": end, "stride": stride, "max_frames": max_frames,
                          "size": parse_hw(size, "--size"), "resize_short_side": resize_short_side,
                          "center_crop": parse_hw(center_crop, "--center-crop")}
    return {k: v for k, v in kw.items() if v is not None}


def load_runtime(model_path, backend, device, precision, batch_tiles, preset=None, **plan_kw) -> VideoVAE:
    extra = {"preset": preset} if preset else {}
    return VideoVAE.load(model_path, backend=backend, device=device, precision=precision, batch_tiles=batch_tiles,
                         plan_overrides=plan_overrides(**plan_kw), **extra)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Any]:
    """A rich progress bar (frames, fps, ETA) on stderr; the callback takes (frames done, total)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
               TextColumn("{task.fields[fps]:.1f} fps"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, fps=0.0)
        t0 = time.perf_counter()

        def update(done: int, total_now: int | None) -> None:
            elapsed = max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=done, total=total_now or total, fps=done / elapsed)

        yield update
        elapsed = time.perf_counter() - t0
        done = int(progress.tasks[0].completed)
    click.echo(f"{description}: {done} frames in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.2f} fps)", err=True)


def encode_input(vae: VideoVAE, path: Path, rkw: dict[str, Any]) -> tuple[Latents, bool]:
    """Latents of a .npy pixel file or a video file; second value: whether the .npy input was unbatched."""
    if path.suffix == ".npy":
        x = read_pixels(path)
        with progress_bar("encode", x.shape[-3]) as update:
            return vae.encode(x, on_progress=update), x.ndim == 4
    total = probe_video(path).num_frames
    with progress_bar("encode", total) as update:
        return vae.encode_video(path, on_progress=update, **rkw), False


def write_frames(vae: VideoVAE, latents: Latents, output: Path, *, fps: float, crf: int, force: bool,
                 side_by_side: Iterator[np.ndarray] | None = None) -> int:
    """Decode chunk by chunk straight into a video writer; returns the frame count."""
    written = 0
    with progress_bar("decode", latents.num_frames) as update, \
            VideoWriter(output, fps, crf=crf, overwrite=force) as writer:
        for pixels in vae.decode_stream(latents, on_progress=update):
            for b in range(pixels.shape[0]):
                frames = tensor_to_frames(pixels[b])
                if side_by_side is not None:
                    originals = np.stack([next(side_by_side) for _ in range(frames.shape[0])])
                    frames = np.concatenate([originals, frames], axis=2)
                writer.write(frames)
            written += pixels.shape[2]
    return written


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Latents: .safetensors (mean, logvar, metadata) or .npy (mean).")
@runtime_options
@video_read_options
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def encode(input_path: Path, output: Path, model_path, backend, device, precision, batch_tiles, preset, chunk_frames,
           tile_size, tile_overlap, no_tiling, no_chunking, start, end, stride, max_frames, size, resize_short_side,
           center_crop, force) -> None:
    """Encode a video file or .npy pixels to latents."""
    if output.suffix not in TENSOR_SUFFIXES:
        raise InputError(f"output {output} must end in .safetensors or .npy")
    check_writable_target(output, overwrite=force)
    vae = load_runtime(model_path, backend, device, precision, batch_tiles, preset, chunk_frames=chunk_frames,
                       tile_size=tile_size, tile_overlap=tile_overlap, no_tiling=no_tiling, no_chunking=no_chunking)
    latents, unbatched = encode_input(vae, input_path,
                                      read_kwargs(start, end, stride, max_frames, size, resize_short_side, center_crop))
    if output.suffix == ".npy":  # mirrors the input's batching; .safetensors is always batched
        save_npy(output, to_numpy(latents.mean[0] if unbatched else latents.mean), overwrite=force)
    else:
        latents.save(output, overwrite=force)
    click.echo(f"{input_path} -> {output}: latent {tuple(latents.mean.shape)} for {latents.num_frames} frames "
               f"of {latents.height}x{latents.width}")


@click.command()
@click.argument("input_path", metavar="LATENTS", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Video (.mp4/.mkv/.mov/.webm), a folder of PNG frames (no suffix), or .npy pixels.")
@runtime_options
@click.option("--fps", type=float, default=None, help="Frame rate (default: the encoded video's, else 30).")
@click.option("--crf", type=int, default=18, show_default=True, help="H.264 quality (lower is better).")
@click.option("--ignore-model-mismatch", is_flag=True, help="Decode latents made by another checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def decode(input_path: Path, output: Path, model_path, backend, device, precision, batch_tiles, preset, chunk_frames,
           tile_size, tile_overlap, no_tiling, no_chunking, fps, crf, ignore_model_mismatch, force) -> None:
    """Decode latents to a video, PNG frames or .npy pixels."""
    if output.suffix == ".safetensors":
        raise InputError(f"decode writes a video, a PNG folder or .npy pixels, not {output}")
    check_writable_target(output, overwrite=force, kind="file" if output.suffix == ".npy" else output_kind(output))
    raw = load_latents(input_path)
    unbatched = raw.mean.ndim == 4  # (z, L, h, w), as encode writes for unbatched .npy pixels
    latents = Latents.from_file(raw)
    vae = load_runtime(model_path, backend, device, precision, batch_tiles, preset, chunk_frames=chunk_frames,
                       tile_size=tile_size, tile_overlap=tile_overlap, no_tiling=no_tiling, no_chunking=no_chunking)
    if output.suffix == ".npy":
        with progress_bar("decode", latents.num_frames) as update:
            pixels = vae.decode(latents, on_progress=update, check_model=not ignore_model_mismatch)
        save_npy(output, to_numpy(pixels[0] if unbatched else pixels), overwrite=force)
        n = pixels.shape[2]
    else:
        if ignore_model_mismatch:
            latents.metadata.pop("model_sha256", None)
        n = write_frames(vae, latents, output, fps=fps or latents.metadata.get("fps") or 30.0, crf=crf, force=force)
    click.echo(f"{input_path} -> {output}: {n} frames of {latents.height}x{latents.width}")


@click.command()
@click.argument("video", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output video (.mp4, ...).")
@runtime_options
@video_read_options
@click.option("--side-by-side", is_flag=True, help="Write the input left and the reconstruction right.")
@click.option("--crf", type=int, default=18, show_default=True)
@click.option("--save-latents", type=click.Path(path_type=Path), default=None, help="Also keep the latents here.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def reconstruct(video: Path, output: Path, model_path, backend, device, precision, batch_tiles, preset, chunk_frames,
                tile_size, tile_overlap, no_tiling, no_chunking, start, end, stride, max_frames, size,
                resize_short_side, center_crop, side_by_side, crf, save_latents, force) -> None:
    """Encode and decode a video: same frame count, size and fps as the input."""
    from .video_io import iter_video_frames

    check_writable_target(output, overwrite=force, kind=output_kind(output))
    if save_latents:
        check_writable_target(save_latents, overwrite=force)
    rkw = read_kwargs(start, end, stride, max_frames, size, resize_short_side, center_crop)
    vae = load_runtime(model_path, backend, device, precision, batch_tiles, preset, chunk_frames=chunk_frames,
                       tile_size=tile_size, tile_overlap=tile_overlap, no_tiling=no_tiling, no_chunking=no_chunking)
    latents, _ = encode_input(vae, video, rkw)
    if save_latents:
        latents.save(save_latents, overwrite=force)
    originals = None
    if side_by_side:
        originals = (frame for chunk in iter_video_frames(video, chunk_size=16, **rkw) for frame in chunk)
    n = write_frames(vae, latents, output, fps=latents.metadata["fps"], crf=crf, force=force,
                     side_by_side=originals)
    click.echo(f"{video} -> {output}: {n} frames of {latents.height}x{latents.width} at "
               f"{latents.metadata['fps']:.3f} fps")


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--model", "model_path", default=None, help="Checkpoint (or export dir, whose checkpoint is used).")
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="Comma list; the first is the reference.")
@click.option("--precision", default="fp32", show_default=True, help="Precision of the non-reference backends.")
@click.option("--device", default="cpu", show_default=True)
@video_read_options
@plan_options
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def parity(input_path: Path, model_path, backends, precision, device, start, end, stride, max_frames, size,
           resize_short_side, center_crop, as_json, **plan_kw) -> None:
    """Per-component error table (max abs, mean abs, PSNR) between backends on the same input and plan."""
    from ..compare import format_table
    from ..tools.parity import run_parity

    rkw = read_kwargs(start, end, stride, max_frames, size, resize_short_side, center_crop)
    rows = run_parity(input_path, model_path, backends.split(","), precision=precision, device=device,
                      read_kwargs=rkw, plan_overrides=plan_overrides(**plan_kw))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        click.echo(format_table(rows))


@click.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Installed backends, execution providers, GPUs, codecs and versions."""
    from .doctor import collect

    report = collect()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for section, values in report.items():
        click.echo(f"{section}:")
        for key, value in values.items():
            click.echo(f"  {key:<22} {value}")
