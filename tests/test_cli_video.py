"""Video commands on real clips: reconstruct keeps count/size/fps; bad inputs fail clearly and leave nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import VIDEOS
from cvvae.cli import main
from cvvae.video_io import probe_video, read_video, write_video

MODEL = ["--model", "random:tiny-v1"]
SMALL = ["--max-frames", "7", "--size", "36x60"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A short real clip (8 frames of a Pexels video at 40x72, 29.97 fps) written once."""
    src = sorted(VIDEOS.glob("*.mp4"))
    if not src:
        pytest.skip(f"no real clips in {VIDEOS}")
    frames, info = read_video(src[0], max_frames=8, size=(40, 72))
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, frames, info.fps, crf=10)
    return path


def no_leftovers(directory: Path, *names: str) -> bool:
    return not any((directory / n).exists() for n in names) and not [p for p in directory.iterdir() if ".tmp" in p.name]


def test_reconstruct_keeps_count_size_fps(clip, tmp_path):
    r = run("reconstruct", clip, "-o", tmp_path / "out.mp4", *MODEL)
    assert r.exit_code == 0, r.output
    src, out = probe_video(clip), probe_video(tmp_path / "out.mp4")
    assert (out.num_frames, out.width, out.height) == (src.num_frames, src.width, src.height) == (8, 72, 40)
    assert abs(out.fps - src.fps) < 1e-3
    r = run("reconstruct", clip, "-o", tmp_path / "sbs.mp4", *MODEL, "--side-by-side", "--save-latents",
            tmp_path / "z.safetensors")
    assert r.exit_code == 0, r.output
    assert probe_video(tmp_path / "sbs.mp4").width == 144
    assert (tmp_path / "z.safetensors").exists()


def test_encode_decode_video_and_png(clip, tmp_path):
    r = run("encode", clip, "-o", tmp_path / "z.safetensors", *MODEL, "--stride", "2")
    assert r.exit_code == 0, r.output
    r = run("decode", tmp_path / "z.safetensors", "-o", tmp_path / "frames", *MODEL)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "frames").glob("*.png"))) == 4
    r = run("decode", tmp_path / "z.safetensors", "-o", tmp_path / "x.npy", *MODEL)
    assert r.exit_code == 0 and np.load(tmp_path / "x.npy").shape == (1, 3, 4, 40, 72)


def test_bad_videos(tmp_path):
    (tmp_path / "text.mp4").write_text("this is not a video")
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name, message in [("missing.mp4", "video file not found"), ("text.mp4", "VideoError"),
                          ("empty.mp4", "VideoError")]:
        r = run("reconstruct", tmp_path / name, "-o", tmp_path / "out.mp4", *MODEL)
        assert r.exit_code != 0 and message in r.output, (name, r.output)
        r = run("encode", tmp_path / name, "-o", tmp_path / "z.safetensors", *MODEL)
        assert r.exit_code != 0 and message in r.output, (name, r.output)
    assert no_leftovers(tmp_path, "out.mp4", "z.safetensors")


def test_unwritable_and_existing_outputs(clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("reconstruct", clip, "-o", blocker / "out.mp4", *MODEL)
    assert r.exit_code != 0 and "Error" in r.output
    (tmp_path / "out.mp4").write_bytes(b"keep")
    r = run("reconstruct", clip, "-o", tmp_path / "out.mp4", *MODEL)
    assert r.exit_code != 0 and "--force" in r.output and (tmp_path / "out.mp4").read_bytes() == b"keep"


def test_latents_of_another_model_and_wrong_shapes(clip, tmp_path):
    from safetensors.torch import save_file

    assert run("encode", clip, "-o", tmp_path / "z.safetensors", *MODEL).exit_code == 0
    r = run("decode", tmp_path / "z.safetensors", "-o", tmp_path / "out.mp4", "--model", "random:tiny-sd3")
    assert r.exit_code != 0 and "does not fit this sd3 model" in r.output
    save_file({"mean": torch.zeros(1, 4, 2, 3)}, str(tmp_path / "flat.safetensors"))
    r = run("decode", tmp_path / "flat.safetensors", "-o", tmp_path / "out.mp4", *MODEL)
    assert r.exit_code != 0 and "Error" in r.output
    assert no_leftovers(tmp_path, "out.mp4")


def test_interrupted_encode_leaves_no_file(clip, tmp_path, monkeypatch):
    from cvvae.runtime import backends

    calls = {"n": 0}
    original = backends.TorchBackend.encoder

    def flaky(self, video):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return original(self, video)

    monkeypatch.setattr(backends.TorchBackend, "encoder", flaky)
    r = run("encode", clip, "-o", tmp_path / "z.safetensors", *MODEL, "--tile-size", "32")
    assert r.exit_code != 0
    assert no_leftovers(tmp_path, "z.safetensors")


def test_doctor_lists_backends():
    r = run("doctor", "--json")
    assert r.exit_code == 0
    import json

    report = json.loads(r.output)
    assert report["backends"]["torch"] == "ok" and "onnxruntime" in report["backends"]
