"""Latent files: ``.safetensors`` with ``mean`` and ``logvar`` plus the metadata decoding needs (spec section 5).

The metadata keeps the original frame count and size (so decoding returns exactly the input's frames, even when
they were padded to 1+4k frames and multiples of 8), the model's identity (variant, latent channels, checkpoint
sha256) and its scaling factor, and optional extras such as fps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes

from .arrays import to_numpy
from .errors import InputError
from .fsutil import atomic_path, reporting_target

FORMAT = "cvvae-latents/1"


@dataclass
class LatentFile:
    mean: Any                     # numpy arrays when read from a file; any array when written
    logvar: Any | None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def identity(cfg: Any, sha256: str | None, source: str | None) -> dict[str, Any]:
    """What ties a latent to the model that made it (recorded in latent files, checked when decoding)."""
    return {
        "variant": cfg.variant,
        "latent_channels": cfg.latent_channels,
        "model_sha256": sha256,
        "model_source": source,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
    }


def model_identity(model: Any) -> dict[str, Any]:
    """:func:`identity` of a loaded PyTorch model."""
    info = getattr(model, "checkpoint_info", None)
    return identity(model.config, getattr(info, "sha256", None), getattr(info, "source", None))


def save_latents(path: str | Path, mean: Any, logvar: Any | None, *, num_frames: int,
                 height: int, width: int, identity: dict[str, Any], extra: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write a latent file atomically (temp file + rename)."""
    path = Path(path)
    meta = {"format": FORMAT, "num_frames": num_frames, "height": height, "width": width, **identity, **(extra or {})}
    tensors = {"mean": np.ascontiguousarray(to_numpy(mean, np.float32))}
    if logvar is not None:
        tensors["logvar"] = np.ascontiguousarray(to_numpy(logvar, np.float32))
    # serialized here and written by Python into our own temporary: a full disk is an OSError(ENOSPC), not a
    # SafetensorError, and save_file's own private (0600) temporary never exists
    data = safetensors_bytes(tensors, metadata={k: json.dumps(v) for k, v in meta.items()})
    with reporting_target(path), atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return path


def load_latents(path: str | Path) -> LatentFile:
    """Read a latent file (``.safetensors`` with ``mean``/``latent``, or a ``.npy`` array of latents)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"latent file {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise InputError(f"cannot read {path} as a .npy array: {e}") from e
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise InputError(f"{path} holds {arr.dtype} values; expected float latents")
        return check_latent_file(LatentFile(np.ascontiguousarray(arr, dtype=np.float32), None), path)
    if path.suffix != ".safetensors":
        raise InputError(f"latent file {path} must be .safetensors or .npy, not {path.suffix or 'no suffix'}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            raw_meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"cannot read {path} as safetensors: {e}") from e
    key = "mean" if "mean" in tensors else "latent" if "latent" in tensors else None
    if key is None:
        raise InputError(f"{path} has no 'mean' or 'latent' tensor (it has: {', '.join(sorted(tensors)) or 'none'})")
    meta = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    logvar = tensors.get("logvar")
    return check_latent_file(LatentFile(tensors[key].astype(np.float32, copy=False),
                                        None if logvar is None else logvar.astype(np.float32, copy=False),
                                        meta.get("num_frames"), meta.get("height"), meta.get("width"), meta), path)


def check_latent_file(f: LatentFile, path: str | Path) -> LatentFile:
    """Refuse a latent file that cannot be decoded: wrong rank, an empty axis, NaN/Inf, or unusable metadata."""
    from .tiling import count_nonfinite

    z = f.mean
    if z.ndim not in (4, 5):
        raise InputError(f"{path} holds a latent of shape {tuple(z.shape)} ({z.ndim}-D); expected (B, z, L, h, w) "
                         "or (z, L, h, w)")
    if 0 in z.shape:
        raise InputError(f"{path} holds an empty latent of shape {tuple(z.shape)}; every axis needs at least 1")
    if f.logvar is not None and f.logvar.shape != z.shape:
        raise InputError(f"{path}: logvar {tuple(f.logvar.shape)} does not match mean {tuple(z.shape)}")
    for name in ("num_frames", "height", "width"):
        value = getattr(f, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{path}: metadata {name}={value!r} is not a positive integer; the file is damaged "
                             "(remove the key to decode at the latent's full size)")
    for name, values in (("mean", z), ("logvar", f.logvar)):
        bad = 0 if values is None else count_nonfinite(values)
        if bad:
            raise InputError(f"{path}: {name} has {bad:,} NaN/Inf values out of {values.size:,}; latents must be "
                             "finite (decoding them would give a black or garbage video)")
    return f


def check_latent_matches(latents: LatentFile, cfg: Any, model_sha256: str | None, *,
                         strict_model: bool = True) -> None:
    """Refuse latents made by another model (channel count always; checkpoint sha unless ``strict_model=False``)."""
    z = latents.mean
    channels = z.shape[1] if z.ndim == 5 else z.shape[0] if z.ndim == 4 else None
    if channels != cfg.latent_channels:
        raise InputError(
            f"latent of shape {tuple(z.shape)} does not fit this {cfg.variant} model: expected (B, "
            f"{cfg.latent_channels}, L, h, w) or ({cfg.latent_channels}, L, h, w); was it made by another model?"
        )
    made_by, ours = latents.metadata.get("model_sha256"), model_sha256
    if strict_model and made_by and ours and made_by != ours:
        raise InputError(
            f"latent file was made by model sha256 {made_by[:12]}... ({latents.metadata.get('model_source')}), "
            f"but the loaded model is {ours[:12]}...; decode with the same model, or pass --ignore-model-mismatch"
        )
