"""Synthetic motion (cvvae.training.motion): pans shift by their speed, zooms scale, rotations turn, parallax layers move
at their own speeds, and the trajectory stays inside the picture."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cvvae.training.motion import (
    MOTION_KINDS,
    MotionLimits,
    ellipse_masks,
    pan,
    parallax,
    rotate,
    synthesize,
    warp_frames,
    zoom,
)


def _texture(h: int = 160, w: int = 200, seed: int = 0) -> np.ndarray:
    """A smooth random picture (bilinear sampling of it is close to the continuous image)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(h // 8 + 2, w // 8 + 2, 3))
    ys, xs = np.linspace(0, h // 8, h), np.linspace(0, w // 8, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
           + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    return img.round().astype(np.uint8)


def test_warp_at_integer_centres_copies_pixels():
    src = np.random.default_rng(1).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    centers = np.array([[20.5, 15.5], [10.5, 10.5]])  # even size: the crop centre falls between pixels
    out = warp_frames(src, centers, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], src[8:24, 13:29])
    np.testing.assert_array_equal(out[1], src[3:19, 3:19])


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_pan_of_k_px_per_frame_shifts_content_by_k(k):
    src = np.random.default_rng(k).integers(0, 256, size=(64, 300, 3), dtype=np.uint8)
    clip = pan(np.random.default_rng(0), src, 17, 32, (float(k), 0.0))
    assert clip.shape == (17, 32, 32, 3)
    for t in range(16):  # frame t+1 at column x shows what frame t showed at x + k
        np.testing.assert_array_equal(clip[t + 1][:, : 32 - k], clip[t][:, k:])
    assert not np.array_equal(clip[1], clip[0])
    down = pan(np.random.default_rng(0), src.transpose(1, 0, 2).copy(), 17, 32, (0.0, -float(k)))
    for t in range(16):  # moving up: frame t+1 at row y shows frame t's row y - k
        np.testing.assert_array_equal(down[t + 1][k:], down[t][: 32 - k])


def test_pan_at_a_fractional_speed_is_the_bilinear_shift():
    src = _texture()
    clip = pan(np.random.default_rng(3), src, 9, 32, (2.5, 1.5)).astype(np.float64)
    # two steps of (2.5, 1.5) is an integer shift of (5, 3)
    np.testing.assert_allclose(clip[2][: 32 - 3, : 32 - 5], clip[0][3:, 5:], atol=1.0)
    # one step on a smooth picture: about the half-pixel shifted content (bilinear), not the unshifted one
    err_shifted = np.abs(clip[1][:-2, :-3] - 0.5 * (clip[0][1:-1, 2:-1] + clip[0][2:, 3:])).mean()
    err_still = np.abs(clip[1] - clip[0]).mean()
    assert err_shifted < 0.35 * err_still


def test_pan_that_does_not_fit_returns_none_and_synthesize_slows_down():
    src = _texture(80, 80)
    assert pan(np.random.default_rng(0), src, 17, 64, (12.0, 0.0)) is None  # 192 px of travel in 80 px
    clip = synthesize(np.random.default_rng(0), "pan", src, 17, 64, MotionLimits(max_speed=12.0))
    assert clip.shape == (17, 64, 64, 3)
    with pytest.raises(ValueError, match="too small for pan crops of 64 px"):
        synthesize(np.random.default_rng(0), "pan", _texture(48, 48), 17, 64)
    with pytest.raises(ValueError, match="unknown motion kind 'shake'"):
        synthesize(np.random.default_rng(0), "shake", src, 17, 64)


def test_zoom_magnifies_by_the_rate():
    src = _texture(200, 200)
    rate = math.log(2.0) / 8  # x2 after 8 frames
    clip = zoom(np.random.default_rng(0), src, 9, 64, rate)
    assert clip.shape == (9, 64, 64, 3)
    # frame 8 is frame 0's centre 32x32 enlarged 2x: downsample frame 8 by 2 and compare with frame 0's centre
    half = clip[8].astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    centre = clip[0][16:48, 16:48].astype(np.float64)
    assert np.abs(half - centre).mean() < 4.0
    assert np.abs(clip[8].astype(float) - clip[0]).mean() > 3 * np.abs(half - centre).mean()


def test_rotation_turns_the_picture_about_the_crop_centre():
    src = _texture(200, 200)
    clip = rotate(np.random.default_rng(0), src, 31, 64, 3.0)  # 90 degrees after 30 frames
    turned = np.rot90(clip[0], k=1, axes=(0, 1)).astype(np.float64)  # a quarter turn of frame 0
    other = np.rot90(clip[0], k=-1, axes=(0, 1)).astype(np.float64)
    err = np.abs(clip[30] - turned)[8:-8, 8:-8].mean()
    assert err < 3.0 and err < 0.25 * np.abs(clip[30] - other)[8:-8, 8:-8].mean()


def test_parallax_layers_move_at_their_own_speeds():
    back = np.random.default_rng(5).integers(0, 256, size=(64, 200, 3), dtype=np.uint8)
    front = np.random.default_rng(6).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    clip = parallax(rng, back, front, 9, 48, (2.0, 0.0), (-4.0, 0.0))
    assert clip.shape == (9, 48, 48, 3)
    # the layer moves left by 4 px/frame (frame t+1 at x shows frame t at x + 4), the background, panned right by
    # 2 px/frame, slides left by 2 (frame t+1 at x shows frame t at x + 2)
    bg_ok = fg_ok = 0
    for t in range(8):
        a, b = clip[t].astype(int), clip[t + 1].astype(int)
        fg = (b[:, :-4] == a[:, 4:]).all(axis=-1)
        bg = (b[:, :-2] == a[:, 2:]).all(axis=-1)
        fg_ok += fg.sum()
        bg_ok += bg.sum()
    assert fg_ok > 8 * 48 * 44 * 0.05  # the foreground layer is a sizeable, rigidly moving region
    assert bg_ok > 8 * 48 * 46 * 0.3
    assert fg_ok + bg_ok > 8 * 48 * 44 * 0.8  # (random pixels: a wrong speed matches almost nowhere)
    masks = ellipse_masks(np.array([[10.0, 20.0]]), (5.0, 8.0), 32)
    assert masks[0, 20, 10] == 1.0 and masks[0, 20, 16] == 0.0 and masks[0, 29, 10] == 0.0
    assert 0.0 < masks[0, 20, 15] < 1.0  # the one-pixel soft edge


@pytest.mark.parametrize("kind", MOTION_KINDS)
def test_synthesize_is_a_function_of_the_generator(kind):
    src, other = _texture(150, 220, seed=1), _texture(150, 220, seed=2)
    a = synthesize(np.random.default_rng(9), kind, src, 17, 64, second=other)
    b = synthesize(np.random.default_rng(9), kind, src, 17, 64, second=other)
    c = synthesize(np.random.default_rng(10), kind, src, 17, 64, second=other)
    assert a.shape == (17, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
