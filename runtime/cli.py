"""Runtime commands: ``cvvae encode``, ``decode``, ``reconstruct``, ``parity`` and ``doctor``.

Encode/decode take tensors (``.npy`` pixels in [-1,1], ``.safetensors``/``.npy`` latents) or videos (any file
ffmpeg reads in; ``.mp4``/``.mkv``/``.mov``/``.webm`` or a PNG-frame folder out). Every command runs through
:class:`cvvae.runtime.VideoVAE`, so every backend executes the same chunk/tile plan.

Options and output suffixes are checked before any work starts (a usage error, exit status 2); a latent batch of
B > 1 decodes to B videos ``NAME_0.mp4`` ... (issue 13, items 7, 8 and 11).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from ..cli import DeviceParam, handle_errors, plan_options, plan_overrides, positive_size
from ..errors import InputError
from ..codec_io import read_pixels, save_npy
from ..fsutil import check_writable_target
from ..latent_io import load_latents
from ..arrays import to_numpy
from ..errors import PlanError
from .api import Latents, VideoVAE
from ..video_io import VIDEO_CONTAINERS, VideoWriter, output_kind, probe_video, tensor_to_frames

TENSOR_SUFFIXES = (".npy", ".safetensors")
LATENT_SUFFIXES = (".safetensors", ".npy")     # encode -o, reconstruct --save-latents
VIDEO_SUFFIXES = tuple(VIDEO_CONTAINERS)       # .mp4 .mkv .mov .webm
BACKEND_PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32", "fp16", "int8"),
                      "tensorrt": ("fp32", "fp16", "bf16", "int8")}


def check_suffix(path: Path, allowed: tuple[str, ...], option: str, *, png_folder: bool = False) -> str:
    """The output kind of ``path`` from its suffix; an unknown suffix is a usage error listing the supported ones.

    ``png_folder``: a name without a suffix is a folder of PNG frames.
    """
    suffix = path.suffix.lower()
    if suffix in allowed or (png_folder and suffix == ""):
        return suffix
    supported = ", ".join(allowed) + (", or no suffix for a folder of PNG frames" if png_folder else "")
    raise click.BadParameter(f"{path.name}: unsupported suffix {suffix or '(none)'!r}; supported: {supported}",
                             param_hint=option)


def check_precision(backend: str, precision: str) -> None:
    """A precision the backend runs (``auto`` is resolved per backend by cvvae.precision)."""
    if precision != "auto" and precision not in BACKEND_PRECISIONS[backend]:
        raise click.BadParameter(f"the {backend} backend runs {', '.join(BACKEND_PRECISIONS[backend])}, not "
                                 f"{precision}", param_hint="--precision")


def batch_outputs(output: Path, batch: int) -> list[Path]:
    """One output per batch item, ``name_0.mp4``, ``name_1.mp4``, ... (the name itself for one item)."""
    if batch == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{b}{output.suffix}") for b in range(batch)]


def _store_max_memory(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Keep --max-memory in the context (bytes) for load_runtime; a bad size is a usage error."""
    from ..memory import parse_bytes

    try:
        ctx.meta["cvvae.max_memory"] = None if value is None else parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def runtime_options(fn):
    """--model / --backend / --device / --precision / --max-memory / --batch-tiles."""
    options = [
        click.option("--model", "model_path", default=None, metavar="PATH",
                     help="Checkpoint (torch), export dir (onnxruntime) or engine dir (tensorrt); random:PRESET for "
                          "random weights. Default: the built-in default model."),
        click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None,
                     help="Default: torch where PyTorch is installed, else onnxruntime (the base install)."),
        click.option("--device", type=DeviceParam(tensorrt=True), default="cpu", show_default=True,
                     help="cpu, cuda[:N] (tensorrt[:N] for ORT's TRT EP)."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]), default="auto",
                     show_default=True, help="auto: bf16 where the CPU/GPU computes it natively and its accuracy "
                                             "holds, else fp32 (docs/benchmarks.md, Precision)."),
        click.option("--max-memory", default=None, metavar="SIZE", expose_value=False, callback=_store_max_memory,
                     help="Memory budget such as 8G: tiles (and chunks) shrink so the job fits. "
                          "Default: 90% of the memory available now."),
        click.option("--batch-tiles", is_flag=True, help="Run equal-shape tiles in one batched call (exact)."),
        click.option("--preset", default=None, help="Architecture preset for a bare weights file (torch backend)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return plan_options(fn)


def video_read_options(fn):
    options = [
        click.option("--start", type=click.IntRange(min=0), default=0, help="First source frame."),
        click.option("--end", type=click.IntRange(min=1), default=None, help="Stop before this source frame."),
        click.option("--stride", type=click.IntRange(min=1), default=1, help="Take every N-th frame."),
        click.option("--max-frames", type=click.IntRange(min=1), default=None),
        click.option("--size", default=None, metavar="HxW", help="Resize to exactly HxW."),
        click.option("--resize-short-side", type=click.IntRange(min=1), default=None,
                     help="Resize keeping aspect ratio."),
        click.option("--center-crop", default=None, metavar="HxW", help="Centre crop after resizing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def read_kwargs(start, end, stride, max_frames, size, resize_short_side, center_crop) -> dict[str, Any]:
    if end is not None and end <= start:
        raise click.BadParameter(f"--end {end} must be after --start {start}", param_hint="--end")
    if size is not None and resize_short_side is not None:
        raise click.UsageError("pass either --size or --resize-short-side, not both")
    kw: dict[str, Any] = {"start": start, "end": end, "stride": stride, "max_frames": max_frames,
                          "size": positive_size(size, "--size"), "resize_short_side": resize_short_side,
                          "center_crop": positive_size(center_crop, "--center-crop")}
    return {k: v for k, v in kw.items() if v is not None}


def load_runtime(model_path, backend, device, precision, batch_tiles, preset=None, **plan_kw) -> VideoVAE:
    from ..allocator import release_memory
    from ..memory import default_budget
    from .backends import default_backend

    check_precision(backend or default_backend(), precision)
    extra = {"preset": preset} if preset else {}
    ctx = click.get_current_context(silent=True)
    budget = ctx.meta.get("cvvae.max_memory") if ctx else None
    try:
        vae = VideoVAE.load(model_path, backend=backend, device=device, precision=precision, batch_tiles=batch_tiles,
                            plan_overrides=plan_overrides(**plan_kw), max_memory=budget or default_budget(), **extra)
    except PlanError as e:  # the chunk/tile options do not fit this model's compression factors: a usage error
        raise click.UsageError(f"invalid chunk/tile options: {e}") from None
    click.echo(f"precision: {vae.precision_choice.describe()}", err=True)
    if ctx:
        ctx.call_on_close(release_memory)  # the job's heap goes back to the kernel when the command ends
    return vae


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


def write_frames(vae: VideoVAE, latents: Latents, outputs: list[Path], *, fps: float, crf: int, force: bool,
                 side_by_side: Iterator[np.ndarray] | None = None) -> int:
    """Decode chunk by chunk straight into one video writer per batch item; returns the frames per video.

    ``outputs`` has one path per batch item (:func:`batch_outputs`): items are never interleaved in one file.
    """
    if len(outputs) != latents.mean.shape[0]:
        raise InputError(f"{len(outputs)} outputs for a latent batch of {latents.mean.shape[0]}")
    written = 0
    with progress_bar("decode", latents.num_frames) as update, contextlib.ExitStack() as stack:
        writers = [stack.enter_context(VideoWriter(path, fps, crf=crf, overwrite=force)) for path in outputs]
        for pixels in vae.decode_stream(latents, on_progress=update):
            for b, writer in enumerate(writers):
                frames = tensor_to_frames(pixels[b])
                if side_by_side is not None:
                    originals = np.stack([next(side_by_side) for _ in range(frames.shape[0])])
                    frames = np.concatenate([originals, frames], axis=2)
                writer.write(frames)
            written += pixels.shape[2]
    return written


def describe_outputs(outputs: list[Path], frames: int, latents: Latents) -> str:
    """``out.mp4: 33 frames of HxW``, or for a batch ``2 videos (out_0.mp4, out_1.mp4) of 33 frames each ...``."""
    size = f"{latents.height}x{latents.width}"
    if len(outputs) == 1:
        return f"{outputs[0]}: {frames} frames of {size}"
    return f"{len(outputs)} videos ({', '.join(str(p) for p in outputs)}) of {frames} frames each, {size}"


def save_latents_output(latents: Latents, output: Path, *, unbatched: bool, force: bool) -> None:
    """``.npy``: the mean (mirroring the input's batching); ``.safetensors``: mean, logvar and metadata."""
    if output.suffix.lower() == ".npy":
        save_npy(output, to_numpy(latents.mean[0] if unbatched else latents.mean), overwrite=force)
    else:
        latents.save(output, overwrite=force)


def check_fps(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a positive frame rate")
    return value


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
    check_suffix(output, LATENT_SUFFIXES, "-o/--output")
    rkw = read_kwargs(start, end, stride, max_frames, size, resize_short_side, center_crop)
    check_writable_target(output, overwrite=force)
    vae = load_runtime(model_path, backend, device, precision, batch_tiles, preset, chunk_frames=chunk_frames,
                       tile_size=tile_size, tile_overlap=tile_overlap, no_tiling=no_tiling, no_chunking=no_chunking)
    latents, unbatched = encode_input(vae, input_path, rkw)
    save_latents_output(latents, output, unbatched=unbatched, force=force)
    click.echo(f"{input_path} -> {output}: latent {tuple(latents.mean.shape)} for {latents.num_frames} frames "
               f"of {latents.height}x{latents.width}")


@click.command()
@click.argument("input_path", metavar="LATENTS", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Video (.mp4/.mkv/.mov/.webm), a folder of PNG frames (no suffix), or .npy pixels. A latent "
                   "batch of B > 1 gives B videos or folders, NAME_0 ... NAME_{B-1}.")
@runtime_options
@click.option("--fps", type=float, default=None, callback=check_fps,
              help="Frame rate (default: the encoded video's, else 30).")
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True,
              help="H.264/VP9 quality, 0..51 (lower is better).")
@click.option("--ignore-model-mismatch", is_flag=True, help="Decode latents made by another checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def decode(input_path: Path, output: Path, model_path, backend, device, precision, batch_tiles, preset, chunk_frames,
           tile_size, tile_overlap, no_tiling, no_chunking, fps, crf, ignore_model_mismatch, force) -> None:
    """Decode latents to a video, PNG frames or .npy pixels."""
    kind = check_suffix(output, (*VIDEO_SUFFIXES, ".npy"), "-o/--output", png_folder=True)
    raw = load_latents(input_path)
    unbatched = raw.mean.ndim == 4  # (z, L, h, w), as encode writes for unbatched .npy pixels
    latents = Latents.from_file(raw)
    outputs = [output] if kind == ".npy" else batch_outputs(output, latents.mean.shape[0])
    for path in outputs:
        check_writable_target(path, overwrite=force, kind="file" if kind == ".npy" else output_kind(path))
    vae = load_runtime(model_path, backend, device, precision, batch_tiles, preset, chunk_frames=chunk_frames,
                       tile_size=tile_size, tile_overlap=tile_overlap, no_tiling=no_tiling, no_chunking=no_chunking)
    latents = latents.sized(vae.config)
    if kind == ".npy":
        with progress_bar("decode", latents.num_frames) as update:
            pixels = vae.decode(latents, on_progress=update, check_model=not ignore_model_mismatch)
        save_npy(output, to_numpy(pixels[0] if unbatched else pixels), overwrite=force)
        n = pixels.shape[2]
    else:
        if ignore_model_mismatch:
            latents.metadata.pop("model_sha256", None)
        n = write_frames(vae, latents, outputs, fps=fps or latents.metadata.get("fps") or 30.0, crf=crf,
                         force=force)
    click.echo(f"{input_path} -> {describe_outputs(outputs, n, latents)}")


@click.command()
@click.argument("video", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output video (.mp4/.mkv/.mov/.webm) or a folder of PNG frames (no suffix).")
@runtime_options
@video_read_options
@click.option("--side-by-side", is_flag=True, help="Write the input left and the reconstruction right.")
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True,
              help="H.264/VP9 quality, 0..51 (lower is better).")
@click.option("--save-latents", type=click.Path(path_type=Path), default=None,
              help="Also keep the latents here (.safetensors, or .npy for the mean only).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def reconstruct(video: Path, output: Path, model_path, backend, device, precision, batch_tiles, preset, chunk_frames,
                tile_size, tile_overlap, no_tiling, no_chunking, start, end, stride, max_frames, size,
                resize_short_side, center_crop, side_by_side, crf, save_latents, force) -> None:
    """Encode and decode a video: same frame count, size and fps as the input."""
    from ..video_io import iter_video_frames

    if video.suffix.lower() in TENSOR_SUFFIXES:
        raise click.BadParameter(f"{video.name}: reconstruct reads a video file; for {video.suffix} tensors run "
                                 "`cvvae encode` and then `cvvae decode`", param_hint="VIDEO")
    check_suffix(output, VIDEO_SUFFIXES, "-o/--output", png_folder=True)
    if save_latents:
        check_suffix(save_latents, LATENT_SUFFIXES, "--save-latents")
    rkw = read_kwargs(start, end, stride, max_frames, size, resize_short_side, center_crop)
    check_writable_target(output, overwrite=force, kind=output_kind(output))
    if save_latents:
        check_writable_target(save_latents, overwrite=force)
    vae = load_runtime(model_path, backend, device, precision, batch_tiles, preset, chunk_frames=chunk_frames,
                       tile_size=tile_size, tile_overlap=tile_overlap, no_tiling=no_tiling, no_chunking=no_chunking)
    latents, _ = encode_input(vae, video, rkw)
    if save_latents:
        save_latents_output(latents, save_latents, unbatched=False, force=force)
    originals = None
    if side_by_side:
        originals = (frame for chunk in iter_video_frames(video, chunk_size=16, **rkw) for frame in chunk)
    n = write_frames(vae, latents, [output], fps=latents.metadata["fps"], crf=crf, force=force,
                     side_by_side=originals)
    click.echo(f"{video} -> {output}: {n} frames of {latents.height}x{latents.width} at "
               f"{latents.metadata['fps']:.3f} fps")


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--model", "model_path", default=None, help="Checkpoint (or export dir, whose checkpoint is used).")
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="Comma list; the first is the reference.")
@click.option("--precision", default="fp32", show_default=True, help="Precision of the non-reference backends.")
@click.option("--device", type=DeviceParam(tensorrt=True), default="cpu", show_default=True)
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
        click.echo(format_table(rows, "parity"))


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
