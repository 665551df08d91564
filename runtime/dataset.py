"""Dataset encoding: a manifest of videos -> fixed-length clips -> resumable shards of latents.

One pipeline, two executors (``local``: in this process; ``ray``: Ray Data on a local instance or a cluster):

1. :func:`read_manifest` turns INPUTS (a directory, a glob, a text list of paths, a CSV/TSV/Parquet/JSONL
   manifest) into :class:`ManifestRow` s: path, optional frame range ``[start, end)``, other columns passed through.
2. Every row's video is probed once (Ray tasks, or here). :class:`ClipPolicy` cuts clips (1+4k frames, stride,
   step, at most N per video, resized/cropped to a size bucket); clips are sorted by (path, start, row) and grouped
   into shards of ``clips_per_shard`` with ids ``000000, 000001, ...``. The rows, probe results and settings are
   kept in ``plan.json`` under a fingerprint, so a rerun sees exactly the same shards without probing again.
3. Clips of the shards not yet complete are decoded (:func:`decode_clip`: CPU tasks under Ray) and encoded by
   :class:`ClipEncoder` (one :class:`~cvvae.runtime.api.VideoVAE` each: an actor pool under Ray). The
   :class:`ShardWriter` on the driver writes each shard atomically once all its clips are in, appends it to
   ``journal.jsonl`` (fsync'd) and refreshes ``index.json`` and ``errors.jsonl`` every few seconds.

Output folder::

    plan.json        format, fingerprint, settings (clip policy, shard size, encoder), manifest rows + probes
    index.json       model identity, totals, every shard (status, file, sha256, bytes, clips, frames, errors), runs
    journal.jsonl    one line per committed shard: what a killed run leaves for the next one
    errors.jsonl     every video or clip that was skipped, with the stage and the reason
    shards/shard-000000.safetensors
                     tensors "{pos:04d}/mean" + "{pos:04d}/logvar" (or "{pos:04d}/sample") per clip, float32,
                     (1, z, 1+(T-1)//4, H/8, W/8); metadata "cvvae_shard" = JSON header with the clip records

A rerun skips every shard whose journal/index entry matches its file (size and sha256), so a killed job loses at most
the shards in flight. Videos that cannot be probed or decoded are recorded and skipped; clips that fail to *encode*
(e.g. out of memory) leave their shard uncommitted, so the next run retries it.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cvvae.errors import BackendUnavailableError, InputError
from cvvae.fsutil import atomic_path, sha256_file

log = logging.getLogger(__name__)

FORMAT = "cvvae-dataset/1"
SHARD_FORMAT = "cvvae-dataset-shard/1"
SHARD_HEADER_KEY = "cvvae_shard"  # the one safetensors metadata entry: JSON of format, shard, model, clips, ...
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"})
RESERVED_COLUMNS = ("path", "start", "end")  # everything else in a manifest row is passed through
LATENT_MODES = ("moments", "sample")
RAY_HINT = ("Ray is an optional extra: pip install 'cvvae-deploy[ray]' (ray[data] and pyarrow), "
            "or encode in this process with --executor local")
KILL_AFTER_ENV = "CVVAE_DATASET_KILL_AFTER_SHARDS"  # fault injection: SIGKILL this process after N commits
INDEX_FLUSH_S = 5.0

HW = tuple[int, int]
ProgressFn = Callable[[int, int | None], None]  # (clip frames done, total clip frames)


class DatasetError(InputError):
    """A manifest, clip policy or output folder that cannot be used as it is."""


# ---------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestRow:
    """One video of the manifest: frames ``[start, end)`` (source indices; None: from the first / to the last)."""

    row: int                       # position among all INPUTS, from 0
    path: str                      # absolute
    start: int | None = None
    end: int | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # caption, ids, ...: copied into every clip record


def read_manifest(inputs: str | Path | Sequence[str | Path]) -> list[ManifestRow]:
    """Rows of one or more INPUTS, in order.

    Each input is a directory (its video files, recursively, sorted), a glob (``clips/**/*.mp4``; the matching
    files, sorted), a video file, a text list (``.txt``/``.lst``: one path per line, ``#`` comments), or a
    manifest (``.csv``/``.tsv``/``.parquet``/``.jsonl``) with a ``path`` column, optional ``start``/``end``
    (source frames, end exclusive) and any other columns (passed through). Relative paths in a list or manifest
    are relative to that file's folder.
    """
    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not specs:
        raise DatasetError("no INPUTS: pass a directory, a glob, a text list of paths or a CSV/Parquet manifest")
    rows: list[ManifestRow] = []
    for spec in specs:
        for where, record in _read_input(str(spec)):
            rows.append(_to_row(len(rows), record, where))
    return rows


def _read_input(spec: str) -> list[tuple[str, dict[str, Any]]]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        if not files:
            raise DatasetError(f"directory {path} holds no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
        return [(str(path), {"path": str(p.resolve())}) for p in files]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            return [(str(path), {"path": str(path.resolve())})]
        reader = _MANIFEST_READERS.get(suffix)
        if reader is None:
            raise DatasetError(
                f"cannot tell what {path} is from its suffix {suffix or '(none)'!r}: pass a directory, a glob, a "
                f"video, a path list (.txt/.lst) or a manifest ({', '.join(sorted(_MANIFEST_READERS))})")
        base = path.resolve().parent
        out = []
        for n, record in enumerate(reader(path), 1):
            where = f"{path} row {n}"
            value = record.get("path")
            if value is None or str(value).strip() == "":
                raise DatasetError(f"{where} has no 'path' (columns: {', '.join(map(str, record)) or 'none'}); "
                                   "a manifest needs a 'path' column")
            record["path"] = str((base / Path(str(value).strip()).expanduser()).resolve())
            out.append((where, record))
        return out
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(m).resolve() for m in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise DatasetError(f"glob {spec!r} matches no files (cwd {Path.cwd()})")
        return [(spec, {"path": str(p)}) for p in files]
    raise DatasetError(f"input {spec} does not exist (cwd {Path.cwd()}); pass a directory, a glob, a video, "
                       "a text list of paths or a CSV/Parquet manifest")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(r) for r in csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DatasetError(f"reading the Parquet manifest {path} needs pyarrow: pip install 'cvvae-deploy[ray]' "
                           "(or pip install pyarrow), or pass a CSV manifest") from e
    return pq.read_table(path).to_pylist()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} line {n} is not JSON: {e}") from e
        records.append(value if isinstance(value, dict) else {"path": value})
    return records


def _read_list(path: Path) -> list[dict[str, Any]]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [{"path": line} for line in lines if line and not line.startswith("#")]


_MANIFEST_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet, ".pq": _read_parquet, ".jsonl": _read_jsonl,
    ".txt": _read_list, ".lst": _read_list, ".list": _read_list,
}


def _to_row(index: int, record: dict[str, Any], where: str) -> ManifestRow:
    columns = {str(k): _jsonable(v) for k, v in record.items() if k not in RESERVED_COLUMNS}
    return ManifestRow(index, str(record["path"]), _frame_number(record.get("start"), "start", where),
                       _frame_number(record.get("end"), "end", where), columns)


def _frame_number(value: Any, name: str, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {name}={value!r} is not a frame number") from None
    if number != int(number) or number < 0:
        raise DatasetError(f"{where}: {name}={value!r} must be a whole frame number >= 0")
    return int(number)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


# ---------------------------------------------------------------------------------------------------- clips


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
    from cvvae.runtime.video_io import probe_video

    try:
        info = probe_video(record["path"])
        probe = {"num_frames": info.num_frames, "fps": info.fps, "height": info.height, "width": info.width,
                 "codec": info.codec}
    except Exception as e:  # one bad video must not stop the plan: it is recorded and skipped
        probe = {"error": f"{type(e).__name__}: {e}"}
    return {**record, "probe": json.dumps(probe)}


# ---------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class EncoderSpec:
    """What each encoder loads, as :func:`cvvae.runtime.cli.load_runtime` does, plus the kind of latents kept."""

    model: str | None = None
    backend: str = "torch"
    device: str = "cpu"              # "auto": cuda when the machine/cluster has GPUs, else cpu
    precision: str = "fp32"
    batch_tiles: bool = False
    preset: str | None = None
    plan_overrides: Mapping[str, Any] = field(default_factory=dict)
    latents: str = "moments"         # moments: mean + logvar; sample: one draw per clip, its seed recorded
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latents not in LATENT_MODES:
            raise DatasetError(f"latents must be one of {', '.join(LATENT_MODES)}, not {self.latents!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """What changes the latents (the device does not, beyond rounding; batch_tiles is exact)."""
        fields = {"model": self.model, "preset": self.preset, "backend": self.backend, "precision": self.precision,
                  "plan_overrides": dict(self.plan_overrides), "latents": self.latents}
        if self.latents == "sample":
            fields["seed"] = self.seed
        return fields

    def load(self) -> Any:
        from cvvae.runtime.api import VideoVAE

        extra = {"preset": self.preset} if self.preset else {}
        return VideoVAE.load(self.model, backend=self.backend, device=self.device, precision=self.precision,
                             batch_tiles=self.batch_tiles, plan_overrides=dict(self.plan_overrides), **extra)


@dataclass
class DatasetPlan:
    fingerprint: str
    settings: dict[str, Any]
    rows: list[ManifestRow]
    probes: dict[int, dict[str, Any]]
    clips: list[Clip]
    shards: list[ShardSpec]
    skipped: list[dict[str, Any]]   # rows that gave no clips: probe failure, frame range, too short

    @property
    def clips_per_shard(self) -> int:
        return int(self.settings["clips_per_shard"])

    def shard_of(self, clip_index: int) -> ShardSpec:
        return self.shards[clip_index // self.clips_per_shard]

    @classmethod
    def build(cls, rows: list[ManifestRow], probes: Mapping[int, Mapping[str, Any]],
              settings: dict[str, Any]) -> "DatasetPlan":
        policy = ClipPolicy(**{**settings["policy"], "buckets": tuple(map(tuple, settings["policy"]["buckets"]))})
        clips, skipped = make_clips(rows, probes, policy)
        shards = make_shards(len(clips), settings["clips_per_shard"])
        return cls(plan_fingerprint(rows, settings), settings, rows, {k: dict(v) for k, v in probes.items()},
                   clips, shards, skipped)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows], "probes": {str(k): v for k, v in self.probes.items()},
                "created_at": _now()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "DatasetPlan":
        rows = [ManifestRow(**r) for r in doc["rows"]]
        return cls.build(rows, {int(k): v for k, v in doc["probes"].items()}, doc["settings"])


def plan_settings(policy: ClipPolicy, clips_per_shard: int, encoder: EncoderSpec) -> dict[str, Any]:
    policy_doc = asdict(policy)
    policy_doc["buckets"] = [list(b) for b in policy.buckets]
    return {"policy": policy_doc, "clips_per_shard": clips_per_shard, "encoder": encoder.fingerprint_fields()}


def plan_fingerprint(rows: Sequence[ManifestRow], settings: Mapping[str, Any]) -> str:
    doc = {"settings": settings, "rows": [asdict(r) for r in rows]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- workers

EMPTY_FRAMES = np.zeros((0, 1, 1, 3), np.uint8)     # same rank as real frames, so Ray keeps one tensor column
EMPTY_LATENT = np.zeros((0, 0, 0, 0, 0), np.float32)


def decode_clip(row: dict[str, Any]) -> dict[str, Any]:
    """``{"clip": json}`` -> plus ``frames`` (uint8 T,H,W,3) or ``error``; never raises for a bad video."""
    from cvvae.runtime.video_io import VideoError, read_video

    clip = Clip.from_json(row["clip"])
    t0 = time.perf_counter()
    frames, error = EMPTY_FRAMES, ""
    try:
        frames, _ = read_video(clip.path, **clip.read_kwargs())
        if frames.shape[0] != clip.num_frames:
            raise VideoError(f"decoded {frames.shape[0]} of the clip's {clip.num_frames} frames (source frames "
                             f"{clip.start}..{clip.end - 1}); the file is probably truncated")
    except Exception as e:  # a corrupt video is recorded in errors.jsonl and skipped, whatever the exception
        frames, error = EMPTY_FRAMES, f"{type(e).__name__}: {e}"
    return {"clip": row["clip"], "frames": frames, "error": error, "decode_s": time.perf_counter() - t0,
            "decode_pid": os.getpid()}


def clip_seed(seed: int, clip_id: str) -> int:
    """Seed of one clip's sample: a function of the run seed and the clip id only (not of scheduling)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()[:8], "big") >> 1


class ClipEncoder:
    """Encodes decoded clips with one VideoVAE: one per Ray actor, or one in this process."""

    def __init__(self, spec: EncoderSpec, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.vae = spec.load()
        self.identity = json.dumps({**self.vae.backend.identity, "backend": self.vae.backend.name,
                                    "precision": self.vae.backend.precision}, sort_keys=True)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = {"clip": row["clip"], "mean": EMPTY_LATENT, "logvar": EMPTY_LATENT, "error": row["error"],
               "stage": "decode" if row["error"] else "", "seed": -1, "decode_s": row["decode_s"], "encode_s": 0.0,
               "decode_pid": row["decode_pid"], "encode_pid": os.getpid(), "identity": self.identity}
        if row["error"]:
            return out
        t0 = time.perf_counter()
        try:
            latents = self.vae.encode(np.array(row["frames"]))  # a copy: Ray hands over read-only buffers
            mean, logvar = latents.mean.float().cpu(), latents.logvar.float().cpu()
            if self.spec.latents == "sample":
                clip_id = json.loads(row["clip"])["clip_id"]
                out["seed"] = clip_seed(self.spec.seed, clip_id)
                noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(out["seed"]))
                mean, logvar = mean + torch.exp(0.5 * logvar) * noise, None
            out["mean"] = mean.numpy()
            out["logvar"] = EMPTY_LATENT if logvar is None else logvar.numpy()
        except Exception as e:  # e.g. out of memory on one huge clip: its shard is retried by the next run
            log.warning("encoding clip %s failed: %s", json.loads(row["clip"])["clip_id"], e)
            out.update(error=f"{type(e).__name__}: {e}", stage="encode")
        out["encode_s"] = time.perf_counter() - t0
        return out


# ---------------------------------------------------------------------------------------------------- output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class DatasetState:
    """What is on disk: committed shards (verified), the model that made them, earlier runs."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # shard -> encode errors (retried)


class DatasetDir:
    """The output folder (layout in the module docstring); one run at a time holds its lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.plan_path = self.root / "plan.json"
        self.index_path = self.root / "index.json"
        self.journal_path = self.root / "journal.jsonl"
        self.errors_path = self.root / "errors.jsonl"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise DatasetError(f"another run is writing {self.root} (lock held by pid {f.read().strip()}); "
                                   "wait for it or stop it") from None
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed run left (call with the lock held: no writer is running)."""
        stale = [p for d in (self.root, self.root / "shards") if d.is_dir() for p in d.glob(".*.tmp-*")]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("removed %d temporary files of an interrupted run", len(stale))
        return stale

    # ----- plan
    def load_plan(self) -> DatasetPlan | None:
        if not self.plan_path.exists():
            return None
        doc = json.loads(self.plan_path.read_text())
        if doc.get("format") != FORMAT:
            raise DatasetError(f"{self.plan_path} is {doc.get('format')!r}, not {FORMAT}; use another folder")
        return DatasetPlan.from_json(doc)

    def save_plan(self, plan: DatasetPlan) -> None:
        with atomic_path(self.plan_path) as tmp:
            tmp.write_text(json.dumps(plan.to_json(), indent=1) + "\n")

    # ----- committed shards
    def load_state(self, plan: DatasetPlan, *, verify: str = "sha256") -> DatasetState:
        """Entries of index.json, overridden by journal.jsonl; only those whose file still checks out are kept."""
        state = DatasetState()
        raw: dict[str, dict[str, Any]] = {}
        if self.index_path.exists():
            doc = json.loads(self.index_path.read_text())
            state.model, state.runs = doc.get("model"), doc.get("runs", [])
            raw.update({s["shard"]: s for s in doc.get("shards", []) if s.get("status") == "complete"})
        for entry in self._journal():
            raw[entry["shard"]] = entry
        known = {s.shard_id for s in plan.shards}
        for shard_id, entry in sorted(raw.items()):
            problem = self._check(entry, plan, verify) if shard_id in known else "not in the plan"
            if problem:
                log.warning("shard %s will be encoded again: %s", shard_id, problem)
                continue
            state.entries[shard_id] = entry
            state.model = state.model or entry.get("model")
        return state

    def _journal(self) -> Iterator[dict[str, Any]]:
        if not self.journal_path.exists():
            return
        for n, line in enumerate(self.journal_path.read_text().splitlines(), 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # the line a killed run was writing
                log.warning("%s line %d is incomplete; ignoring it", self.journal_path, n)

    def _check(self, entry: Mapping[str, Any], plan: DatasetPlan, verify: str) -> str | None:
        if entry.get("fingerprint") != plan.fingerprint:
            return "it belongs to another plan"
        path = self.root / entry["file"]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the index says {entry['bytes']}"
        if verify == "sha256" and sha256_file(path) != entry["sha256"]:
            return f"{path} does not match its sha256 in the index"
        return None

    def append_journal(self, entry: Mapping[str, Any]) -> None:
        with open(self.journal_path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_index(self, plan: DatasetPlan, state: DatasetState) -> None:
        """Rewrite index.json and errors.jsonl (atomically) from the plan and the committed shards."""
        shards, errors = [], list(plan.skipped)
        for spec in plan.shards:
            entry = state.entries.get(spec.shard_id)
            if entry is not None:
                shards.append({**entry, "status": "complete"})
                errors.extend(entry["errors"])
            elif spec.shard_id in state.failed:
                shards.append({"shard": spec.shard_id, "file": spec.file, "status": "failed", "clips": len(spec.clips),
                               "errors": state.failed[spec.shard_id]})
                errors.extend(state.failed[spec.shard_id])
            else:
                shards.append({"shard": spec.shard_id, "file": spec.file, "status": "pending",
                               "clips": len(spec.clips)})
        done = list(state.entries.values())
        doc = {
            "format": FORMAT, "fingerprint": plan.fingerprint, "updated_at": _now(), "model": state.model,
            "settings": plan.settings,
            "totals": {"shards": len(plan.shards), "shards_complete": len(done), "clips_planned": len(plan.clips),
                       "clips_encoded": sum(e["encoded"] for e in done),
                       "frames_encoded": sum(e["frames"] for e in done), "bytes": sum(e["bytes"] for e in done),
                       "clip_errors": sum(len(e["errors"]) for e in done), "videos_skipped": len(plan.skipped)},
            "shards": shards, "runs": state.runs,
        }
        with atomic_path(self.index_path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
        with atomic_path(self.errors_path, overwrite=True) as tmp:
            tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))

    def compact_journal(self) -> None:
        """After index.json holds every entry, the journal can start again (a crash here only leaves duplicates)."""
        if self.journal_path.exists():
            with atomic_path(self.journal_path, overwrite=True) as tmp:
                tmp.write_text("")


@dataclass
class RunReport:
    """What one ``encode_dataset`` run did; throughput counts the clip frames encoded in this run."""

    executor: str
    encoders: int
    device: str
    shards_total: int = 0
    shards_skipped: int = 0      # already complete (verified) before this run
    shards_written: int = 0
    shards_failed: int = 0       # clips that failed to encode: retried by the next run
    clips_encoded: int = 0
    frames_encoded: int = 0
    clip_errors: int = 0         # clips skipped because their video could not be decoded
    videos_skipped: int = 0      # rows that gave no clips (unreadable, frame range, too short)
    plan_s: float = 0.0          # manifest, probing, verifying earlier shards
    encode_wall_s: float = 0.0   # from the first clip sent to the last shard written (actor start-up included)
    decode_s: float = 0.0        # summed over workers
    encode_s: float = 0.0        # summed over encoders
    decode_processes: list[int] = field(default_factory=list)  # pids that decoded / encoded clips
    encode_processes: list[int] = field(default_factory=list)
    started_at: str = field(default_factory=_now)
    status: str = "running"

    @property
    def frames_per_s(self) -> float:
        return self.frames_encoded / self.encode_wall_s if self.encode_wall_s else 0.0

    @property
    def clips_per_s(self) -> float:
        return self.clips_encoded / self.encode_wall_s if self.encode_wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "frames_per_s": round(self.frames_per_s, 3), "clips_per_s": round(self.clips_per_s, 3)}


class ShardWriter:
    """Collects encoded clips (in any order) and commits each shard when all its clips are in.

    The only writer of the output folder: shard file (atomic rename), then a journal line (fsync), then, at most
    every ``INDEX_FLUSH_S`` seconds, index.json and errors.jsonl.
    """

    def __init__(self, out: DatasetDir, plan: DatasetPlan, state: DatasetState, report: RunReport, *,
                 max_encode_errors: int) -> None:
        self.out, self.plan, self.state, self.report = out, plan, state, report
        self.max_encode_errors = max_encode_errors
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}
        self.encode_errors = 0
        self.last_flush = 0.0
        self.started = time.perf_counter()
        kill = os.environ.get(KILL_AFTER_ENV)
        self.kill_after = int(kill) if kill else None

    def add(self, result: dict[str, Any]) -> None:
        clip = Clip.from_json(result["clip"])
        spec = self.plan.shard_of(clip.index)
        for pids, pid in ((self.report.decode_processes, result["decode_pid"]),
                          (self.report.encode_processes, result["encode_pid"])):
            if pid not in pids:
                pids.append(int(pid))
        got = self.pending.setdefault(spec.shard_id, {})
        got[clip.index] = result
        if result["stage"] == "encode":
            self.encode_errors += 1
            if self.encode_errors > self.max_encode_errors:
                self.flush(force=True)
                raise DatasetError(f"{self.encode_errors} clips failed to encode (last: {clip.path} frames "
                                   f"{clip.start}..{clip.end - 1}: {result['error']}); stopping. Fix the cause "
                                   "and rerun: finished shards are kept")
        if len(got) == len(spec.clips):
            self._commit(spec, [got[i] for i in spec.clips])
            del self.pending[spec.shard_id]
            self.flush()

    def _commit(self, spec: ShardSpec, results: list[dict[str, Any]]) -> None:
        from safetensors.numpy import save_file

        identity = json.loads(results[0]["identity"])
        if self.state.model is None:
            self.state.model = identity
        elif self.state.model != identity:
            raise DatasetError(f"the encoders' model {identity} is not the one that wrote the earlier shards "
                               f"({self.state.model}); the checkpoint changed: use a new output folder")
        tensors: dict[str, np.ndarray] = {}
        records, errors, failed = [], [], []
        for pos, (idx, r) in enumerate(zip(spec.clips, results)):
            clip = self.plan.clips[idx]
            if r["error"]:
                problem = {"kind": r["stage"], "row": clip.row, "path": clip.path, "clip_id": clip.clip_id,
                           "shard": spec.shard_id, "start": clip.start, "end": clip.end, "reason": r["error"]}
                (failed if r["stage"] == "encode" else errors).append(problem)
                continue
            key = f"{pos:04d}"
            if self.plan.settings["encoder"]["latents"] == "sample":
                tensors[f"{key}/sample"] = np.ascontiguousarray(r["mean"])
            else:
                tensors[f"{key}/mean"] = np.ascontiguousarray(r["mean"])
                tensors[f"{key}/logvar"] = np.ascontiguousarray(r["logvar"])
            records.append({**clip.to_dict(), "key": key, "position": pos, "latent_shape": list(r["mean"].shape),
                            "seed": r["seed"] if r["seed"] >= 0 else None,
                            "model_sha256": identity.get("model_sha256"),
                            "scaling_factor": identity.get("scaling_factor")})
            self.report.decode_s += r["decode_s"]
            self.report.encode_s += r["encode_s"]
        if failed:  # not written: the next run encodes this shard again
            self.state.failed[spec.shard_id] = failed
            self.report.shards_failed += 1
            return
        self.state.failed.pop(spec.shard_id, None)
        path = self.out.root / spec.file
        header = {"format": SHARD_FORMAT, "shard": spec.shard_id, "fingerprint": self.plan.fingerprint,
                  "latents": self.plan.settings["encoder"]["latents"], "model": identity, "clips": records}
        # one metadata entry: safetensors writes several in random order, one keeps the bytes reproducible
        metadata = {SHARD_HEADER_KEY: json.dumps(header, sort_keys=True)}
        with atomic_path(path, overwrite=True) as tmp:  # a file left by a killed run is not in the journal
            save_file(tensors, str(tmp), metadata=metadata)
            tmp.chmod(0o666 & ~_umask())  # safetensors recreates the file with mkstemp's private mode
        entry = {"shard": spec.shard_id, "file": spec.file, "fingerprint": self.plan.fingerprint,
                 "sha256": sha256_file(path), "bytes": path.stat().st_size, "clips": len(spec.clips),
                 "encoded": len(records), "frames": sum(c["num_frames"] for c in records), "errors": errors,
                 "model": identity, "completed_at": _now()}
        self.out.append_journal(entry)
        self.state.entries[spec.shard_id] = entry
        self.report.shards_written += 1
        self.report.clips_encoded += len(records)
        self.report.frames_encoded += entry["frames"]
        self.report.clip_errors += len(errors)
        if self.kill_after is not None and self.report.shards_written >= self.kill_after:
            log.warning("%s=%d: killing this process after shard %s", KILL_AFTER_ENV, self.kill_after, spec.shard_id)
            os.kill(os.getpid(), signal.SIGKILL)

    def flush(self, *, force: bool = False) -> None:
        if force or time.monotonic() - self.last_flush >= INDEX_FLUSH_S:
            if self.report.status == "running":  # so a killed run still shows its progress
                self.report.encode_wall_s = time.perf_counter() - self.started
                self.state.runs[-1] = self.report.as_dict()
            self.out.write_index(self.plan, self.state)
            self.last_flush = time.monotonic()


# ---------------------------------------------------------------------------------------------------- executors


@dataclass(frozen=True)
class PoolSizing:
    """Encoder actors and what each one reserves, and what one decode task reserves."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float
    torch_threads: int
    device: str


def size_pool(cpus: float, gpus: float, *, device: str = "auto", encoders: int | None = None) -> PoolSizing:
    """Size the encoder pool from the cluster's resources, always leaving CPUs for the decode tasks.

    GPU encoders: one actor per GPU (1 GPU, up to 1 CPU each). CPU encoders: ``CPUs - 1`` actors of 1 CPU (at
    least one actor; fractional below 2 CPUs). Reserving every CPU for actors would leave none for the decode
    tasks and the pipeline would stall (seen on 2-CPU machines).
    """
    if cpus <= 0:
        raise DatasetError(f"the Ray cluster has no CPUs ({cpus}); decode tasks need at least one")
    if encoders is not None and encoders < 1:
        raise DatasetError(f"encoders must be >= 1, got {encoders}")
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus >= 1)
    if use_gpu:
        if gpus < 1:
            raise DatasetError(f"--device {device} asks for GPU encoders but the cluster has {gpus} GPUs; "
                               "pass --device cpu")
        actors = encoders or int(gpus)
        if actors > gpus:
            raise DatasetError(f"{actors} GPU encoders need {actors} GPUs; the cluster has {gpus}")
        actor_cpus = min(1.0, max(0.1, (cpus - 1) / actors))
        return PoolSizing(actors, actor_cpus, 1.0, 1.0, 1, "cuda" if device == "auto" else device)
    spare = 1.0 if cpus >= 2 else cpus / 2
    actors = encoders or max(1, int(cpus - spare))
    actor_cpus = (cpus - spare) / actors if encoders else min(1.0, cpus - spare)
    return PoolSizing(actors, actor_cpus, 0.0, min(1.0, spare), max(1, int(actor_cpus)),
                      "cpu" if device == "auto" else device)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks it)
    except ImportError as e:
        raise BackendUnavailableError(f"the ray executor needs ray[data], which is not installed. {RAY_HINT}") from e
    return ray


class LocalExecutor:
    """Everything in this process: the next clip is decoded on a thread while this one encodes."""

    name = "local"

    def __init__(self, spec: EncoderSpec) -> None:
        if spec.device == "auto":
            import torch

            spec = replace(spec, device="cuda" if torch.cuda.is_available() else "cpu")
        self.spec = spec
        self.actors, self.device = 1, spec.device

    def probe(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [probe_record(r) for r in records]

    def encode(self, clips: list[Clip]) -> Iterator[dict[str, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        if not clips:
            return
        encoder = ClipEncoder(self.spec)
        with ThreadPoolExecutor(1, thread_name_prefix="cvvae-decode") as pool:
            futures = [pool.submit(decode_clip, {"clip": c.to_json()}) for c in clips[:2]]
            for i in range(len(clips)):
                row = futures[i].result()
                if i + 2 < len(clips):
                    futures.append(pool.submit(decode_clip, {"clip": clips[i + 2].to_json()}))
                futures[i] = None  # type: ignore[call-overload]  (free the frames)
                yield encoder(row)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None          # None: a local instance sized to this machine (or RAY_ADDRESS if set)
    runtime_env: Mapping[str, Any] | None = None
    encoders: int | None = None         # actors; default from the cluster's resources (size_pool)
    num_cpus: int | None = None         # CPUs of a local instance (default: all of this machine)


class RayExecutor:
    """Ray Data: probe and decode in CPU tasks, encode in an actor pool, results streamed back to this driver."""

    name = "ray"

    def __init__(self, spec: EncoderSpec, options: RayOptions) -> None:
        self.ray = import_ray()
        self.owns_ray = not self.ray.is_initialized()
        if self.owns_ray:
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if options.runtime_env:
                kwargs["runtime_env"] = dict(options.runtime_env)
            if options.address is None and options.num_cpus is not None:
                kwargs["num_cpus"] = options.num_cpus
            self.ray.init(address=options.address, **kwargs)
        context = self.ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI draws one progress bar for the whole job
        resources = self.ray.cluster_resources()
        self.sizing = size_pool(resources.get("CPU", 0.0), resources.get("GPU", 0.0), device=spec.device,
                                encoders=options.encoders)
        self.spec = replace(spec, device=self.sizing.device)
        self.actors, self.device = self.sizing.actors, self.sizing.device
        log.info("ray: %s; %s", resources, self.sizing)

    def probe(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ds = self.ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 1024)))
        return sorted(ds.map(probe_record, num_cpus=self.sizing.decode_cpus).take_all(), key=lambda r: r["row"])

    def encode(self, clips: list[Clip]) -> Iterator[dict[str, Any]]:
        if not clips:
            return
        s = self.sizing
        ds = self.ray.data.from_items([{"clip": c.to_json()} for c in clips],
                                      override_num_blocks=max(1, min(len(clips), 4096)))
        # Declaring the decode task's memory is honest accounting, and it also keeps Ray Data from fusing the
        # decode into the encoder actors (it fuses only maps with equal resource requests), which would decode on
        # the actors' CPUs, in series with encoding.
        ds = ds.map(decode_clip, num_cpus=s.decode_cpus, memory=_decode_memory(clips))
        ds = ds.map(ClipEncoder, fn_constructor_kwargs={"spec": self.spec, "threads": s.torch_threads},
                    compute=self.ray.data.ActorPoolStrategy(size=s.actors), num_cpus=s.actor_cpus,
                    num_gpus=s.actor_gpus or None)
        yield from ds.iter_rows()

    def close(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()


def _decode_memory(clips: Sequence[Clip]) -> int:
    """Bytes one decode task may hold: worker baseline, ~16 decoded source frames (YUV 4:2:0), the clip twice."""
    source = max(c.source_height * c.source_width for c in clips) * 3 // 2
    clip = max(c.num_frames * c.height * c.width * 3 for c in clips)
    return 384 * 2**20 + 16 * source + 2 * clip


# ---------------------------------------------------------------------------------------------------- entry points


def encode_dataset(inputs: str | Path | Sequence[str | Path], out_dir: str | Path, *, policy: ClipPolicy,
                   encoder: EncoderSpec, clips_per_shard: int = 64, executor: str = "ray",
                   ray: RayOptions | None = None, verify: str = "sha256", max_encode_errors: int = 16,
                   on_progress: ProgressFn | None = None) -> RunReport:
    """Encode every clip of the manifest into shards under ``out_dir``, resuming what an earlier run left."""
    if executor not in ("local", "ray"):
        raise DatasetError(f"executor must be 'local' or 'ray', not {executor!r}")
    if verify not in ("sha256", "size"):
        raise DatasetError(f"verify must be 'sha256' or 'size', not {verify!r}")
    settings = plan_settings(policy, clips_per_shard, encoder)
    make_shards(0, clips_per_shard)  # checks clips_per_shard before anything expensive
    rows = read_manifest(inputs)
    out = DatasetDir(out_dir)
    t0 = time.perf_counter()
    with out.locked():
        out.remove_temporaries()
        plan = out.load_plan()
        if plan is not None and plan.fingerprint != plan_fingerprint(rows, settings):
            raise DatasetError(f"{out.root} holds a dataset planned from another manifest or other settings "
                               f"({_plan_difference(plan, rows, settings)}); use a new output folder, or rerun "
                               "with the original INPUTS and options")
        ex = LocalExecutor(encoder) if executor == "local" else RayExecutor(encoder, ray or RayOptions())
        try:
            if plan is None:
                records = ex.probe([{"row": r.row, "path": r.path} for r in rows])
                plan = DatasetPlan.build(rows, {r["row"]: json.loads(r["probe"]) for r in records}, settings)
                out.save_plan(plan)
            state = out.load_state(plan, verify=verify)
            for run in state.runs:  # a run that never finished was killed
                if run.get("status") == "running":
                    run["status"] = "interrupted"
            report = RunReport(ex.name, ex.actors, ex.device, shards_total=len(plan.shards),
                               shards_skipped=len(state.entries), videos_skipped=len(plan.skipped))
            state.runs.append(report.as_dict())
            todo = [s for s in plan.shards if s.shard_id not in state.entries]
            clips = [plan.clips[i] for s in todo for i in s.clips]
            total = sum(c.num_frames for c in clips)
            report.plan_s = time.perf_counter() - t0
            writer = ShardWriter(out, plan, state, report, max_encode_errors=max_encode_errors)
            writer.flush(force=True)
            out.compact_journal()  # index.json now holds every verified entry; a torn last line goes with it
            done = 0
            try:
                for result in ex.encode(clips):
                    writer.add(result)
                    done += json.loads(result["clip"])["num_frames"]
                    if on_progress:
                        on_progress(done, total)
                report.status = "failed" if report.shards_failed else "finished"
            except BaseException:
                report.status = "failed"
                raise
            finally:
                report.encode_wall_s = time.perf_counter() - writer.started
                state.runs[-1] = {**report.as_dict(), "finished_at": _now()}
                writer.flush(force=True)
            out.compact_journal()
        finally:
            ex.close()
    log.info("encode-dataset %s: %s", out.root, report.as_dict())
    return report


def _plan_difference(plan: DatasetPlan, rows: Sequence[ManifestRow], settings: Mapping[str, Any]) -> str:
    changed = sorted(k for k in set(plan.settings) | set(settings) if plan.settings.get(k) != settings.get(k))
    if changed:
        return "settings differ: " + ", ".join(f"{k} was {plan.settings.get(k)} now {settings.get(k)}" for k in changed)
    if len(plan.rows) != len(rows):
        return f"the manifest had {len(plan.rows)} rows, now {len(rows)}"
    first = next(i for i, (a, b) in enumerate(zip(plan.rows, rows)) if a != b)
    return f"manifest row {first} was {plan.rows[first].path}, now {rows[first].path}"


@dataclass
class ClipLatents:
    """One clip of a shard: its record (path, frame range, fps, original size, columns, ...) and its latents."""

    record: dict[str, Any]
    latents: Any   # cvvae.runtime.api.Latents (mean/logvar, or the sample as mean with logvar None)


def load_shard(path: str | Path) -> tuple[dict[str, Any], list[ClipLatents]]:
    """The header (format, shard, fingerprint, latents, model) and the clips of one shard file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cvvae.runtime.api import Latents

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(SHARD_HEADER_KEY, "{}"))
    if header.get("format") != SHARD_FORMAT:
        raise DatasetError(f"{path} is not a {SHARD_FORMAT} shard (no {SHARD_HEADER_KEY!r} header of that format)")
    tensors = load_file(str(path))
    out = []
    for rec in header["clips"]:
        rec, key = {**rec, "shard": header["shard"]}, rec["key"]
        mean = tensors.get(f"{key}/mean", tensors.get(f"{key}/sample"))
        meta = {**header["model"], "fps": rec["fps"], "source_video": rec["path"], "clip_id": rec["clip_id"]}
        out.append(ClipLatents(rec, Latents(mean, tensors.get(f"{key}/logvar"), rec["num_frames"], rec["height"],
                                            rec["width"], meta)))
    return header, out


def iter_clips(out_dir: str | Path, shards: Iterable[str] | None = None) -> Iterator[ClipLatents]:
    """Clips of the complete shards (all, or those listed), in plan order."""
    index = json.loads(DatasetDir(out_dir).index_path.read_text())
    wanted = set(shards) if shards is not None else None
    for entry in index["shards"]:
        if entry["status"] == "complete" and (wanted is None or entry["shard"] in wanted):
            yield from load_shard(Path(out_dir) / entry["file"])[1]


def decode_dataset(out_dir: str | Path, dest: str | Path, vae: Any, *, shards: Iterable[str] | None = None,
                   limit: int | None = None, fmt: str = "mp4", crf: int = 18, overwrite: bool = False,
                   on_clip: Callable[[Path, int], None] | None = None) -> list[Path]:
    """Decode clips back to ``dest/shard-ID/POS-CLIPID.mp4`` (or PNG folders), for evaluation."""
    from cvvae.runtime.video_io import VideoWriter, tensor_to_frames

    if fmt not in ("mp4", "png"):
        raise DatasetError(f"format must be 'mp4' or 'png', not {fmt!r}")
    if not DatasetDir(out_dir).index_path.exists():
        raise DatasetError(f"{out_dir} has no index.json: not an encode-dataset output folder")
    written: list[Path] = []
    for item in iter_clips(out_dir, shards):
        if limit is not None and len(written) >= limit:
            break
        rec = item.record
        name = f"{rec['position']:04d}-{rec['clip_id']}" + (".mp4" if fmt == "mp4" else "")
        target = Path(dest) / f"shard-{rec['shard']}" / name
        frames = 0
        with VideoWriter(target, rec["fps"] or 30.0, crf=crf, overwrite=overwrite) as writer:
            for pixels in vae.decode_stream(item.latents):
                writer.write(tensor_to_frames(pixels[0]))
                frames += pixels.shape[2]
        written.append(target)
        if on_clip:
            on_clip(target, frames)
    return written


def dataset_stats(out_dir: str | Path) -> dict[str, Any]:
    """Counts, frames, bytes, throughput of each run and errors by kind, from index.json and the journal."""
    out = DatasetDir(out_dir)
    plan = out.load_plan()
    if plan is None:
        raise DatasetError(f"{out.root} has no plan.json: not an encode-dataset output folder")
    state = out.load_state(plan, verify="size")
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()] if out.errors_path.exists() else []
    by_kind: dict[str, int] = {}
    for e in errors:
        by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
    done = list(state.entries.values())
    return {
        "folder": str(out.root),
        "model": state.model,
        "latents": plan.settings["encoder"]["latents"],
        "videos": len(plan.rows),
        "videos_skipped": len(plan.skipped),
        "shards": {"total": len(plan.shards), "complete": len(done), "pending": len(plan.shards) - len(done)},
        "clips": {"planned": len(plan.clips), "encoded": sum(e["encoded"] for e in done),
                  "errors": sum(len(e["errors"]) for e in done)},
        "frames": {"planned": sum(c.num_frames for c in plan.clips), "encoded": sum(e["frames"] for e in done)},
        "bytes": sum(e["bytes"] for e in done),
        "errors_by_kind": by_kind,
        "runs": [{k: r.get(k) for k in ("started_at", "status", "executor", "encoders", "device", "shards_written",
                                         "clips_encoded", "frames_encoded", "encode_wall_s", "frames_per_s",
                                         "clips_per_s")} for r in state.runs],
    }
