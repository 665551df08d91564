"""Calibration data: chunks cut from real videos at the sizes the runtime feeds the graphs.

The runtime runs the encoder on temporal chunks of ``chunk_frames + 1`` frames and spatial tiles of ``tile_size``
pixels (:mod:`cvvae.plan`), and the decoder on ``chunk_frames / 4 + 1`` latents of ``tile_size / 8`` cells. The
calibration chunks have exactly those shapes (or smaller ones chosen with :class:`ChunkSpec`), so the activation
ranges come from the inputs the graphs will see.

Sampling is deterministic for a seed: chunk ``i`` comes from clip ``i mod n``; the chunks of one clip start in equal
strata of its frames (so they rarely overlap) at a random frame and a random crop position. Held-out chunks (for
the sensitivity search) are drawn in the same pass after the calibration chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cvvae.config import Compression
from cvvae.errors import InputError
from cvvae.fsutil import sha256_file
from cvvae.plan import PlanSettings

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


def find_clips(paths: Iterable[str | Path]) -> list[Path]:
    """Video files named directly or found (not recursively) in the folders named; sorted, no duplicates."""
    clips: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise InputError(f"{p} holds no video files ({', '.join(VIDEO_SUFFIXES)})")
            clips.extend(found)
        elif p.is_file():
            clips.append(p)
        else:
            raise InputError(f"calibration clip {p} does not exist")
    unique = list(dict.fromkeys(c.resolve() for c in clips))
    if not unique:
        raise InputError("no calibration clips given: pass --data with video files or folders")
    return unique


@dataclass(frozen=True)
class ChunkSpec(Compression):
    """Shape of one calibration chunk (encoder input ``1 x 3 x frames x height x width``) and how to read it."""

    frames: int                      # 1 + chunk_frames: one encode chunk of the plan
    height: int                      # pixels; the plan's tile size
    width: int
    frame_stride: int = 1            # take every k-th source frame
    resize_short_side: int | None = None  # resize the video (short side, px) before cropping; None: native size
    time_compress: int = 4           # the model's (from_plan: the plan's)
    spatial_compress: int = 8

    def __post_init__(self) -> None:
        tc, s = self.time_compress, self.spatial_compress
        if self.frames < 1 or self.padded_frames(self.frames) != self.frames:
            raise InputError(f"a calibration chunk needs 1+{tc}k frames (one encode chunk), got {self.frames}")
        if min(self.height, self.width) < s or self.padded_pixels(self.height) != self.height \
                or self.padded_pixels(self.width) != self.width:
            raise InputError(f"calibration crops must be multiples of {s} px, got {self.height}x{self.width}")
        if self.frame_stride < 1:
            raise InputError(f"frame_stride must be >= 1, got {self.frame_stride}")

    @classmethod
    def from_plan(cls, settings: PlanSettings, *, chunk_frames: int | None = None, tile_size: int | None = None,
                  frame_stride: int = 1, resize_short_side: int | None = None) -> "ChunkSpec":
        """The plan's encode chunk and tile; overrides make calibration cheaper (smaller chunks, smaller tiles)."""
        frames = chunk_frames if chunk_frames is not None else settings.chunk_frames
        size = tile_size if tile_size is not None else settings.tile_size
        if frames is None or size is None:
            raise InputError("the export's plan has no temporal chunking or no tiling, so the chunk shape is open: "
                             "pass --chunk-frames and --tile-size")
        return cls(frames + 1, size, size, frame_stride, resize_short_side, settings.time_compress,
                   settings.spatial_compress)

    def latent_shape(self, latent_channels: int) -> tuple:
        """Decoder input of this chunk: (1, z, chunk/4 + 1, tile/8, tile/8)."""
        return (1, latent_channels, self.num_latent_frames(self.frames), self.latent_cells(self.height),
                self.latent_cells(self.width))

    def as_dict(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width,
                "frame_stride": self.frame_stride, "resize_short_side": self.resize_short_side}


@dataclass
class CalibrationChunk:
    """One chunk: where it was cut from, and its uint8 RGB frames (T, H, W, 3)."""

    clip: Path
    start: int       # first source frame
    top: int         # crop offset in the (resized) frame
    left: int
    frames: np.ndarray = field(repr=False)

    def pixels(self) -> np.ndarray:
        """float32 (1, 3, T, H, W) in [-1, 1], the encoder's input."""
        from cvvae.video_io import frames_to_tensor

        return frames_to_tensor(self.frames)[None]

    def where(self) -> list[int]:
        return [self.start, self.top, self.left]


@dataclass(frozen=True)
class DataFile:
    """A clip that chunks were taken from, identified by content."""

    path: str
    sha256: str
    num_frames: int
    height: int
    width: int
    fps: float

    def as_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "num_frames": self.num_frames,
                "size": [self.height, self.width], "fps": round(self.fps, 3)}


def describe_clips(clips: Sequence[Path]) -> list[DataFile]:
    from cvvae.video_io import probe_video

    out = []
    for clip in clips:
        info = probe_video(clip)
        out.append(DataFile(str(clip), sha256_file(clip), info.num_frames, info.height, info.width, info.fps))
    return out


def sample_chunks(clips: Sequence[str | Path], spec: ChunkSpec, count: int, *, seed: int = 0) -> list[CalibrationChunk]:
    """``count`` chunks of ``spec`` from ``clips``, deterministic for ``seed`` (see the module docstring)."""
    from cvvae.video_io import probe_video, read_video

    if count < 1:
        raise InputError(f"need at least one calibration chunk, got {count}")
    clips = [Path(c) for c in clips]
    rng = np.random.default_rng(seed)
    span = (spec.frames - 1) * spec.frame_stride + 1  # source frames one chunk covers
    per_clip = [len(range(i, count, len(clips))) for i in range(len(clips))]
    slots: dict[int, list[tuple[int, int, int]]] = {}
    for i, (clip, k) in enumerate(zip(clips, per_clip)):
        if k == 0:
            continue
        info = probe_video(clip)
        h, w = info.height, info.width
        if spec.resize_short_side:
            scale = spec.resize_short_side / min(h, w)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
        if info.num_frames < span or h < spec.height or w < spec.width:
            raise InputError(
                f"{clip.name} ({info.num_frames} frames of {h}x{w} px) is too small for a calibration chunk of "
                f"{spec.frames} frames every {spec.frame_stride} ({span} source frames) at {spec.height}x{spec.width}; "
                "use smaller --chunk-frames/--tile-size/--frame-stride or another clip")
        starts_max = info.num_frames - span  # last valid start
        edges = np.linspace(0, starts_max + 1, k + 1)
        slots[i] = []
        for j in range(k):
            lo, hi = int(edges[j]), max(int(edges[j]) + 1, int(edges[j + 1]))
            start = int(rng.integers(lo, min(hi, starts_max + 1)))
            top = int(rng.integers(0, h - spec.height + 1))
            left = int(rng.integers(0, w - spec.width + 1))
            slots[i].append((start, top, left))
    chunks: list[CalibrationChunk] = []
    taken = {i: 0 for i in slots}
    for n in range(count):
        i = n % len(clips)
        start, top, left = slots[i][taken[i]]
        taken[i] += 1
        frames, _ = read_video(clips[i], start=start, stride=spec.frame_stride, max_frames=spec.frames,
                               resize_short_side=spec.resize_short_side)
        if len(frames) < spec.frames:
            raise InputError(f"{clips[i].name}: read {len(frames)} frames from {start}, expected {spec.frames}")
        crop = np.ascontiguousarray(frames[:, top:top + spec.height, left:left + spec.width])
        chunks.append(CalibrationChunk(clips[i], start, top, left, crop))
        log.debug("chunk %d: %s frames %d.. crop (%d, %d)", n, clips[i].name, start, top, left)
    return chunks
