"""Whole-clip evaluation (cvvae.training.clip_eval): windows, key vs in-between frames, pooled PSNR, summary, plot."""

from __future__ import annotations

import math

import pytest
import torch

from cvvae.training.clip_eval import (_mean_psnr, evaluate_clip, holds_cut, key_frame_mask, plot_per_frame, scene_cuts,
                                      summarize, window_starts)
from cvvae.errors import InputError
from cvvae.training.image_vae import IMAGE_PRESETS, ImageVAE
from cvvae.loading import create_model
from cvvae.metrics import psnr


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads of these tiny convolutions run 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_windows_and_key_frames():
    assert window_starts(40) == [0, 17] and window_starts(34) == [0, 17] and window_starts(16) == []
    assert window_starts(250) == list(range(0, 238, 17))  # 14 windows, 12 frames left out
    assert [i for i, k in enumerate(key_frame_mask()) if k] == [0, 4, 8, 12, 16]
    # pooled PSNR: frames at 20 and 30 dB have MSE 0.04 and 0.004 -> 10 log10(4 / 0.022)
    assert _mean_psnr([20.0, 30.0]) == pytest.approx(10 * math.log10(4 / 0.022))


def test_evaluate_clip_windows_match_direct_reconstructions(one_thread):
    model = create_model("tiny-v1", seed=0).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        image_vae = ImageVAE(IMAGE_PRESETS["tiny-image"]).eval()
    clip = torch.rand(1, 3, 21, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    r = evaluate_clip(model, clip, image_vae, window=9)  # 9-frame windows keep the test fast: key frames 0, 4, 8
    assert [w["start"] for w in r["windows"]] == [0, 9] and r["frames_left_out"] == 3
    assert len(r["per_frame_psnr"]) == 18 and (r["height"], r["width"]) == (16, 16)
    with torch.no_grad():
        x = clip[:, :, 9:18]
        enc = model.encode(x)
        rec = model.decode(enc.mean, num_frames=9, height=16, width=16).clamp(-1, 1)
    w = r["windows"][1]
    assert w["psnr"] == pytest.approx(psnr(rec, x), abs=1e-6)
    assert w["key_psnr"] == pytest.approx(psnr(rec[:, :, 0::4], x[:, :, 0::4]), abs=1e-6)
    between = [i for i in range(9) if i % 4]
    assert w["between_psnr"] == pytest.approx(psnr(rec[:, :, between], x[:, :, between]), abs=1e-6)
    assert r["mean_psnr"] == pytest.approx((r["windows"][0]["psnr"] + w["psnr"]) / 2)
    assert math.isfinite(r["image_decoder_psnr"])
    no_image = evaluate_clip(model, clip, window=9)
    assert no_image["mean_psnr"] == pytest.approx(r["mean_psnr"], abs=1e-6) and "image_decoder_psnr" not in no_image
    only = evaluate_clip(model, clip, image_vae, window=9, reconstruct=False)
    assert only["image_decoder_psnr"] == pytest.approx(r["image_decoder_psnr"], abs=1e-6)
    assert "mean_psnr" not in only and set(summarize({"a": only})) == {"windows", "image_decoder_psnr"}
    with pytest.raises(InputError, match="pass image_vae"):
        evaluate_clip(model, clip, window=9, reconstruct=False)

    s = summarize({"a": r, "b": no_image})
    assert s["windows"] == 4 and s["worst_psnr"] == min(x["psnr"] for x in r["windows"])
    assert s["worst_window"].startswith("a frames ") and "image_decoder_psnr" not in s
    assert s["key_minus_between_db"] == pytest.approx(s["key_psnr"] - s["between_psnr"])
    with pytest.raises(InputError, match="holds no whole 17-frame window"):
        evaluate_clip(model, clip[:, :, :16])


def test_scene_cuts_and_the_worst_window_within_a_shot():
    g = torch.Generator().manual_seed(0)
    shot_a = torch.full((1, 3, 12, 8, 8), -0.5) + 0.01 * torch.randn(1, 3, 12, 8, 8, generator=g)
    shot_b = torch.full((1, 3, 10, 8, 8), 0.6) + 0.01 * torch.randn(1, 3, 10, 8, 8, generator=g)
    clip = torch.cat([shot_a, shot_b], dim=2)  # frame 12 starts the second shot: 1.1 apart, 11.2 dB
    assert scene_cuts(clip) == [12] and scene_cuts(shot_a) == [] and scene_cuts(clip[:, :, :1]) == []
    assert scene_cuts(clip, threshold=5.0) == []
    assert holds_cut(9, 9, [12]) and not holds_cut(0, 9, [12]) and not holds_cut(12, 9, [12])
    assert holds_cut(4, 9, [12]) and not holds_cut(3, 9, [12])  # frames 3-11 end just before the cut
    windows = [{"start": 0, "psnr": 25.0, "key_psnr": 26.0, "between_psnr": 24.0},
               {"start": 9, "psnr": 15.0, "key_psnr": 16.0, "between_psnr": 14.0}]
    other = [{"start": 0, "psnr": 22.0, "key_psnr": 23.0, "between_psnr": 21.0}]
    s = summarize({"a": {"window": 9, "windows": windows, "cuts": [12]},
                   "b": {"window": 9, "windows": other, "cuts": []}})
    assert s["worst_psnr"] == 15.0 and s["worst_window"] == "a frames 9-17" and s["windows_with_cuts"] == 1
    assert s["worst_psnr_within_shots"] == 22.0 and s["worst_window_within_shots"] == "b frames 0-8"
    assert "windows_with_cuts" not in summarize({"a": {"window": 9, "windows": windows}})  # cuts unknown
    every = summarize({"a": {"window": 9, "windows": windows[1:], "cuts": [12]}})
    assert every["windows_with_cuts"] == 1 and "worst_psnr_within_shots" not in every


def test_per_frame_plot_is_a_png(tmp_path):
    r = {"per_frame_psnr": [20.0 + (i % 4 == 0) * 3 for i in range(34)], "window": 17, "mean_psnr": 21.0,
         "frames": 36, "height": 32, "width": 32}
    path = plot_per_frame("clip", {"model": r}, tmp_path / "plots" / "clip.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    marked = plot_per_frame("clip", {"model": {**r, "cuts": [10, 30, 35]}}, tmp_path / "plots" / "cuts.png")
    import matplotlib.image

    def reddish(png):  # pixels of the red cut lines (the model's line and dots are blue, the grid grey)
        rgb = matplotlib.image.imread(png)[..., :3]
        return int(((rgb[..., 0] - rgb[..., 1]) > 0.25).sum())

    assert reddish(path) == 0 and reddish(marked) > 200  # the cuts inside the 34 plotted frames are drawn


def test_compat_whole_cli_reports_every_window(tmp_path, one_thread):
    import json

    import av
    import numpy as np
    from click.testing import CliRunner

    from cvvae.training.image_vae import save_image_vae
    from cvvae.loading import save_model
    from cvvae.training.cli import compat_command

    video = tmp_path / "moving.mp4"
    with av.open(str(video), "w") as container:  # 20 frames: one 17-frame window, 3 left out
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 24, 16, "yuv420p"
        for i in range(20):
            frame = np.zeros((16, 24, 3), np.uint8)
            frame[:, i % 24] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_image_vae(ImageVAE(IMAGE_PRESETS["tiny-image"]).eval(), tmp_path / "image")
    save_model(create_model("tiny-v1", seed=0), tmp_path / "video")
    args = ["--model", str(tmp_path / "video"), "--image-vae", str(tmp_path / "image"), "--input", str(video),
            "--height", "16", "--whole"]
    r = CliRunner().invoke(compat_command, args + ["--json", "--plot", str(tmp_path / "plot.png")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["frames"] == 20 and out["frames_left_out"] == 3 and out["summary"]["windows"] == len(out["windows"]) == 1
    assert len(out["per_frame_psnr"]) == 17 and math.isfinite(out["image_decoder_psnr"])
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    text = CliRunner().invoke(compat_command, args)
    assert text.exit_code == 0 and "1 windows of 17 (3 frames after the last whole window not evaluated)" in text.output
    # on 24-px frames a white bar moving one column per frame differs by 10.8 dB from frame to frame: every frame
    # reads as a cut to the PSNR threshold, so the window is marked and no within-shot worst is printed
    assert out["cuts"] == list(range(1, 20)) and "scene cut" in text.output and "within a shot" not in text.output
    bad = CliRunner().invoke(compat_command, args[:-1] + ["--plot", str(tmp_path / "p.png")])
    assert bad.exit_code == 2 and "--plot needs --whole" in bad.output
