"""``VideoVAE``: the runtime that renderers embed (runtime issue; spec sections 5 and 6).

It loads one backend (PyTorch reference, ONNX Runtime, TensorRT), executes the one chunk/tile plan of
:mod:`cvvae.plan` through :mod:`cvvae.tiling`, and streams: ``encode_stream`` holds at most one temporal chunk of
frames, ``decode_stream`` yields frames chunk by chunk, so peak memory does not grow with video length.

Inputs are numpy arrays or any DLPack-capable array (torch, CuPy, JAX...): uint8 frames (T,H,W,3) or (B,T,H,W,3), or
float pixels in [-1, 1] (B,3,T,H,W) or (3,T,H,W). Outputs are arrays of the input's family (numpy in, numpy out;
torch in, torch out), see :mod:`cvvae.arrays`. Frame counts that are not 1+4k and sizes that are not
multiples of 8 are padded and cropped back, and the original size travels with the latents.

Thread safety: a ``VideoVAE`` holds its backend's sessions or engine contexts and must not be used by two threads at
once. Use one ``VideoVAE`` per thread (they may share nothing), or guard a shared one with a lock of your own
(docs/thin-runtime.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import arrays, tiling
from ..allocator import keep_memory
from ..arrays import Array
from ..config import Compression, ModelConfig
from ..errors import InputError
from ..export.contract import LOGVAR_CLAMP
from ..fsutil import cache_root
from ..latent_io import LatentFile, check_latent_matches, load_latents, save_latents
from ..memory import check_plan_fits
from ..plan import PlanSettings, VideoPlan, fit_plan, make_latent_plan, make_plan
from ..precision import PrecisionChoice, recorded_bf16_psnr, resolve_precision
from ..backend import Backend
from .backends import BACKENDS, default_backend

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]  # (frames done, total frames or None)
MomentsChunk = tuple[Array, Array, VideoPlan]  # (mean, logvar, plan) of one temporal chunk


@dataclass
class Latents:
    """Latent distribution of a video plus what decoding needs to return the original frames.

    ``mean`` and ``logvar`` are arrays of the family the frames came in (numpy, torch, CuPy...).
    """

    mean: Array                   # B,z,L,h,w
    logvar: Array | None
    num_frames: int | None        # the original video's size; None: the latent's full decoded size (see sized)
    height: int | None
    width: int | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def sized(self, config: Compression) -> "Latents":
        """These latents with every unknown size set to the full decoded size under ``config``'s compression
        (``4(L-1)+1`` frames of ``8h x 8w``: latents saved without the original size, raw arrays)."""
        if None not in (self.num_frames, self.height, self.width):
            return self
        _, _, t, h, w = self.mean.shape
        return replace(self, num_frames=self.num_frames or config.num_output_frames(t),
                       height=self.height or h * config.spatial_compress,
                       width=self.width or w * config.spatial_compress)

    def sample(self, rng: np.random.Generator | int | None = None) -> Array:
        """``mean + exp(logvar / 2) * noise`` with standard normal noise from ``rng`` (a numpy Generator or seed)."""
        if self.logvar is None:
            raise InputError("these latents carry no logvar, so they cannot be sampled; use .mean")
        noise = np.random.default_rng(rng).standard_normal(tuple(self.mean.shape), dtype=np.float32)
        xp = arrays.namespace(self.mean)
        return self.mean + xp.exp(0.5 * self.logvar) * arrays.like(noise, self.mean)

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
        mean = f.mean if f.mean.ndim == 5 else f.mean[None]
        logvar = None if f.logvar is None else (f.logvar if f.logvar.ndim == 5 else f.logvar[None])
        meta = {k: v for k, v in f.metadata.items() if k not in ("num_frames", "height", "width", "format")}
        return cls(mean, logvar, f.num_frames, f.height, f.width, meta)


def to_pixels(frames: Any) -> Array:
    """uint8 frames (T,H,W,3)/(B,T,H,W,3) or float pixels (B,3,T,H,W)/(3,T,H,W) -> float32 B,3,T,H,W in [-1,1].

    ``frames`` is a numpy array or any DLPack-capable array; the result is of the same family, on the same device.
    """
    try:
        x = arrays.as_array(frames)
    except InputError:
        raise InputError(f"frames must be a numpy array or a DLPack-capable array (torch, CuPy, JAX...), "
                         f"not {type(frames).__name__}") from None
    xp = arrays.namespace(x)
    if arrays.is_uint8(x):
        if x.ndim == 4:
            x = x[None]
        if x.ndim != 5 or x.shape[-1] != 3:
            raise InputError(f"uint8 frames must be (T,H,W,3) or (B,T,H,W,3) RGB, got {tuple(x.shape)}")
        y = xp.astype(xp.permute_dims(x, (0, 4, 1, 2, 3)), xp.float32)
        y /= 127.5
        y -= 1.0
        return y
    if not arrays.is_floating(x):
        raise InputError(f"frames of dtype {x.dtype} are not supported: pass uint8 RGB or float pixels in [-1, 1]")
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] != 3:
        raise InputError(f"float pixels must be (B,3,T,H,W) or (3,T,H,W), got {tuple(x.shape)}")
    return xp.astype(x, xp.float32, copy=False)


class VideoVAE:
    """Encode and decode videos of any length and size on one backend, chunk by chunk."""

    def __init__(self, backend: Backend, settings: PlanSettings | None = None, *, batch_tiles: bool = False,
                 max_memory: int | None = None, precision_choice: PrecisionChoice | None = None,
                 fixed: frozenset[str] = frozenset()) -> None:
        self.backend = backend
        self.settings = settings or backend.plan_settings
        self.batch_tiles = batch_tiles
        self.max_memory = max_memory  # bytes; None: the configured plan as is
        self.fixed = fixed  # plan settings the caller chose ("tile_size", "chunk_frames"): the budget keeps them
        self._precision_choice = precision_choice
        self._fitted: dict[tuple[Any, ...], PlanSettings] = {}

    @classmethod
    def load(cls, path: str | Path | None = None, *, backend: str | None = None, device: str = "cpu",
             precision: str = "fp32", batch_tiles: bool = False, plan_overrides: dict[str, Any] | None = None,
             max_memory: int | None = None, **backend_kwargs: Any) -> "VideoVAE":
        """Load a checkpoint (torch), an export directory (onnxruntime) or an engine directory (tensorrt).

        ``backend=None`` is ``torch`` where PyTorch is installed, else ``onnxruntime``. ``path=None`` is the built-in
        default model; with ``backend="onnxruntime"`` its shipped ONNX graphs run (other checkpoints are exported
        once into the cache, keyed by the checkpoint's sha256, which needs torch).
        ``precision="auto"`` follows :mod:`cvvae.precision`; ``max_memory`` (bytes) makes every plan fit that budget
        (:func:`cvvae.plan.fit_plan`) and turns ONNX Runtime's memory arena off. The C allocator keeps freed buffers
        for reuse (:mod:`cvvae.allocator`).
        """
        if backend is None:
            backend = default_backend()
            if backend != "torch":
                log.warning("PyTorch is not installed: using the %s backend", backend)
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(sorted(BACKENDS))}")
        keep_memory()
        if backend == "tensorrt" and device == "cpu":
            device = "cuda"  # engines run on a GPU; "cpu" is only the CLI-wide default
        choice = resolve_precision(precision, backend=backend, device=device)
        if backend == "onnxruntime" and path is None and shipped_graphs(choice.precision) is not None:
            path = shipped_graphs(choice.precision)
        elif backend == "onnxruntime" and (path is None or not (Path(path) / "manifest.json").exists()):
            path = cached_export(path, precision=choice.precision)
        if backend == "onnxruntime" and max_memory is not None:
            backend_kwargs.setdefault("cpu_mem_arena", False)
        if backend == "torch" and choice.precision == "bf16" and choice.requested == "auto":
            impl, choice = _load_auto_bf16(path, device, choice, backend_kwargs)
        else:
            impl = BACKENDS[backend](path, device=device, precision=choice.precision, **backend_kwargs)
        settings = PlanSettings.from_config(impl.config, **(plan_overrides or {}))
        fixed = frozenset(k for k in ("tile_size", "chunk_frames") if k in (plan_overrides or {}))
        return cls(impl, settings, batch_tiles=batch_tiles, max_memory=max_memory, precision_choice=choice,
                   fixed=fixed)

    @property
    def precision_choice(self) -> PrecisionChoice:
        """The precision this runtime computes in and why (after ``auto``'s first-tile check, once it ran)."""
        guarded = getattr(self.backend, "choice", None)
        if guarded is not None:
            return guarded
        precision = self.backend.precision
        return self._precision_choice or PrecisionChoice(precision, precision, "requested")

    # ----- plan -----------------------------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    @property
    def sliced(self) -> bool:
        """The backend runs large layers a few frames at a time (the torch reference, :mod:`cvvae.slicing`): the
        memory estimate counts its layers so; exported graphs run them whole."""
        return getattr(self.backend, "name", None) == "torch"

    def plan(self, num_frames: int, height: int, width: int,
             directions: tuple[str, ...] = ("encode", "decode")) -> VideoPlan:
        return make_plan(self.settings_for(num_frames, height, width, directions), num_frames, height, width)

    def settings_for(self, num_frames: int, height: int, width: int,
                     directions: tuple[str, ...] = ("encode", "decode")) -> PlanSettings:
        """The configured plan settings, or (with ``max_memory``) those that fit the budget for this frame size.

        With temporal chunking the fit depends only on the frame size (it plans for a full chunk), so every plan of
        a stream uses the same settings whatever the final frame count.
        """
        if self.max_memory is None:
            return self.settings
        chunk = self.settings.chunk_frames
        frames = chunk + 1 if chunk else num_frames
        key = (frames, height, width, directions)
        if key not in self._fitted:
            half = self.backend.precision in ("bf16", "fp16")
            what = (f"a {num_frames}x{height}x{width} video" if frames == num_frames else
                    f"a {num_frames}x{height}x{width} video (planned per chunk of {frames} frames)")
            settings, note = fit_plan(self.config, self.settings, frames, height, width, self.max_memory, directions,
                                      fixed_tiles="tile_size" in self.fixed, fixed_chunks="chunk_frames" in self.fixed,
                                      what=what, dtype_bytes=2 if half else 4, batch_tiles=self.batch_tiles,
                                      sliced=self.sliced)
            if note:
                log.warning("%s", note)
            self._fitted[key] = settings
        return self._fitted[key]

    def check_memory(self, num_frames: int, height: int, width: int, *, batch: int = 1,
                     direction: str = "both") -> None:
        """Refuse a video whose plan needs more memory than is available, before any frame is read or decoded."""
        check_plan_fits(self.plan(num_frames, height, width), self.config, batch=batch,
                        batch_tiles=self.batch_tiles, direction=direction, sliced=self.sliced)

    # ----- encode ---------------------------------------------------------------------------------------------
    def encode(self, frames: Any, *, metadata: dict[str, Any] | None = None,
               on_progress: ProgressFn | None = None) -> Latents:
        """Encode a whole video held in memory (see :meth:`encode_stream` for long videos)."""
        x = to_pixels(frames)
        return self._collect(self.encode_stream([x], total_frames=x.shape[2], on_progress=on_progress),
                             metadata)

    def encode_stream(self, frame_chunks: Iterable[Any], *, total_frames: int | None = None,
                      on_progress: ProgressFn | None = None) -> Iterator[MomentsChunk]:
        """Yield (mean, logvar, plan) for each temporal chunk as soon as its frames have arrived.

        ``frame_chunks`` yields frames in any grouping (uint8 or float, as :meth:`encode` takes). The last item
        carries the final plan (the true frame count); when the last chunk ended on the last frame its arrays are
        empty. The arrays are of the family of the frames given.
        """
        session = self.encode_session(total_frames=total_frames, on_progress=on_progress)
        for piece in frame_chunks:
            yield from session.push(piece)
        yield from session.finish()

    def encode_session(self, *, total_frames: int | None = None,
                       on_progress: ProgressFn | None = None) -> "EncodeSession":
        """A push-style encoder for frames that arrive one by one (a renderer's loop), see :class:`EncodeSession`."""
        return EncodeSession(self, total_frames=total_frames, on_progress=on_progress)

    def _collect(self, stream: Iterator[MomentsChunk],
                 metadata: dict[str, Any] | None) -> Latents:
        means, logvars, plan = [], [], None
        for mean, logvar, plan in stream:
            if mean.ndim == 5:
                means.append(mean)
                logvars.append(logvar)
        meta = {**self.backend.identity, "plan": plan.describe(), "backend": self.backend.name,
                **self.precision_choice.as_metadata(), **(metadata or {})}
        return Latents(tiling.concat_time(means), tiling.concat_time(logvars), plan.num_frames, plan.height,
                       plan.width, meta)

    def encode_video(self, path: str | Path, *, chunk_size: int = 16, on_progress: ProgressFn | None = None,
                     **read_kwargs: Any) -> Latents:
        """Encode a video file, reading it chunk by chunk (PyAV); fps and source go into the metadata."""
        from ..video_io import iter_video_frames, probe_video, selected_shape

        info = probe_video(path)
        total, height, width = selected_shape(path, **read_kwargs)
        self.check_memory(total, height, width, direction="encode")  # before a frame is read
        frames = iter_video_frames(path, chunk_size=chunk_size, **read_kwargs)
        fps = info.fps / read_kwargs.get("stride", 1)
        return self._collect(self.encode_stream(frames, total_frames=total, on_progress=on_progress),
                             {"fps": fps, "source_video": str(path)})

    # ----- decode ---------------------------------------------------------------------------------------------
    def decode_stream(self, latents: Latents | Array, *, on_progress: ProgressFn | None = None,
                      check_model: bool = True) -> Iterator[Array]:
        """Yield float pixels (B,3,t,H,W) in [-1,1], chunk by chunk, cropped to the original size.

        The pixels are arrays of the latents' family (numpy latents, numpy pixels; torch, torch; ...).
        """
        if not isinstance(latents, Latents):
            z = arrays.as_array(latents)
            latents = Latents(z if z.ndim == 5 else z[None], None, None, None, None)
        latents = latents.sized(self.config)
        if check_model:
            check_latent_matches(LatentFile(latents.mean, latents.logvar, metadata=latents.metadata), self.config,
                                 self.backend.identity.get("model_sha256"))
        z = arrays.as_array(latents.mean)
        xp = arrays.namespace(z)
        settings = self.settings_for(latents.num_frames, latents.height, latents.width, ("decode",))
        plan = make_latent_plan(settings, z.shape[2], z.shape[3], z.shape[4], num_frames=latents.num_frames,
                                height=latents.height, width=latents.width)
        check_plan_fits(plan, self.config, batch=z.shape[0], batch_tiles=self.batch_tiles, direction="decode",
                        sliced=self.sliced)
        done = 0
        for pixels in tiling.iter_decode(self.backend.decoder, xp.astype(z, xp.float32, copy=False), plan,
                                         batch_tiles=self.batch_tiles):
            done += pixels.shape[2]
            if on_progress:
                on_progress(done, plan.num_frames)
            yield pixels
            del pixels  # the consumer may drop the chunk before the next one is decoded

    def decode(self, latents: Latents | Array, **kwargs: Any) -> Array:
        """Decode to float pixels (B,3,T,H,W) in [-1,1] of the original size."""
        return tiling.concat_time(list(self.decode_stream(latents, **kwargs)))


def _load_auto_bf16(path: Any, device: str, choice: PrecisionChoice,
                    backend_kwargs: dict[str, Any]) -> tuple[Backend, PrecisionChoice]:
    """``auto`` chose bf16: use it directly for a checkpoint with recorded bf16 accuracy, else guard the first tile."""
    from .backends import TorchBackend
    from .precision_guard import Bf16Guard

    fp32 = TorchBackend.load(path, device=device, precision="fp32", **backend_kwargs)
    recorded = recorded_bf16_psnr(fp32.identity.get("model_sha256"))
    if recorded is None:
        return Bf16Guard(fp32, choice), choice
    reason = f"{choice.reason}; bf16 accuracy recorded for this checkpoint ({recorded:.1f} dB vs fp32)"
    import torch

    return TorchBackend(fp32.model.to(torch.bfloat16), "bf16"), PrecisionChoice("auto", "bf16", reason)


class EncodeSession:
    """Push frames as they are produced; each temporal chunk's latents come back as soon as its frames are in.

    Holds at most one chunk of frames (spec 6.2), whatever the video's length. :meth:`push` takes frames in any
    grouping (one frame, as a renderer makes them, or many; uint8 or float, as :meth:`VideoVAE.encode` takes) and
    returns the (mean, logvar, plan) of every chunk completed; :meth:`finish` encodes the rest and returns the last
    chunks, whose plan is the final one (the true frame count). When the last chunk ended on the last frame, finish
    returns one item with empty arrays that still carries the final plan.
    """

    def __init__(self, vae: VideoVAE, *, total_frames: int | None = None,
                 on_progress: ProgressFn | None = None) -> None:
        self.vae, self.total_frames, self.on_progress = vae, total_frames, on_progress
        self.streamer: tiling.StreamingEncoder | None = None
        self.plan: VideoPlan | None = None
        self.frames_done = 0
        self._family: tuple[Any, Any] | None = None  # namespace and device of the frames, for an empty result

    def push(self, frames: Any) -> list[MomentsChunk]:
        """Add frames; return the latents of every chunk they completed (often none)."""
        x = to_pixels(frames)
        if x.shape[1] != self.vae.config.in_channels:
            raise InputError(f"frames have {x.shape[1]} channels, the model takes {self.vae.config.in_channels}")
        if self.plan is None:
            self.plan = self.vae.plan(max(1, x.shape[2]), x.shape[3], x.shape[4], ("encode",))
            self.vae.check_memory(self.total_frames or self.plan.num_frames, self.plan.height, self.plan.width,
                                  batch=x.shape[0], direction="encode")
            self.streamer = tiling.StreamingEncoder(self.vae.backend.encoder, self.plan,
                                                    batch_tiles=self.vae.batch_tiles)
        elif x.shape[3:] != (self.plan.height, self.plan.width):
            raise InputError(f"frame size changed mid-stream from {self.plan.height}x{self.plan.width} to "
                             f"{x.shape[3]}x{x.shape[4]}")
        self.frames_done += x.shape[2]
        self._family = arrays.namespace(x), arrays.array_device(x)
        done = [(*_split_moments(moments), self.plan) for moments in self.streamer.push(tiling.pad_space(x, self.plan))]
        if self.on_progress:
            self.on_progress(self.frames_done, self.total_frames)
        return done

    def finish(self) -> list[MomentsChunk]:
        """Encode what is left; the items carry the final plan."""
        if self.streamer is None:
            raise InputError("no frames to encode: the input is empty")
        final = self.vae.plan(self.frames_done, self.plan.height, self.plan.width, ("encode",))
        tail = list(self.streamer.finish())
        if not tail:  # the last chunk ended on the last frame: still hand over the final plan
            xp, device = self._family
            empty = xp.empty((0,), dtype=xp.float32, device=device)
            return [(empty, empty, final)]
        return [(*_split_moments(moments), final) for moments in tail]


def _split_moments(moments: Array) -> tuple[Array, Array]:
    z = moments.shape[1] // 2
    return moments[:, :z], arrays.namespace(moments).clip(moments[:, z:], *LOGVAR_CLAMP)


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
    import torch

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


def cached_export(path: str | Path | None, *, precision: str) -> Path:
    """Export a checkpoint once into the user cache for the onnxruntime backend, and reuse it while it is valid.

    The entry's name carries :func:`export_cache_key`. An fp32 request also accepts an existing fp16 entry (it holds
    the fp32 graphs too).
    """
    from ..extras import require

    require("torch", "exporting a checkpoint for the onnxruntime backend (or pass an export directory)")
    from ..export.manifest import load_manifest
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
            # verified like any export (the backend checks again, from the hash cache): a tampered entry is refused
            load_manifest(entry).check_files(fix=f"delete {entry}; it is exported again on the next run")
            return entry
    target = entries[0]
    log.warning("exporting %s to %s for the onnxruntime backend (once)", info.source, target)
    t0 = time.perf_counter()
    export_model(model, target, wanted[0], overwrite=target.exists())  # a leftover without manifest is replaced
    log.info("export took %.1f s", time.perf_counter() - t0)
    return target


def shipped_graphs(precision: str = "fp32") -> Path | None:
    """The built-in default model's ONNX export (package data next to its weights), if it holds ``precision``."""
    from ..default_model import DEFAULT_GRAPHS
    from ..export.manifest import load_manifest

    if not (DEFAULT_GRAPHS / "manifest.json").exists():
        return None
    return DEFAULT_GRAPHS if precision in load_manifest(DEFAULT_GRAPHS).precisions("encoder") else None
