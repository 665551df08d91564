"""Tests for cvvae.video_io (PyAV reading/writing and pixel conversion)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from cvvae.video_io import (
    VideoError,
    VideoWriter,
    frames_to_tensor,
    iter_video_frames,
    probe_video,
    read_video,
    tensor_to_frames,
    write_video,
)

VIDEO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
SMALL = (72, 128)  # decode the 1280x720 clips at reduced size to stay fast


@pytest.fixture(scope="module")
def clips() -> dict[str, Path]:
    """The two real clips keyed by file name."""
    paths = sorted(VIDEO_DIR.glob("*.mp4")) if VIDEO_DIR.is_dir() else []
    if len(paths) < 2:
        pytest.skip(f"real test videos not found in {VIDEO_DIR} (expected two 1280x720 .mp4 clips)")
    return {p.name: p for p in paths}


@pytest.fixture(scope="module")
def clip349(clips: dict[str, Path]) -> Path:
    return next(p for p in clips.values() if probe_video(p).num_frames == 349)


def gradient_video(t: int, h: int, w: int) -> np.ndarray:
    """Smooth moving colour gradients (no hard edges, which 4:2:0 chroma would blur)."""
    ti, y, x = np.meshgrid(np.arange(t), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    channels = [np.sin(2 * x + 0.2 * ti), np.cos(3 * y - 0.1 * ti), np.sin(2 * (x + y) + 0.15 * ti)]
    rgb = np.stack(channels, axis=-1)
    return np.rint((rgb + 1) * 100 + 27).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------- real videos


def test_probe_real_clips(clips: dict[str, Path]) -> None:
    infos = {name: probe_video(p) for name, p in clips.items()}
    assert {name: i.num_frames for name, i in infos.items()} == {
        "19216241-hd_1280_720_30fps.mp4": 349,
        "4896510-hd_1280_720_30fps.mp4": 270,
    }
    for info in infos.values():
        assert (info.width, info.height, info.codec) == (1280, 720, "h264")
        assert info.fps == pytest.approx(30, abs=0.05)
        assert info.duration_s == pytest.approx(info.num_frames / info.fps, abs=0.1)
        assert info.stride == 1 and info.fps_out == info.fps
    assert infos["19216241-hd_1280_720_30fps.mp4"].fps == 30.0
    assert infos["4896510-hd_1280_720_30fps.mp4"].fps == pytest.approx(30000 / 1001, abs=1e-9)


def test_read_selection_matches_stride1(clip349: Path) -> None:
    full, info = read_video(clip349, end=16, size=SMALL)
    assert full.shape == (16, *SMALL, 3) and full.dtype == np.uint8
    assert (info.num_frames, info.width, info.height, info.fps_out) == (349, 1280, 720, 30.0)

    sel, sel_info = read_video(clip349, start=3, stride=4, max_frames=3, size=SMALL)
    assert sel.shape == (3, *SMALL, 3)
    np.testing.assert_array_equal(sel, full[[3, 7, 11]])
    assert sel_info.stride == 4 and sel_info.fps == 30.0 and sel_info.fps_out == 7.5
    assert 20 < full.mean() < 235  # real content, not a blank frame


def test_iter_chunks_equal_read(clip349: Path) -> None:
    kw = dict(start=340, stride=2, resize_short_side=36, center_crop=(32, 48))  # frames 340..348
    frames, _ = read_video(clip349, **kw)
    assert frames.shape == (5, 32, 48, 3)
    chunks = list(iter_video_frames(clip349, chunk_size=2, **kw))
    assert [c.shape[0] for c in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), frames)
    uncropped, _ = read_video(clip349, max_frames=1, resize_short_side=36)
    assert uncropped.shape == (1, 36, 64, 3)  # 1280x720 -> 64x36 keeps 16:9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(start=349), "start=349 is out of range: 19216241-hd_1280_720_30fps.mp4 has 349 frames"),
        (dict(start=10, end=400), "end=400 is out of range"),
        (dict(start=10, end=10), "end must be in 11..349"),
        (dict(stride=0), "stride must be >= 1, got 0"),
        (dict(max_frames=0), "max_frames must be >= 1"),
        (dict(size=(-72, 128)), "size must be positive"),
        (dict(size=(72, 128), resize_short_side=36), "not both"),
        (dict(resize_short_side=36, center_crop=(40, 40)), "larger than the (resized) frame (36, 64)"),
    ],
)
def test_bad_selection_arguments(clip349: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(VideoError) as err:
        read_video(clip349, **kwargs)
    assert message in str(err.value)


def test_iter_validates_eagerly(clip349: Path) -> None:
    with pytest.raises(VideoError, match="chunk_size must be >= 1"):
        iter_video_frames(clip349, chunk_size=0)
    with pytest.raises(VideoError, match="start=500 is out of range"):
        iter_video_frames(clip349, chunk_size=4, start=500)  # raised before the first next()


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("fps", [30000 / 1001, 12.5])
def test_mp4_roundtrip(tmp_path: Path, fps: float) -> None:
    video = gradient_video(12, 64, 96)
    out = write_video(tmp_path / "out.mp4", video, fps, crf=10)
    assert leftovers(tmp_path) == ["out.mp4"]
    info = probe_video(out)
    assert (info.num_frames, info.height, info.width) == (12, 64, 96)
    assert info.fps == pytest.approx(fps, abs=1e-3)
    back, _ = read_video(out)
    assert back.shape == video.shape
    assert psnr(back, video) > 30


def test_odd_size_roundtrip(tmp_path: Path) -> None:
    video = gradient_video(4, 33, 47)
    out = write_video(tmp_path / "odd.mp4", video, 24)
    back, info = read_video(out)
    assert back.shape == (4, 33, 47, 3) and (info.height, info.width) == (33, 47)
    assert psnr(back, video) > 30


def test_writer_accepts_single_frames_and_mkv(tmp_path: Path) -> None:
    video = gradient_video(3, 32, 48)
    with VideoWriter(tmp_path / "clip.mkv", 25) as writer:
        for frame in video:
            writer.write(frame)  # (H, W, 3)
    info = probe_video(tmp_path / "clip.mkv")  # no frame index in MKV: counted by decoding
    assert (info.num_frames, info.fps) == (3, 25.0)


@pytest.mark.parametrize("target", ["frames", "frames.d/", "pngs.mp4"])
def test_png_directory_roundtrip_is_lossless(tmp_path: Path, target: str) -> None:
    video = np.random.default_rng(0).integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)
    fmt = "png" if target.endswith(".mp4") else None  # format= overrides the suffix
    out = write_video(str(tmp_path / target), video, 30, format=fmt)
    assert out.is_dir() and leftovers(tmp_path) == [out.name]
    files = leftovers(out)
    assert files == [f"frame_{i:06d}.png" for i in range(5)]
    for name, expected in zip(files, video):
        with av.open(str(out / name)) as container:
            decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
        np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("name", ["out.mp4", "frames"])
def test_existing_output_needs_overwrite(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"--force .*overwrite=True"):
        VideoWriter(target, 30)
    assert target.read_bytes() == b"precious" and leftovers(tmp_path) == [name]
    if name == "frames":  # overwrite replaces an output of the same kind only: a PNG folder, not a file
        with pytest.raises(FileExistsError, match="it is a file, and this output is a png folder"):
            write_video(target, gradient_video(2, 16, 16), 30, overwrite=True)
        assert target.read_bytes() == b"precious" and leftovers(tmp_path) == [name]
        return
    write_video(target, gradient_video(2, 16, 16), 30, overwrite=True)
    assert leftovers(tmp_path) == [name] and probe_video(target).num_frames == 2


def test_overwrite_replaces_png_directory(tmp_path: Path) -> None:
    write_video(tmp_path / "frames", gradient_video(3, 8, 8), 30)
    write_video(tmp_path / "frames", gradient_video(1, 8, 8), 30, overwrite=True)
    assert leftovers(tmp_path) == ["frames"] and leftovers(tmp_path / "frames") == ["frame_000000.png"]


@pytest.mark.parametrize("name", ["out.mp4", "frames"])
def test_exception_inside_with_leaves_nothing(tmp_path: Path, name: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / name, 30) as writer:
            writer.write(gradient_video(3, 16, 16))
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []


def test_close_without_frames_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no frames were written"):
        with VideoWriter(tmp_path / "out.mp4", 30):
            pass
    assert leftovers(tmp_path) == []


def test_bad_frames_are_rejected(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "out.mp4", 30) as writer:
        with pytest.raises(VideoError, match="must be uint8 RGB"):
            writer.write(np.zeros((2, 16, 16, 3), np.float32))
        writer.write(np.zeros((2, 16, 16, 3), np.uint8))
        with pytest.raises(VideoError, match=r"frame size changed from \(16, 16\) to \(16, 18\)"):
            writer.write(np.zeros((1, 16, 18, 3), np.uint8))
    assert probe_video(tmp_path / "out.mp4").num_frames == 2


def test_bad_writer_arguments(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="fps must be a positive"):
        VideoWriter(tmp_path / "a.mp4", 0)
    with pytest.raises(VideoError, match="crf must be in 0..51"):
        VideoWriter(tmp_path / "a.mp4", 30, crf=60)
    assert leftovers(tmp_path) == []


def test_unwritable_output_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="make sure .*file is a writable directory"):
        VideoWriter(tmp_path / "file" / "out.mp4", 30)
    write_video(tmp_path / "new" / "dir" / "out.mp4", gradient_video(1, 16, 16), 30)  # parents created
    assert (tmp_path / "new" / "dir" / "out.mp4").is_file()


def test_permission_denied_output_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: chmod cannot lock out root, which these tests may run as.
    real_open = os.open

    def deny(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_CREAT:  # creating the temporary output
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(PermissionError, match=r"Permission denied; make sure .*locked is a writable dir"):
        VideoWriter(tmp_path / "locked" / "out.mp4", 30)


# --------------------------------------------------------------------------- bad inputs


def _zero_frame_mp4(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()


def _garbage_packets_mp4(path: Path) -> None:
    """An H.264 track whose packets are not H.264: opens fine, fails to decode."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
        for i in range(3):
            packet = av.Packet(bytes(64))
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 30)
            container.mux(packet)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "video file not found"),
        (lambda p: p.write_text("hello, I am text\n" * 20), "cannot open"),
        (lambda p: p.write_bytes(b""), "not a video, or it is corrupt or truncated"),
        (_zero_frame_mp4, "no video stream: it contains no streams at all (empty video)"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["missing", "text", "zero-bytes", "zero-frames", "directory"],
)
def test_unreadable_inputs(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.mp4"
    if make:
        make(path)
    for call in (probe_video, read_video):
        with pytest.raises(VideoError) as err:
            call(path)
        assert message in str(err.value) and str(path) in str(err.value)


def test_undecodable_stream(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    _garbage_packets_mp4(path)
    assert probe_video(path).num_frames == 3  # the index is fine ...
    with pytest.raises(VideoError, match="decoding .*garbage.mp4 failed .*corrupt or truncated"):
        read_video(path)  # ... the data is not


# --------------------------------------------------------------------------- pixel helpers


def test_pixel_conversion_roundtrip() -> None:
    frames = np.arange(256, dtype=np.uint8).repeat(3).reshape(4, 8, 8, 3)
    x = frames_to_tensor(frames)
    assert x.dtype == np.float32 and x.shape == (3, 4, 8, 8) and x.flags.c_contiguous
    assert (x.min(), x.max()) == (-1.0, 1.0)
    np.testing.assert_array_equal(tensor_to_frames(x), frames)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(tensor_to_frames(torch.from_numpy(x)), frames)
    bf16 = torch.from_numpy(x).to(torch.bfloat16)  # numpy has no bfloat16; -1 and 1 are exact
    np.testing.assert_array_equal(tensor_to_frames(bf16)[..., 0].min(), 0)
    np.testing.assert_array_equal(tensor_to_frames(bf16)[..., 0].max(), 255)
    clipped = tensor_to_frames(np.array([-3.0, 0.0, 5.0], np.float32).reshape(3, 1, 1, 1))
    np.testing.assert_array_equal(clipped, [[[[0, 128, 255]]]])  # 127.5 rounds half to even -> 128
    with pytest.raises(ValueError, match=r"expected a \(3, T, H, W\) tensor"):
        tensor_to_frames(x[None])
    with pytest.raises(ValueError, match="expected uint8 frames"):
        frames_to_tensor(frames.astype(np.float32))
