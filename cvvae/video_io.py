"""Video I/O, built on PyAV (FFmpeg): in the core layer because the runtime, calibration data, tools, dataset
encoding and tests all read and write video (docs/architecture.md).

Reading: :func:`probe_video`, :func:`read_video` (whole selection as one array) and
:func:`iter_video_frames` (the same frames streamed in chunks). Frame selection is
``start``/``end``/``stride``/``max_frames`` in *source* frame indices; resizing is done by
FFmpeg's swscale inside ``VideoFrame.reformat`` (area interpolation), then an optional
centre crop. Frames outside the selection are decoded (the codec needs them) but never
converted to RGB, and decoding stops after the last selected frame.

Writing: :class:`VideoWriter` / :func:`write_video` write MP4/MKV/MOV (H.264 via libx264,
falling back to mpeg4) or WebM (VP9), or a directory of lossless PNG frames. Output is
written to a hidden temporary sibling and moved into place with ``os.replace`` only when
the writer closes cleanly, so a failed run never leaves a partial file behind.

Pixel helpers :func:`frames_to_tensor` / :func:`tensor_to_frames` convert between uint8
``(T, H, W, 3)`` RGB frames and the VAE's float ``(3, T, H, W)`` tensors in ``[-1, 1]``.
"""

from __future__ import annotations

import errno
import inspect
import logging
import numbers
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from .errors import InputError, VideoError
from .fsutil import make_temp, publish, remove_tree, replace_problem

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
HW = tuple[int, int]

#: Output suffix -> FFmpeg muxer name. Any other suffix (or none) means a PNG directory.
VIDEO_CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm"}
_INTERPOLATION = "AREA"  # swscale area averaging: good for downscaling, fine for upscaling
_PNG_NAME = "frame_{:06d}.png"


@dataclass(frozen=True)
class VideoInfo:
    """Properties of a *source* video.

    ``stride`` is 1 from :func:`probe_video`; :func:`read_video` returns a copy with the
    stride it used, so ``fps_out`` (= ``fps / stride``) is the frame rate of the returned
    frames - the rate to pass to :class:`VideoWriter` when writing them back.
    """

    path: Path
    width: int
    height: int
    fps: float
    num_frames: int
    codec: str
    duration_s: float
    stride: int = 1

    @property
    def fps_out(self) -> float:
        """Frame rate of frames read with ``stride`` (``fps / stride``)."""
        return self.fps / self.stride


# --------------------------------------------------------------------------- reading


@contextmanager
def _open_video(path: Path) -> Iterator[tuple[Any, Any]]:
    """Open ``path`` and yield ``(container, first video stream)``; VideoError if impossible."""
    if not path.exists():
        raise VideoError(f"video file not found: {path} (cwd: {Path.cwd()}); check the path")
    if path.is_dir():
        raise VideoError(f"{path} is a directory; expected a video file such as .mp4 or .mkv")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:  # InvalidDataError for non-video data, EOFError for empty files
        raise VideoError(
            f"cannot open {path} as a video ({exc}); expected a video file FFmpeg can read "
            "(e.g. H.264 .mp4) - the file is not a video, or it is corrupt or truncated"
        ) from exc
    with container:
        if not container.streams.video:
            found = ", ".join(s.type for s in container.streams)
            what = f"only {found} streams" if found else "no streams at all (empty video)"
            raise VideoError(f"{path} has no video stream: it contains {what}; expected a video track")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threading
        yield container, stream


def _decode(container: Any, stream: Any, path: Path) -> Iterator[Any]:
    """Decoded frames of ``stream`` in presentation order; decoder errors become VideoError."""
    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        raise VideoError(
            f"decoding {path} failed ({exc}); the file is probably corrupt or truncated"
        ) from exc


def _empty_error(path: Path) -> VideoError:
    return VideoError(f"{path} has a video stream but no decodable frames (empty video); re-export the video")


def probe_video(path: PathLike) -> VideoInfo:
    """Describe a video. ``num_frames`` comes from the container's index when it has one
    (MP4/MOV), otherwise (MKV/WebM) the stream is decoded once to count frames exactly."""
    path = Path(path)
    with _open_video(path) as (container, stream):
        num_frames = stream.frames or sum(1 for _ in _decode(container, stream, path))
        if num_frames == 0:
            raise _empty_error(path)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not fps:
            log.warning("%s: no frame rate in the container; reporting fps=0", path)
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = num_frames / fps if fps else 0.0
        codec = stream.codec_context.name
        return VideoInfo(path, stream.width, stream.height, fps, num_frames, codec, duration)


@dataclass(frozen=True)
class _Plan:
    indices: range  # source frame indices to return
    resize_hw: HW  # size after resizing (the source size when not resizing)
    crop_hw: HW | None

    @property
    def frame_hw(self) -> HW:
        return self.crop_hw or self.resize_hw


def _check_hw(name: str, value: Any) -> HW:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise VideoError(f"{name} must be a (height, width) pair of ints, got {value!r}") from None
    if h < 1 or w < 1:
        raise VideoError(f"{name} must be positive (height, width), got {value!r}")
    return h, w


def _ffmpeg_can_scale(height: int, width: int) -> bool:
    """FFmpeg's image size check (libavutil av_image_check_size2, any pixel format): larger frames fail with EINVAL."""
    return (8 * width + 1024) * (height + 128) < 2**31


def _plan(
    info: VideoInfo,
    start: int,
    end: int | None,
    stride: int,
    max_frames: int | None,
    size: HW | None,
    resize_short_side: int | None,
    center_crop: HW | None,
) -> _Plan:
    """Validate the selection/resize arguments against ``info``."""
    n, name = info.num_frames, info.path.name
    if stride < 1:
        raise VideoError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be >= 1 or None, got {max_frames}")
    if not 0 <= start < n:
        raise VideoError(
            f"start={start} is out of range: {name} has {n} frames, so start must be in 0..{n - 1}"
        )
    end = n if end is None else end
    if not start < end <= n:
        raise VideoError(
            f"end={end} is out of range: {name} has {n} frames and start={start}, so end must be in "
            f"{start + 1}..{n} (or None for the last frame)"
        )
    if size is not None and resize_short_side is not None:
        raise VideoError("pass either size=(H, W) or resize_short_side=N, not both")
    resize_hw = (info.height, info.width)
    if size is not None:
        resize_hw = _check_hw("size", size)
    elif resize_short_side is not None:
        if resize_short_side < 1:
            raise VideoError(f"resize_short_side must be >= 1, got {resize_short_side}")
        scale = resize_short_side / min(resize_hw)
        resize_hw = (max(1, round(info.height * scale)), max(1, round(info.width * scale)))
    if not _ffmpeg_can_scale(*resize_hw):
        raise VideoError(
            f"frames of {resize_hw[0]}x{resize_hw[1]} are beyond what FFmpeg can scale (it needs "
            f"(8*W + 1024) * (H + 128) < 2^31, about 16000x16000 at most); choose a smaller size"
        )
    crop_hw = None
    if center_crop is not None:
        crop_hw = _check_hw("center_crop", center_crop)
        if crop_hw[0] > resize_hw[0] or crop_hw[1] > resize_hw[1]:
            raise VideoError(
                f"center_crop={crop_hw} is larger than the (resized) frame {resize_hw}; crop a smaller area"
            )
    indices = range(start, end, stride)[:max_frames]
    return _Plan(indices, resize_hw, crop_hw)


def _prepare(path: PathLike, *args: Any) -> tuple[VideoInfo, _Plan]:
    info = probe_video(path)
    return info, _plan(info, *args)


def _iter_selected(path: Path, plan: _Plan) -> Iterator[np.ndarray]:
    """Yield the selected frames one by one as uint8 (H, W, 3) RGB arrays."""
    (h, w), crop, idx = plan.resize_hw, plan.crop_hw, plan.indices
    count = 0
    with _open_video(path) as (container, stream):
        for i, frame in enumerate(_decode(container, stream, path)):
            if i not in idx:  # O(1) for a range; skipped frames are never converted
                continue
            rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation=_INTERPOLATION).to_ndarray()
            if crop:
                top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
                rgb = rgb[top : top + crop[0], left : left + crop[1]]
            yield rgb
            count += 1
            if i == idx[-1]:
                return
    if count == 0:
        raise _empty_error(path)
    log.warning(
        "%s: decoded only %d of %d selected frames (wrong frame count in the container?)", path, count, len(idx)
    )


def read_video(
    path: PathLike,
    *,
    start: int = 0,
    end: int | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    size: HW | None = None,
    resize_short_side: int | None = None,
    center_crop: HW | None = None,
) -> tuple[np.ndarray, VideoInfo]:
    """Read source frames ``start, start+stride, ...`` (< ``end``, at most ``max_frames``).

    ``size=(H, W)`` resizes to exactly that size; ``resize_short_side=N`` keeps the aspect
    ratio with the short side N (the other side rounded to the nearest integer);
    ``center_crop=(H, W)`` then crops the centre. Returns uint8 RGB ``(T, H, W, 3)`` and the
    source :class:`VideoInfo` with ``stride`` set (``info.fps_out`` is the output rate).
    """
    info, plan = _prepare(path, start, end, stride, max_frames, size, resize_short_side, center_crop)
    out = np.empty((len(plan.indices), *plan.frame_hw, 3), np.uint8)
    n = 0
    for n, rgb in enumerate(_iter_selected(info.path, plan), 1):
        out[n - 1] = rgb
    return out[:n], replace(info, stride=stride)


def selected_shape(path: PathLike, **selection: Any) -> tuple[int, int, int]:
    """(T, H, W) of what ``read_video(path, **selection)`` would return, from the container's header alone."""
    bound = inspect.signature(read_video).bind(path, **selection)
    bound.apply_defaults()
    _, plan = _prepare(*bound.arguments.values())  # read_video's parameters, in _prepare's order
    return (len(plan.indices), *plan.frame_hw)


def iter_video_frames(
    path: PathLike,
    *,
    chunk_size: int,
    start: int = 0,
    end: int | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    size: HW | None = None,
    resize_short_side: int | None = None,
    center_crop: HW | None = None,
) -> Iterator[np.ndarray]:
    """Stream the frames :func:`read_video` would return, as uint8 ``(t, H, W, 3)`` arrays
    with ``t <= chunk_size``. Arguments are validated (and the file probed) immediately."""
    if chunk_size < 1:
        raise VideoError(f"chunk_size must be >= 1, got {chunk_size}")
    info, plan = _prepare(path, start, end, stride, max_frames, size, resize_short_side, center_crop)

    def chunks() -> Iterator[np.ndarray]:
        buf: list[np.ndarray] = []
        for rgb in _iter_selected(info.path, plan):
            buf.append(rgb)
            if len(buf) == chunk_size:
                yield np.stack(buf)
                buf.clear()
        if buf:
            yield np.stack(buf)

    return chunks()


# --------------------------------------------------------------------------- writing


def _pick_codec(container_format: str) -> str:
    preferred = ("libvpx-vp9", "libvpx") if container_format == "webm" else ("libx264", "mpeg4")
    for name in preferred:
        if name in av.codecs_available:
            return name
    raise VideoError(f"none of the encoders {preferred} is available in this PyAV/FFmpeg build")


class _PngSink:
    """Lossless PNG frames ``frame_000000.png, ...`` encoded with FFmpeg's png encoder."""

    def __init__(self, directory: Path, hw: HW) -> None:
        self.directory, self.count = directory, 0
        self.codec = av.CodecContext.create("png", "w")
        self.codec.height, self.codec.width = hw
        self.codec.pix_fmt = "rgb24"

    def _save(self, packets: list[Any]) -> None:
        for packet in packets:
            (self.directory / _PNG_NAME.format(self.count)).write_bytes(bytes(packet))
            self.count += 1

    def write(self, rgb: np.ndarray) -> None:
        self._save(self.codec.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))

    def close(self) -> None:
        self._save(self.codec.encode(None))

    def abort(self) -> None:
        pass


class _AvSink:
    """One encoded video stream in an FFmpeg container."""

    def __init__(
        self, path: Path, container_format: str, codec: str, hw: HW, rate: Fraction, crf: int
    ) -> None:
        options = {"movflags": "+faststart"} if container_format in ("mp4", "mov") else {}
        self.container = av.open(str(path), "w", format=container_format, options=options)
        self.count = 0
        try:
            codec_options: dict[str, str] = {}
            if codec == "libx264":
                codec_options = {"crf": str(crf)}
            elif codec.startswith("libvpx"):
                codec_options = {"crf": str(crf), "b": "0"}  # b=0: constant-quality mode
            self.stream = self.container.add_stream(codec, rate=rate, options=codec_options)
            self.stream.height, self.stream.width = hw
            # 4:2:0 subsampling needs even sizes in H.264; 4:4:4 keeps odd sizes exact.
            odd = hw[0] % 2 or hw[1] % 2
            self.stream.pix_fmt = "yuv444p" if odd and codec == "libx264" else "yuv420p"
            if odd and codec == "libx264":
                log.warning("%s: %dx%d has an odd side, so it is written as H.264 4:4:4 (yuv444p), which browsers "
                            "and QuickTime do not play; choose even sides (--size) for 4:2:0", path.name, *hw)
            if codec == "mpeg4":  # no crf: fixed quantiser, roughly crf/6 (crf 18 -> q 3)
                self.stream.codec_context.qscale = True
                qscale = min(31, max(1, round(crf / 6)))
                self.stream.codec_context.global_quality = qscale * 118  # FF_QP2LAMBDA
        except BaseException:
            self.container.close()
            raise

    def _mux(self, frame: Any) -> None:
        self.container.mux(self.stream.encode(frame))

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, self.count = self.count, self.count + 1  # codec time base is 1/fps
        self._mux(frame)

    def close(self) -> None:
        self._mux(None)  # flush delayed frames
        self.container.close()

    def abort(self) -> None:
        self.container.close()


def output_kind(path: PathLike) -> str:
    """What :class:`VideoWriter` makes at ``path``, as a :data:`cvvae.fsutil.KINDS` name: "file" for a video
    container suffix, else "png" (a folder of frames)."""
    trailing_slash = str(path).endswith(("/", os.sep))
    return "file" if Path(path).suffix.lower() in VIDEO_CONTAINERS and not trailing_slash else "png"


class VideoWriter:
    """Write RGB uint8 frames to a video file or a PNG directory, atomically.

    The output is a video when ``path`` ends in .mp4/.mkv/.mov/.webm (or ``format`` names
    one of those), else a directory of ``frame_000000.png ...`` (also for a trailing ``/``
    or ``format="png"``; PNG output is lossless and ignores ``fps``/``crf``). MP4/MKV/MOV
    use H.264 (libx264, yuv420p; yuv444p for odd sizes, which 4:2:0 cannot represent) or
    mpeg4 when libx264 is missing; WebM uses VP9. ``crf`` is the constant-quality factor.

    Frames go to a hidden ``.<name>.cvvae-tmp-<pid>-XXXX`` sibling published at ``path`` on a clean
    :meth:`close` (or ``with`` exit). On an exception, :meth:`abort`, or a close without any
    frame (which raises VideoError), the temporary output is removed and nothing is left.
    """

    def __init__(
        self,
        path: PathLike,
        fps: float | Fraction,
        *,
        crf: int = 18,
        overwrite: bool = False,
        format: str | None = None,
        codec: str | None = None,
    ) -> None:
        self.path = Path(path)
        suffix = (format and f".{format.lower().lstrip('.')}") or self.path.suffix.lower()
        trailing_slash = format is None and str(path).endswith(("/", os.sep))
        self.is_png = suffix not in VIDEO_CONTAINERS or trailing_slash
        self._container_format = "" if self.is_png else VIDEO_CONTAINERS[suffix]
        if not (isinstance(fps, numbers.Real) and 0 < fps < float("inf")):
            raise VideoError(f"fps must be a positive finite number, got {fps!r}")
        # Fractional rates are kept exact enough for timestamps: 29.97002997 -> 30000/1001.
        self.rate = Fraction(fps if isinstance(fps, Fraction) else float(fps)).limit_denominator(1001 * 1000)
        if not 0 <= crf <= 51:
            raise VideoError(f"crf must be in 0..51 (lower = better quality), got {crf}")
        self.crf, self.overwrite = crf, overwrite
        self.codec = None if self.is_png else codec or _pick_codec(self._container_format)
        self._check_target()
        self._sink: _PngSink | _AvSink | None = None
        self._hw: HW | None = None
        self._closed = False
        self._tmp = self._make_tmp()

    @property
    def kind(self) -> str:
        """What ``--force`` may replace at ``path`` (:data:`cvvae.fsutil.KINDS`): a PNG folder or a file."""
        return "png" if self.is_png else "file"

    def _check_target(self) -> None:
        if not self.overwrite and os.path.lexists(self.path):
            raise FileExistsError(
                f"output already exists: {self.path}; pass --force (CLI) or overwrite=True to replace it"
            )
        problem = os.path.lexists(self.path) and replace_problem(self.path, self.kind)
        if problem:
            raise FileExistsError(f"refusing to replace output {self.path} with --force: {problem}; "
                                  "remove it yourself or choose another path")

    def _make_tmp(self) -> Path:
        # fsutil.make_temp names it .<name>.cvvae-tmp-<pid>-<hex>, honours the umask and removes the temporaries
        # that killed runs left for this target
        try:
            tmp, self._lock_fd = make_temp(self.path, directory=self.is_png)
        except OSError as exc:
            # OSError(errno, ...) becomes PermissionError, NotADirectoryError, ... as appropriate;
            # mkdir over an existing *file* reports EEXIST, which really means "not a directory".
            parent = self.path.parent
            code = errno.ENOTDIR if exc.errno == errno.EEXIST else exc.errno
            raise OSError(
                code,
                f"cannot write output {self.path}: {exc.strerror}; "
                f"make sure {parent} is a writable directory or choose another path",
                str(parent),
            ) from exc
        return tmp

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames, ``(T, H, W, 3)`` or a single ``(H, W, 3)``."""
        if self._closed:
            raise VideoError(f"VideoWriter for {self.path} is already closed")
        arr = np.asarray(frames)
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise VideoError(
                f"frames must be uint8 RGB (T, H, W, 3) or (H, W, 3), got {arr.dtype} {arr.shape}; "
                "convert VAE output with tensor_to_frames()"
            )
        hw = (int(arr.shape[1]), int(arr.shape[2]))
        if self._hw is not None and hw != self._hw:
            raise VideoError(
                f"frame size changed from {self._hw} to {hw}; all frames of {self.path} must have one size"
            )
        try:
            if self._sink is None:
                self._sink = (
                    _PngSink(self._tmp, hw)
                    if self.is_png
                    else _AvSink(self._tmp, self._container_format, self.codec, hw, self.rate, self.crf)
                )
                self._hw = hw
            for rgb in arr:
                self._sink.write(np.ascontiguousarray(rgb))
        except av.FFmpegError as exc:
            raise VideoError(f"encoding {self.path} ({self.codec or 'png'}) failed: {exc}") from exc

    def close(self) -> None:
        """Flush and move the output into place (raises VideoError if no frame was written)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._sink is None:
                raise VideoError(f"no frames were written to {self.path}; nothing was saved")
            self._sink.close()
            # fails if something appeared at path meanwhile; with overwrite, replaces only an output of ours
            publish(self._tmp, self.path, overwrite=self.overwrite, kind=self.kind)
        except BaseException:
            remove_tree(self._tmp)
            raise
        finally:
            os.close(self._lock_fd)
        log.info("wrote %d frames %dx%d to %s", self._sink.count, self._hw[1], self._hw[0], self.path)

    def abort(self) -> None:
        """Stop writing and remove the temporary output; ``path`` is left untouched."""
        if self._closed:
            return
        self._closed = True
        if self._sink is not None:
            with suppress(Exception):
                self._sink.abort()
        remove_tree(self._tmp)
        os.close(self._lock_fd)


def write_video(path: PathLike, frames: np.ndarray, fps: float | Fraction, **kwargs: Any) -> Path:
    """Write ``frames`` (uint8 ``(T, H, W, 3)``) in one go; kwargs as :class:`VideoWriter`."""
    with VideoWriter(path, fps, **kwargs) as writer:
        writer.write(frames)
    return writer.path


# --------------------------------------------------------------------------- pixel helpers


def frames_to_tensor(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(T, H, W, 3)`` -> float32 ``(3, T, H, W)`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError(f"expected uint8 frames of shape (T, H, W, 3), got {arr.dtype} {arr.shape}")
    x = np.ascontiguousarray(arr.transpose(3, 0, 1, 2), dtype=np.float32)
    x /= 127.5
    x -= 1.0
    return x


def tensor_to_frames(x: Any) -> np.ndarray:
    """float ``(3, T, H, W)`` in ``[-1, 1]`` (numpy array or torch tensor, any device/dtype)
    -> uint8 RGB ``(T, H, W, 3)``; values are clipped, then ``(x + 1) * 127.5`` rounded."""
    if hasattr(x, "detach"):  # torch.Tensor; .float() also covers bfloat16, which numpy lacks
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise InputError(
            f"expected a (3, T, H, W) tensor, got shape {arr.shape}; index the batch first (x[0])"
        )
    out = np.rint((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(1, 2, 3, 0))
