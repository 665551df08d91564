"""Clips and shards: :class:`ClipPolicy` cuts fixed-length clips (1+4k frames, stride, step, at most N per video)
from each probed manifest row and sizes them to the nearest bucket; :func:`make_clips` orders them by (path, start,
row) with stable ids and :func:`make_shards` groups them into numbered shards. :func:`probe_record` is the probe
each row's video gets once (in a Ray task or in this process).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cvvae.errors import DatasetError

from .common import HW
from .manifest import ManifestRow


@dataclass(frozen=True)
class ClipPolicy:
    """How clips are cut from a video and sized. Frame numbers are source frame indices."""

    num_frames: int = 17                 # frames per clip, 1+4k: the VAE's 4x time compression needs no padding
    stride: int = 1                      # every stride-th source frame (clip fps = source fps / stride)
    step: int | None = None              # source frames from one clip start to the next; None: back to back
    max_clips_per_video: int | None = None   # when more fit, one from the middle of each of N equal parts
    buckets: tuple[HW, ...] = ()         # output sizes (H, W); each video goes to the nearest aspect ratio
    resize: str = "cover"                # cover: scale to cover the bucket, centre-crop; stretch: resize exactly

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise DatasetError(f"clip length {self.num_frames} is not 1+4k frames (1, 5, 9, 13, 17, ...); the VAE "
                               "compresses time 4x after the first frame")
        for name in ("stride", "step", "max_clips_per_video"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DatasetError(f"clip {name} must be >= 1, got {value}")
        if self.resize not in ("cover", "stretch"):
            raise DatasetError(f"resize must be 'cover' or 'stretch', not {self.resize!r}")
        buckets = tuple((int(h), int(w)) for h, w in self.buckets)
        if any(h < 1 or w < 1 for h, w in buckets):
            raise DatasetError(f"size buckets must be positive (H, W) pairs, got {list(self.buckets)}")
        object.__setattr__(self, "buckets", buckets)

    @property
    def span(self) -> int:
        """Source frames from a clip's first frame to its last, inclusive."""
        return (self.num_frames - 1) * self.stride + 1

    def clip_starts(self, start: int, end: int) -> list[int]:
        """First source frame of every clip cut from frames ``[start, end)``."""
        starts = list(range(start, end - self.span + 1, self.step or self.span))
        n = self.max_clips_per_video
        if n is not None and len(starts) > n:  # the middle candidate of each of n equal parts
            starts = [starts[(2 * i + 1) * len(starts) // (2 * n)] for i in range(n)]
        return starts

    def bucket_for(self, height: int, width: int) -> HW | None:
        """The bucket whose aspect ratio is nearest (in log ratio) the video's; the first one on a tie."""
        if not self.buckets:
            return None
        aspect = math.log(width / height)
        return min(self.buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))

    def resize_for(self, height: int, width: int) -> tuple[HW | None, HW | None]:
        """``(size, center_crop)`` read arguments that bring a height x width video to its bucket."""
        bucket = self.bucket_for(height, width)
        if bucket is None or self.resize == "stretch":
            return bucket, None
        bh, bw = bucket
        scale = max(bh / height, bw / width)
        size = (max(bh, round(height * scale)), max(bw, round(width * scale)))
        return size, (bucket if size != bucket else None)


@dataclass(frozen=True)
class Clip:
    """One clip: what to read (``read_kwargs``, as ``cvvae encode`` takes them) and what to record."""

    index: int                 # position in the plan (clips sorted by path, start, row)
    clip_id: str               # stable hash of (path, row, start, stride, frames, size, crop)
    row: int
    path: str
    start: int                 # first source frame
    end: int                   # one past the last source frame
    stride: int
    num_frames: int
    fps: float                 # of the clip's frames: source fps / stride
    source_fps: float
    source_height: int
    source_width: int
    height: int                # of the clip's frames (after resize/crop)
    width: int
    size: HW | None = None
    center_crop: HW | None = None
    columns: dict[str, Any] = field(default_factory=dict)

    def read_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"start": self.start, "end": self.end, "stride": self.stride}
        if self.size:
            kw["size"] = self.size
        if self.center_crop:
            kw["center_crop"] = self.center_crop
        return kw

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["center_crop"] = list(self.center_crop) if self.center_crop else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Clip":
        d = dict(d)
        for key in ("size", "center_crop"):
            d[key] = tuple(d[key]) if d.get(key) else None
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def from_json(cls, text: str) -> "Clip":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class ShardSpec:
    shard_id: str              # "000012"
    clips: range               # plan indices of its clips

    @property
    def file(self) -> str:
        return f"shards/shard-{self.shard_id}.safetensors"


def make_clips(rows: Sequence[ManifestRow], probes: Mapping[int, Mapping[str, Any]],
               policy: ClipPolicy) -> tuple[list[Clip], list[dict[str, Any]]]:
    """Clips of every probed row, sorted by (path, start, row), and the rows that gave none (with the reason)."""
    clips: list[Clip] = []
    skipped: list[dict[str, Any]] = []
    for row in rows:
        probe = probes[row.row]
        if "error" in probe:
            skipped.append(_problem("probe", row, probe["error"]))
            continue
        n = probe["num_frames"]
        start, end = row.start or 0, n if row.end is None else row.end
        if not 0 <= start < end <= n:
            skipped.append(_problem("range", row, f"frames [{start}, {end}) do not fit the video's {n} frames"))
            continue
        starts = policy.clip_starts(start, end)
        if not starts:
            skipped.append(_problem("too_short", row, f"frames [{start}, {end}) are {end - start} frames; a clip "
                                    f"spans {policy.span} ({policy.num_frames} frames at stride {policy.stride})"))
            continue
        size, crop = policy.resize_for(probe["height"], probe["width"])
        height, width = crop or size or (probe["height"], probe["width"])
        for s in starts:
            key = json.dumps([row.path, row.row, s, policy.stride, policy.num_frames, size, crop])
            clips.append(Clip(-1, hashlib.sha256(key.encode()).hexdigest()[:16], row.row, row.path, s,
                              s + policy.span, policy.stride, policy.num_frames, probe["fps"] / policy.stride,
                              probe["fps"], probe["height"], probe["width"], height, width, size, crop,
                              row.columns))
    clips.sort(key=lambda c: (c.path, c.start, c.row))
    return [replace(c, index=i) for i, c in enumerate(clips)], skipped


def make_shards(num_clips: int, clips_per_shard: int) -> list[ShardSpec]:
    """Consecutive groups of ``clips_per_shard`` clips; ids are the group numbers, zero-padded."""
    if clips_per_shard < 1:
        raise DatasetError(f"clips per shard must be >= 1, got {clips_per_shard}")
    return [ShardSpec(f"{i:06d}", range(lo, min(lo + clips_per_shard, num_clips)))
            for i, lo in enumerate(range(0, num_clips, clips_per_shard))]


def _problem(kind: str, row: ManifestRow, reason: str) -> dict[str, Any]:
    return {"kind": kind, "row": row.row, "path": row.path, "reason": reason}


def probe_record(record: dict[str, Any]) -> dict[str, Any]:
    """``{"row", "path"}`` -> the same plus ``"probe"``: JSON of the video's frames, fps and size, or its error."""
    from cvvae.video_io import probe_video

    try:
        info = probe_video(record["path"])
        probe = {"num_frames": info.num_frames, "fps": info.fps, "height": info.height, "width": info.width,
                 "codec": info.codec}
    except Exception as e:  # one bad video must not stop the plan: it is recorded and skipped
        probe = {"error": f"{type(e).__name__}: {e}"}
    return {**record, "probe": json.dumps(probe)}
