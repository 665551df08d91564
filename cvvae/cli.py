"""The ``cvvae`` command line: thin click commands over the public API.

Each command builds config objects and calls library functions; nothing here is reachable only through the CLI.
Commands of other parts of the toolkit (export, runtime, training, ...) are listed in :data:`LAZY_COMMANDS`.
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import logging
import re
import sys
from typing import Any, Callable

import click

from .errors import CVVAEError
from .memory import available_memory, format_bytes, plan_memory
from .plan import SUMMARY_HEAD


DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def one_line(e: BaseException) -> str:
    """``Type: message``, as the CLI prints errors."""
    return f"{type(e).__name__}: {e}"


def _os_error_message(e: OSError) -> str:
    """A full disk or a file-size limit says so plainly (numpy and safetensors report them cryptically)."""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        where = f" {e.filename}" if e.filename else ""
        reason = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file-size limit was reached",
                  errno.EDQUOT: "the disk quota is exhausted"}[e.errno]
        return (f"OSError: could not write{where}: {reason} (errno {e.errno}); free some space or write elsewhere; "
                "nothing was left behind")
    return one_line(e)


def handle_errors(fn: Callable) -> Callable:
    """Turn the toolkit's expected errors into a one-line message and exit status 1, without a traceback.

    Usage errors (bad options or arguments: ``click.UsageError``/``BadParameter``) pass through to click, which exits
    with status 2; everything else the toolkit refuses (bad files, models, memory, disk) exits with status 1.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise click.ClickException(_os_error_message(e)) from e
        except (CVVAEError, ValueError) as e:
            raise click.ClickException(one_line(e)) from e
        except MemoryError as e:
            raise click.ClickException(f"MemoryError: ran out of memory {' '.join(str(e).split())}; use a smaller "
                                       "--size, --tile-size or --chunk-frames") from e
        except RuntimeError as e:
            if "can't allocate memory" in str(e) or type(e).__name__ == "OutOfMemoryError":
                raise click.ClickException(f"MemoryError: {' '.join(str(e).split())[:300]}; use a smaller --size, "
                                           "--tile-size or --chunk-frames") from e
            raise

    return wrapper


DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|tensorrt(:\d+)?)$")


class DeviceParam(click.ParamType):
    """``cpu``, ``cuda``, ``cuda:N`` (and ``tensorrt[:N]`` where ONNX Runtime's TensorRT provider is meant)."""

    name = "device"

    def __init__(self, *, tensorrt: bool = False, auto: bool = False) -> None:
        self.tensorrt, self.auto = tensorrt, auto

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text == "auto" and self.auto:
            return text
        if not DEVICE_PATTERN.match(text) or (text.startswith("tensorrt") and not self.tensorrt):
            choices = ("auto, " if self.auto else "") + "cpu, cuda, cuda:N" + (
                ", tensorrt[:N] (onnxruntime)" if self.tensorrt else "")
            self.fail(f"{value!r} is not a device; use one of {choices}", param, ctx)
        return text


def positive_size(value: str | None, option: str, axes: str = "HxW") -> tuple[int, ...] | None:
    """``"256x448"`` -> ``(256, 448)`` (None stays None); a malformed or non-positive value is a usage error."""
    if value is None:
        return None
    example = {"HxW": "256x448", "TxHxW": "17x256x256"}[axes]
    try:
        parts = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != len(axes.split("x")):
        raise click.BadParameter(f"expected {axes} such as {example}, got {value!r}", param_hint=option)
    if min(parts) < 1:
        raise click.BadParameter(f"every size in {value!r} must be at least 1", param_hint=option)
    return parts


def model_options(fn: Callable) -> Callable:
    """--model / --preset / --subfolder / --device / --dtype, shared by every command that loads a model."""
    options = [
        click.option("--model", "model_path", default=None, metavar="PATH",
                     help="Checkpoint folder or file, an export/engine folder, or random:PRESET. "
                          "Default: the built-in default model."),
        click.option("--preset", default=None, help="Architecture preset for a bare weights file "
                                                    "(cvvae-v1, cvvae-sd3, tiny-v1, tiny-sd3)."),
        click.option("--subfolder", default=None, help="vae3d* subfolder of a multi-model folder."),
        click.option("--device", type=DeviceParam(), default="cpu", show_default=True,
                     help="torch device (cpu, cuda, cuda:1)."),
        click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True),
        click.option("--trust-checkpoint", is_flag=True, help="Allow pickled extras in a trusted .ckpt/.pt."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plan_options(fn: Callable) -> Callable:
    """Chunk/tile overrides (defaults come from the model config)."""
    options = [
        click.option("--chunk-frames", type=click.IntRange(min=1), default=None,
                     help="Frames per encode chunk (multiple of 4)."),
        click.option("--tile-size", type=click.IntRange(min=1), default=None, help="Spatial tile in pixels."),
        click.option("--tile-overlap", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
                     help="Tile overlap ratio in [0,1)."),
        click.option("--no-tiling", is_flag=True, help="Run every frame as one spatial tile."),
        click.option("--no-chunking", is_flag=True, help="Run the whole video as one temporal chunk."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plan_overrides(chunk_frames: int | None, tile_size: int | None, tile_overlap: float | None, no_tiling: bool,
                   no_chunking: bool) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if chunk_frames is not None:
        overrides["chunk_frames"] = chunk_frames
    if tile_size is not None:
        overrides["tile_size"] = tile_size
    if tile_overlap is not None:
        overrides["tile_overlap_ratio"] = tile_overlap
    if no_tiling:
        overrides["tile_size"] = None
    if no_chunking:
        overrides["chunk_frames"] = None
    return overrides


def load_from_options(model_path: str | None, preset: str | None, subfolder: str | None, device: str, dtype: str,
                      trust_checkpoint: bool):
    from .loading import load_model

    return load_model(model_path, preset=preset, subfolder=subfolder, device=device, dtype=torch_dtype(dtype),
                      trust_pickle=trust_checkpoint)


# Commands that live in other modules: name -> "module:attribute". They are imported when asked for, so importing
# any command module first (e.g. cvvae.runtime.cli) cannot run into a half-initialised cvvae.cli.
LAZY_COMMANDS = {
    "encode": "cvvae.runtime.cli:encode",
    "decode": "cvvae.runtime.cli:decode",
    "reconstruct": "cvvae.runtime.cli:reconstruct",
    "parity": "cvvae.runtime.cli:parity",
    "doctor": "cvvae.runtime.cli:doctor",
    "export": "cvvae.export.cli:export",
    "inspect": "cvvae.export.cli:inspect",
    "build-engines": "cvvae.engines.cli:build_engines",
    "calibrate": "cvvae.calibration.cli:calibrate",
    "accuracy": "cvvae.calibration.cli:accuracy",
    "bench": "cvvae.tools.bench_cli:bench",
    "report": "cvvae.tools.bench_cli:report",
    "deploy": "cvvae.tools.deploy_cli:deploy",
    "train": "cvvae.training.cli:train_command",
    "compat": "cvvae.training.cli:compat_command",
    "encode-dataset": "cvvae.runtime.dataset_cli:encode_dataset",
    "decode-dataset": "cvvae.runtime.dataset_cli:decode_dataset",
    "dataset-stats": "cvvae.runtime.dataset_cli:dataset_stats",
}


# Commands that need an optional package (docs/thin-runtime.md): without it they stop before any work and print the
# install line. The runtime commands (encode, decode, reconstruct, info, doctor) run on the base install.
COMMAND_NEEDS = {
    "export": "torch", "inspect": "onnx", "calibrate": "torch", "accuracy": "torch", "bench": "torch",
    "report": "torch", "parity": "torch", "deploy": "torch", "train": "torch", "compat": "torch",
    "encode-dataset": "torch", "decode-dataset": "torch", "dataset-stats": "torch",
}


def missing_extra_command(name: str, module: str) -> click.Command:
    """Stands in for a command whose package is missing: takes any arguments, does nothing, says what to install."""
    from .extras import install_hint

    message = f"`cvvae {name}` needs the '{module}' package, which is not installed: {install_hint(module)}"

    def refuse(args: tuple[str, ...]) -> None:
        raise click.ClickException(message)

    return click.Command(name, callback=refuse, help=f"(not installed) {message}", add_help_option=False,
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


class LazyGroup(click.Group):
    """A click group whose commands in :data:`LAZY_COMMANDS` are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from .extras import is_installed

        needed = COMMAND_NEEDS.get(name)
        if needed and not is_installed(needed):
            return missing_extra_command(name, needed)
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attr = LAZY_COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """CV-VAE deployment toolkit: reference model, ONNX export, engines and a chunked streaming runtime."""
    from .allocator import keep_memory

    keep_memory()  # before any work: big buffers stay in the heap for reuse (cvvae.allocator)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@model_options
@click.option("--size", default=None, metavar="TxHxW", help="Input size to plan for, e.g. 65x720x1280.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@plan_options
@handle_errors
def info(model_path, preset, subfolder, device, dtype, trust_checkpoint, size, as_json, **plan_kw) -> None:
    """Config, parameter count, compression factors and the chunk/tile plan for an input size."""
    from .extras import is_installed

    builtin_default = model_path is None and not (preset or subfolder)  # described from its files, torch or not
    if is_installed("torch") and not builtin_default and not _is_export_dir(model_path):
        model = load_from_options(model_path, preset, subfolder, device, dtype, trust_checkpoint)
        cfg = model.config
        counts = (model.num_parameters(), sum(p.numel() for p in model.encoder.parameters()),
                  sum(p.numel() for p in model.decoder.parameters()))
        checkpoint = model.checkpoint_info.as_dict() if model.checkpoint_info else None
    else:
        cfg, counts, checkpoint = describe_without_torch(model_path)
    data: dict[str, Any] = {
        "variant": cfg.variant,
        "config": cfg.summary(),
        "parameters": counts[0],
        "encoder_parameters": counts[1],
        "decoder_parameters": counts[2],
        "compression": {"time": cfg.time_compress, "space": cfg.spatial_compress,
                        "latent_channels": cfg.latent_channels},
        "checkpoint": checkpoint,
    }
    if size:
        from .plan import PlanSettings, make_plan

        t, h, w = positive_size(size, "--size", "TxHxW")
        settings = plan_settings_or_usage_error(functools.partial(PlanSettings.from_config, cfg),
                                                **plan_overrides(**plan_kw))
        plan = make_plan(settings, t, h, w)
        data["plan"] = plan.describe()
        # a checkpoint runs on the torch backend where torch is installed, whose layers are frame-sliced
        estimate = plan_memory(plan, cfg, batch_tiles=False, direction="both",
                               sliced=is_installed("torch") and not _is_export_dir(model_path))
        available = available_memory()
        data["memory"] = {**estimate.as_dict(), "available_bytes": available}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"variant      {cfg.variant}  ({data['checkpoint']['source'] if data['checkpoint'] else ''})")
    if data["parameters"] is not None:
        click.echo(f"parameters   {data['parameters']:,} (encoder {data['encoder_parameters']:,}, "
                   f"decoder {data['decoder_parameters']:,})")
    click.echo(f"widths       {list(cfg.widths)}, {cfg.layers_per_block} resnets/level, "
               f"{cfg.latent_channels} latent channels")
    click.echo(f"compression  time x{cfg.time_compress}, space x{cfg.spatial_compress}; "
               "T frames -> 1+(T-1)//4 latents; L latents -> 4(L-1)+1 frames")
    click.echo(f"scaling      {cfg.scaling_factor}  shift {cfg.shift_factor}")
    chunking = "no temporal chunking" if cfg.chunk_frames is None else f"{cfg.chunk_frames} frames/chunk"
    tiling = ("no spatial tiling" if cfg.tile_spatial_size is None
              else f"tile {cfg.tile_spatial_size} px, overlap {cfg.tile_overlap_ratio}")
    click.echo(f"chunk/tile   {chunking}, {tiling}")
    if "plan" in data:
        p = data["plan"]

        def chunks(key: str, count: int) -> str:
            spans = p[key]
            if count <= len(spans):
                return str(spans)
            head, tail = spans[:SUMMARY_HEAD], spans[SUMMARY_HEAD:]
            return f"{count:,} chunks: {str(head)[:-1]}, ... {str(tail)[1:]}"

        click.echo(f"plan         input {p['input']} -> padded {p['padded']} -> latent {p['latent']}")
        click.echo(f"             encode chunks (frames) {chunks('encode_chunks_frames', p['encode_chunk_count'])}")
        click.echo(f"             decode chunks (latents) {chunks('decode_chunks_latents', p['decode_chunk_count'])}")
        click.echo(f"             tiles {p['tile_row_count']} x {p['tile_col_count']}: rows px "
                   f"{chunks('tile_rows_px', p['tile_row_count'])}, cols px "
                   f"{chunks('tile_cols_px', p['tile_col_count'])}, overlap {p['tile_overlap_px']} px")
        fits = "" if available is None else (f" of {format_bytes(available)} available" + (
            "" if estimate.total <= available else ": too large, this plan would be refused"))
        click.echo(f"memory       about {estimate.describe()}{fits}")


def _is_export_dir(model_path: str | None) -> bool:
    from pathlib import Path

    return model_path is not None and (Path(model_path) / "manifest.json").exists()


def describe_without_torch(model_path: str | None) -> tuple[Any, tuple[int | None, int | None, int | None], Any]:
    """Config, parameter counts (all, encoder, decoder) and checkpoint of a model, read without PyTorch.

    ``None`` is the built-in default model; an export directory is described by its manifest; a checkpoint folder by
    its config.json and the tensor shapes in its safetensors header.
    """
    from pathlib import Path

    from .config import ModelConfig
    from .default_model import DEFAULT_MODEL_DIR

    path = Path(model_path) if model_path is not None else DEFAULT_MODEL_DIR
    if (path / "manifest.json").exists():
        from .export.manifest import load_manifest

        manifest = load_manifest(path)
        cfg, checkpoint = manifest.model_config(), manifest.checkpoint
        weights = Path(checkpoint.get("source") or "")
        path = weights.parent if weights.suffix == ".safetensors" and weights.exists() else None
    elif (path / "config.json").exists():
        cfg, checkpoint = ModelConfig.from_json_file(path / "config.json"), None
    else:  # a bare weights file or random:PRESET: only the PyTorch loader reads those
        from .errors import BackendUnavailableError
        from .extras import install_hint

        raise BackendUnavailableError(f"{model_path} is not an export directory or a checkpoint folder; reading it "
                                      f"needs the 'torch' package, which is not installed: {install_hint('torch')}")
    weights = path / "diffusion_pytorch_model.safetensors" if path is not None else None
    if weights is None or not weights.exists():
        return cfg, (None, None, None), checkpoint
    from safetensors import safe_open

    from .fsutil import sha256_file

    counts = {"encoder": 0, "decoder": 0, "": 0}
    with safe_open(str(weights), framework="numpy") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            counts[key.split(".")[0] if key.split(".")[0] in counts else ""] += n
    checkpoint = checkpoint or {"source": str(weights), "sha256": sha256_file(weights),
                                "config_source": str(path / "config.json")}
    return cfg, (sum(counts.values()), counts["encoder"], counts["decoder"]), checkpoint


def plan_settings_or_usage_error(make: Callable[..., Any], **overrides: Any) -> Any:
    """Plan settings with the chunk/tile options applied; an invalid combination is a usage error (exit 2)."""
    from .errors import PlanError

    try:
        return make(**overrides)
    except PlanError as e:
        raise click.UsageError(f"invalid chunk/tile options: {e}") from None
