"""``VideoVAE``: the runtime that renderers embed (runtime issue; spec sections 5 and 6).

It loads one backend (PyTorch reference, ONNX Runtime, TensorRT), executes the one chunk/tile plan of
:mod:`cvvae.plan` through :mod:`cvvae.tiling`, and streams: ``encode_stream`` holds at most one temporal chunk of
frames, ``decode_stream`` yields frames chunk by chunk, so peak memory does not grow with video length.

Inputs are numpy arrays or torch tensors: uint8 frames (T,H,W,3) or (B,T,H,W,3), or float pixels in [-1, 1]
(B,3,T,H,W) or (3,T,H,W). Frame counts that are not 1+4k and sizes that are not multiples of 8 are padded and
cropped back, and the original size travels with the latents.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .. import tiling
from ..config import ModelConfig
from ..errors import InputError
from ..latent_io import LatentFile, check_latent_matches, load_latents, save_latents
from ..memory import check_plan_fits
from ..model import LOGVAR_MAX, LOGVAR_MIN
from ..plan import PlanSettings, VideoPlan, make_latent_plan, make_plan
from .backends import BACKENDS, Backend

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]  # (frames done, total frames or None)


@dataclass
class Latents:
    """Latent distribution of a video plus what decoding needs to return the original frames."""

    mean: torch.Tensor            # B,z,L,h,w
    logvar: torch.Tensor | None
    num_frames: int
    height: int
    width: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.logvar is None:
            raise InputError("these latents carry no logvar, so they cannot be sampled; use .mean")
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        identity = {k: v for k, v in self.metadata.items()}
        return save_latents(path, self.mean, self.logvar, num_frames=self.num_frames, height=self.height,
                            width=self.width, identity=identity, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "Latents":
        f = load_latents(path)
        return cls.from_file(f)

    @classmethod
    def from_file(cls, f: LatentFile) -> "Latents":
        mean = f.mean if f.mean.ndim == 5 else f.mean.unsqueeze(0)
        logvar = None if f.logvar is None else (f.logvar if f.logvar.ndim == 5 else f.logvar.unsqueeze(0))
        meta = {k: v for k, v in f.metadata.items() if k not in ("num_frames", "height", "width", "format")}
        t, h, w = mean.shape[2:]
        return cls(mean, logvar, f.num_frames or 4 * (t - 1) + 1, f.height or 8 * h, f.width or 8 * w, meta)


def to_pixels(frames: Any) -> torch.Tensor:
    """uint8 frames (T,H,W,3)/(B,T,H,W,3) or float pixels (B,3,T,H,W)/(3,T,H,W) -> float32 B,3,T,H,W in [-1,1]."""
    if isinstance(frames, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, torch.Tensor):
        x = frames
    else:
        raise InputError(f"frames must be a numpy array or a torch tensor, not {type(frames).__name__}")
    if x.dtype == torch.uint8:
        if x.ndim == 4:
            x = x.unsqueeze(0)
        if x.ndim != 5 or x.shape[-1] != 3:
            raise InputError(f"uint8 frames must be (T,H,W,3) or (B,T,H,W,3) RGB, got {tuple(x.shape)}")
        return x.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)
    if not x.is_floating_point():
        raise InputError(f"frames of dtype {x.dtype} are not supported: pass uint8 RGB or float pixels in [-1, 1]")
    if x.ndim == 4:
        x = x.unsqueeze(0)
    if x.ndim != 5 or x.shape[1] != 3:
        raise InputError(f"float pixels must be (B,3,T,H,W) or (3,T,H,W), got {tuple(x.shape)}")
    return x.float()


class VideoVAE:
    """Encode and decode videos of any length and size on one backend, chunk by chunk."""

    def __init__(self, backend: Backend, settings: PlanSettings | None = None, *, batch_tiles: bool = False) -> None:
        self.backend = backend
        self.settings = settings or backend.plan_settings
        self.batch_tiles = batch_tiles

    @classmethod
    def load(cls, path: str | Path | None = None, *, backend: str = "torch", device: str = "cpu",
             precision: str = "fp32", batch_tiles: bool = False, plan_overrides: dict[str, Any] | None = None,
             **backend_kwargs: Any) -> "VideoVAE":
        """Load a checkpoint (torch), an export directory (onnxruntime) or an engine directory (tensorrt).

        ``path=None`` is the built-in default model; with ``backend="onnxruntime"`` it is exported once into the
        cache (keyed by the checkpoint's sha256) and reused.
        """
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(sorted(BACKENDS))}")
        if backend == "tensorrt" and device == "cpu":
            device = "cuda"  # engines run on a GPU; "cpu" is only the CLI-wide default
        if backend == "onnxruntime" and (path is None or not (Path(path) / "manifest.json").exists()):
            path = cached_export(path, precision=precision)
        impl = BACKENDS[backend](path, device=device, precision=precision, **backend_kwargs)
        settings = PlanSettings.from_config(impl.config, **(plan_overrides or {}))
        return cls(impl, settings, batch_tiles=batch_tiles)

    # ----- plan -----------------------------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    def plan(self, num_frames: int, height: int, width: int) -> VideoPlan:
        return make_plan(self.settings, num_frames, height, width)

    def check_memory(self, num_frames: int, height: int, width: int, *, batch: int = 1,
                     direction: str = "both") -> None:
        """Refuse a video whose plan needs more memory than is available, before any frame is read or decoded."""
        check_plan_fits(self.plan(num_frames, height, width), self.config, batch=batch,
                        batch_tiles=self.batch_tiles, direction=direction)

    # ----- encode ---------------------------------------------------------------------------------------------
    def encode(self, frames: Any, *, metadata: dict[str, Any] | None = None,
               on_progress: ProgressFn | None = None) -> Latents:
        """Encode a whole video held in memory (see :meth:`encode_stream` for long videos)."""
        x = to_pixels(frames)
        return self._collect(self.encode_stream([x], total_frames=x.shape[2], on_progress=on_progress),
                             metadata)

    def encode_stream(self, frame_chunks: Iterable[Any], *, total_frames: int | None = None,
                      on_progress: ProgressFn | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, VideoPlan]]:
        """Yield (mean, logvar, plan) for each temporal chunk as soon as its frames have arrived.

        ``frame_chunks`` yields frames in any grouping (uint8 or float, as :meth:`encode` takes). The last item
        carries the final plan (the true frame count); when the last chunk ended on the last frame its tensors are
        empty.
        """
        streamer: tiling.StreamingEncoder | None = None
        plan: VideoPlan | None = None
        frames_done = 0
        for piece in frame_chunks:
            x = to_pixels(piece)
            if x.shape[1] != self.config.in_channels:
                raise InputError(f"frames have {x.shape[1]} channels, the model takes {self.config.in_channels}")
            if plan is None:
                plan = self.plan(max(1, x.shape[2]), x.shape[3], x.shape[4])
                self.check_memory(total_frames or plan.num_frames, plan.height, plan.width, batch=x.shape[0],
                                  direction="encode")
                streamer = tiling.StreamingEncoder(self.backend.encoder, plan, batch_tiles=self.batch_tiles)
            elif x.shape[3:] != (plan.height, plan.width):
                raise InputError(f"frame size changed mid-stream from {plan.height}x{plan.width} to "
                                 f"{x.shape[3]}x{x.shape[4]}")
            frames_done += x.shape[2]
            x = tiling.pad_space(x, plan)
            for moments in streamer.push(x):
                yield (*_split_moments(moments), plan)
            if on_progress:
                on_progress(frames_done, total_frames)
        if streamer is None:
            raise InputError("no frames to encode: the input is empty")
        final = self.plan(frames_done, plan.height, plan.width)
        tail = list(streamer.finish())
        if not tail:  # the last chunk ended on the last frame: still hand over the final plan
            empty = torch.empty(0)
            yield empty, empty, final
        for moments in tail:
            yield (*_split_moments(moments), final)

    def _collect(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor, VideoPlan]],
                 metadata: dict[str, Any] | None) -> Latents:
        means, logvars, plan = [], [], None
        for mean, logvar, plan in stream:
            if mean.numel():
                means.append(mean)
                logvars.append(logvar)
        meta = {**self.backend.identity, "plan": plan.describe(), "backend": self.backend.name,
                "precision": self.backend.precision, **(metadata or {})}
        return Latents(torch.cat(means, 2), torch.cat(logvars, 2), plan.num_frames, plan.height, plan.width, meta)

    def encode_video(self, path: str | Path, *, chunk_size: int = 16, on_progress: ProgressFn | None = None,
                     **read_kwargs: Any) -> Latents:
        """Encode a video file, reading it chunk by chunk (PyAV); fps and source go into the metadata."""
        from .video_io import iter_video_frames, probe_video, selected_shape

        info = probe_video(path)
        total, height, width = selected_shape(path, **read_kwargs)
        self.check_memory(total, height, width, direction="encode")  # before a frame is read
        frames = iter_video_frames(path, chunk_size=chunk_size, **read_kwargs)
        fps = info.fps / read_kwargs.get("stride", 1)
        return self._collect(self.encode_stream(frames, total_frames=total, on_progress=on_progress),
                             {"fps": fps, "source_video": str(path)})

    # ----- decode ---------------------------------------------------------------------------------------------
    def decode_stream(self, latents: Latents | torch.Tensor, *, on_progress: ProgressFn | None = None,
                      check_model: bool = True) -> Iterator[torch.Tensor]:
        """Yield float pixels (B,3,t,H,W) in [-1,1], chunk by chunk, cropped to the original size."""
        if isinstance(latents, torch.Tensor):
            z = latents if latents.ndim == 5 else latents.unsqueeze(0)
            latents = Latents(z, None, 4 * (z.shape[2] - 1) + 1, 8 * z.shape[3], 8 * z.shape[4])
        if check_model:
            check_latent_matches(LatentFile(latents.mean, latents.logvar, metadata=latents.metadata), self.config,
                                 self.backend.identity.get("model_sha256"))
        z = latents.mean
        plan = make_latent_plan(self.settings, z.shape[2], z.shape[3], z.shape[4], num_frames=latents.num_frames,
                                height=latents.height, width=latents.width)
        check_plan_fits(plan, self.config, batch=z.shape[0], batch_tiles=self.batch_tiles, direction="decode")
        done = 0
        for pixels in tiling.iter_decode(self.backend.decoder, z.float(), plan, batch_tiles=self.batch_tiles):
            done += pixels.shape[2]
            if on_progress:
                on_progress(done, plan.num_frames)
            yield pixels

    def decode(self, latents: Latents | torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Decode to float pixels (B,3,T,H,W) in [-1,1] of the original size."""
        return torch.cat(list(self.decode_stream(latents, **kwargs)), dim=2)


def _split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


EXPORT_CACHE_FORMAT = 2  # bump when the export code changes what an existing cache entry would hold


def export_cache_key(model: Any, config: Any) -> str:
    """Hex digest naming the export of ``model`` with ``config``: weights, architecture, options and tool versions.

    Any of these changing makes a different graph, so an entry made by an older torch, onnx or cvvae, with another
    opset or fp16 rule, or from other weights under the same file name is never reused.
    """
    import dataclasses
    import hashlib
    import json

    import onnx

    from .. import __version__

    info = model.checkpoint_info
    fields = {
        "format": EXPORT_CACHE_FORMAT,
        "weights": info.sha256 or info.source,  # random weights are seeded: their preset names them
        "config": model.config.summary(),
        "export": dataclasses.asdict(config),
        "versions": {"cvvae": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
    }
    text = json.dumps(fields, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, (set, frozenset))
                      else str(v))
    return hashlib.sha256(text.encode()).hexdigest()


def cache_root() -> Path:
    """``$CVVAE_CACHE``, else ``~/.cache/cvvae``."""
    import os

    return Path(os.environ.get("CVVAE_CACHE", Path.home() / ".cache" / "cvvae"))


def cached_export(path: str | Path | None, *, precision: str) -> Path:
    """Export a checkpoint once into the user cache for the onnxruntime backend, and reuse it while it is valid.

    The entry's name carries :func:`export_cache_key`. An fp32 request also accepts an existing fp16 entry (it holds
    the fp32 graphs too).
    """
    from ..export.to_onnx import ExportConfig, export_model
    from ..loading import load_model

    model = load_model(path)
    info = model.checkpoint_info
    label = info.sha256[:12] if info.sha256 else info.source.replace(":", "-")
    wanted = [ExportConfig(precisions=(precision,))]
    if precision == "fp32":
        wanted.append(ExportConfig(precisions=("fp16",)))
    root = cache_root() / "exports"
    entries = [root / f"{label}-{'-'.join(p.value for p in c.precisions)}-{export_cache_key(model, c)[:16]}"
               for c in wanted]
    for entry in entries:
        if (entry / "manifest.json").exists():
            return entry
    target = entries[0]
    log.warning("exporting %s to %s for the onnxruntime backend (once)", info.source, target)
    t0 = time.perf_counter()
    export_model(model, target, wanted[0], overwrite=target.exists())  # a leftover without manifest is replaced
    log.info("export took %.1f s", time.perf_counter() - t0)
    return target
