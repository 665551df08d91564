"""Backend parity: the same input and plan on several backends, errors per component against the first one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cvvae.codec_io import read_pixels
from cvvae.errors import InputError
from cvvae.runtime.api import VideoVAE
from cvvae.compare import Comparison, compare, parity_tolerance

log = logging.getLogger(__name__)


def load_input(path: Path, read_kwargs: dict[str, Any]) -> torch.Tensor:
    """B,3,T,H,W pixels from a .npy file or a video."""
    if path.suffix == ".npy":
        x = torch.from_numpy(read_pixels(path))
        return x if x.ndim == 5 else x.unsqueeze(0)
    from cvvae.video_io import frames_to_tensor, read_video

    frames, _ = read_video(path, **read_kwargs)
    return torch.from_numpy(frames_to_tensor(frames)).unsqueeze(0)


def checkpoint_of(model_path: str | None) -> str | None:
    """The checkpoint behind an export directory (its manifest records it), else the path itself."""
    if model_path and (Path(model_path) / "manifest.json").exists():
        from cvvae.engines.sidecar import is_engine_dir, load_engine_dir
        from cvvae.export.manifest import load_manifest

        path = Path(model_path)
        source = (load_engine_dir(path) if is_engine_dir(path) else load_manifest(path)).checkpoint.get("source")
        if not source or not (source.startswith("random:") or Path(source).exists()):
            raise InputError(f"{model_path} was exported from {source!r}, which is not available here; "
                             "pass --model CHECKPOINT")
        return source
    return model_path


def run_parity(input_path: Path, model_path: str | None, backends: list[str], *, precision: str = "fp32",
               device: str = "cpu", read_kwargs: dict[str, Any] | None = None,
               plan_overrides: dict[str, Any] | None = None, judge: bool = False) -> list[Comparison]:
    """Encode (mean, logvar), decode (from the reference latents) and round trip on each backend; with ``judge``
    every output is judged by its parity tolerance (:data:`cvvae.compare.PARITY`) at ``precision``."""
    if len(backends) < 2:
        raise InputError(f"parity needs at least two backends, got {backends}")
    x = load_input(Path(input_path), read_kwargs or {})
    checkpoint = checkpoint_of(model_path)
    rows: list[Comparison] = []
    ref = ref_latents = ref_pixels = None
    for i, name in enumerate(backends):
        path = model_path if name != "torch" else checkpoint
        vae = VideoVAE.load(path, backend=name, device=device, precision="fp32" if i == 0 else precision,
                            plan_overrides=plan_overrides)
        latents = vae.encode(x)
        if ref is None:
            ref, ref_latents = name, latents
            ref_pixels = vae.decode(latents)
            continue
        decoded = vae.decode(ref_latents)
        round_trip = vae.decode(latents, check_model=False)
        for output, reference, candidate in (("encoder.mean", ref_latents.mean, latents.mean),
                                             ("encoder.logvar", ref_latents.logvar, latents.logvar),
                                             ("decoder.video", ref_pixels, decoded),
                                             ("round_trip.video", ref_pixels, round_trip)):
            rows.append(compare(candidate, reference, parity_tolerance(precision, output) if judge else None,
                                output=output, backend=name, precision=precision))
    return rows
