"""``cvvae encode`` / ``cvvae decode`` on tensor files (.npy, .safetensors).

Encode input: float32 pixels in [-1, 1], (B,3,T,H,W) or (3,T,H,W). Encode output: ``.npy`` (the latent mean) or
``.safetensors`` (``mean``, ``logvar`` and the metadata that lets decode return exactly the original frames).
Decode input: ``.safetensors`` (``mean`` or ``latent``) or ``.npy``, (B,z,L,h,w) or unbatched (z,L,h,w); output
``.npy`` pixels with the same batching.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from .cli import handle_errors, load_from_options, model_options, plan_options, plan_overrides
from .errors import InputError
from .fsutil import atomic_path, check_writable_target
from .latent_io import check_latent_matches, load_latents, model_identity, save_latents

TENSOR_SUFFIXES = (".npy", ".safetensors")


def read_pixels(path: Path) -> torch.Tensor:
    """Float pixels in [-1, 1] from a .npy file, checked for shape and range."""
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.suffix != ".npy":
        raise InputError(f"tensor input {path} must be .npy (float32 pixels in [-1,1], shape (B,3,T,H,W) or (3,T,H,W))")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"cannot read {path} as a .npy array: {e}") from e
    if arr.ndim not in (4, 5) or arr.shape[-4] != 3:
        raise InputError(f"{path} has shape {arr.shape}; expected (B,3,T,H,W) or (3,T,H,W) RGB pixels")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path} holds {arr.dtype}; expected float pixels in [-1,1] (x/127.5 - 1 for uint8)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1.001 or hi > 1.001 or not np.isfinite([lo, hi]).all():
        raise InputError(f"{path} has values in [{lo:.3g}, {hi:.3g}]; expected pixels in [-1, 1]")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def save_npy(path: Path, array: np.ndarray, *, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Output .safetensors (mean, logvar, metadata) or .npy (mean).")
@model_options
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True)
@plan_options
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def encode(input_path: Path, output: Path, model_path, preset, subfolder, device, dtype, trust_checkpoint, backend,
           force: bool, **plan_kw) -> None:
    """Encode pixels to latents."""
    if output.suffix not in TENSOR_SUFFIXES:
        raise InputError(f"output {output} must end in .safetensors or .npy")
    check_writable_target(output, overwrite=force)
    x = read_pixels(input_path)
    model = load_from_options(model_path, preset, subfolder, device, dtype, trust_checkpoint)
    result = model.encode(x.to(model.device), model.plan_settings(**plan_overrides(**plan_kw)))
    mean, logvar = result.mean, result.logvar
    if output.suffix == ".npy":  # mirrors the input: (B,z,L,h,w) or (z,L,h,w)
        save_npy(output, (mean if x.ndim == 5 else mean[0]).float().cpu().numpy(), overwrite=force)
    else:  # always batched, so the file is unambiguous
        save_latents(output, mean, logvar, num_frames=result.num_frames, height=result.height, width=result.width,
                     identity=model_identity(model), extra={"plan": result.plan}, overwrite=force)
    click.echo(f"{input_path} {tuple(x.shape)} -> {output} mean {tuple(mean.shape)}")


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Output .npy pixels (B,3,T,H,W) in [-1,1].")
@model_options
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True)
@plan_options
@click.option("--ignore-model-mismatch", is_flag=True, help="Decode latents made by another checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def decode(input_path: Path, output: Path, model_path, preset, subfolder, device, dtype, trust_checkpoint, backend,
           ignore_model_mismatch: bool, force: bool, **plan_kw) -> None:
    """Decode latents to pixels."""
    if output.suffix != ".npy":
        raise InputError(f"output {output} must end in .npy")
    check_writable_target(output, overwrite=force)
    latents = load_latents(input_path)
    model = load_from_options(model_path, preset, subfolder, device, dtype, trust_checkpoint)
    check_latent_matches(latents, model, strict_model=not ignore_model_mismatch)
    z = latents.mean
    unbatched = z.ndim == 4  # (z, L, h, w), as `cvvae encode` writes for a (3, T, H, W) .npy input
    z = z.unsqueeze(0) if unbatched else z
    pixels = model.decode(z.to(model.device), num_frames=latents.num_frames, height=latents.height,
                          width=latents.width, settings=model.plan_settings(**plan_overrides(**plan_kw)))
    pixels = pixels[0] if unbatched else pixels
    save_npy(output, pixels.float().cpu().numpy(), overwrite=force)
    click.echo(f"{input_path} {tuple(latents.mean.shape)} -> {output} {tuple(pixels.shape)}")
