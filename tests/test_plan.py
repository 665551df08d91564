"""The chunk/tile plan: official numbers, invariants, and sizes the official tiler gets wrong (spec 6 and 12)."""

from __future__ import annotations

import itertools

import pytest

from cvvae.plan import PlanError, PlanSettings, blend_weights, make_plan, padded_frame_count, split_axis, split_time

OFFICIAL = PlanSettings()  # 16-frame chunks, 576 px tiles, ratio 0.2222
GOLDEN = PlanSettings(tile_size=64, tile_overlap_ratio=0.25)


def test_official_tile_constants():
    assert OFFICIAL.tile_latent == 72
    assert OFFICIAL.tile_overlap_latent == 16  # round(72 * 0.2222)
    assert GOLDEN.tile_latent == 8 and GOLDEN.tile_overlap_latent == 2


def test_official_576x1024_example():
    plan = make_plan(OFFICIAL, 17, 576, 1024)
    assert plan.cols.starts == (0, 56) and plan.cols.sizes == (72, 72) and plan.cols.keeps == (56, 72)
    assert plan.rows.starts == (0,)
    d = plan.describe()
    assert d["tile_cols_px"] == [[0, 576], [448, 1024]]
    assert 8 * plan.cols.length == 1024


def test_spec12_inconsistent_official_rounding_keeps_size():
    # tile 48 px, ratio 0.2222: the official decoder turned 72x88 into 69x85; ours keeps 72x88.
    plan = make_plan(PlanSettings(tile_size=48, tile_overlap_ratio=0.2222), 5, 72, 88)
    assert plan.rows.overlap == 1  # round(6 * 0.2222)
    assert 8 * plan.rows.length == 72 and 8 * plan.cols.length == 88


@pytest.mark.parametrize("length,tile,overlap", list(itertools.product([1, 5, 8, 9, 14, 40, 97], [8, 12, 72], [0, 2, 3])))
def test_axis_invariants(length, tile, overlap):
    axis = split_axis(length, tile, overlap)
    assert axis.length == length  # crops sum to the size
    assert axis.starts[0] == 0 and axis.starts[-1] + axis.sizes[-1] == length  # tiles cover the axis
    for k in range(1, len(axis)):
        assert axis.starts[k] - axis.starts[k - 1] == tile - overlap
        assert axis.sizes[k - 1] == tile
        assert axis.sizes[k] > axis.overlap  # blending never goes out of bounds
    # each tile's kept part starts where the previous kept part ended
    assert [sum(axis.keeps[:k]) for k in range(len(axis))] == list(axis.starts)
    if length <= tile:
        assert len(axis) == 1


def test_blend_weights():
    assert blend_weights(4) == [0.0, 0.25, 0.5, 0.75]
    assert len(blend_weights(16)) == 16 and blend_weights(16)[-1] == 15 / 16


def test_encode_and_decode_chunks():
    assert [(c.start, c.stop, c.drop_first) for c in split_time(33, 16)] == [(0, 17, False), (16, 33, True)]
    assert [(c.start, c.stop) for c in split_time(17, 16)] == [(0, 17)]
    assert [(c.start, c.stop) for c in split_time(1, 16)] == [(0, 1)]
    assert [(c.start, c.stop) for c in split_time(9, 4)] == [(0, 5), (4, 9)]
    assert [(c.start, c.stop) for c in split_time(65, None)] == [(0, 65)]
    plan = make_plan(OFFICIAL, 65, 64, 64)
    assert len(plan.encode_chunks) == 4 and plan.latent_frames == 17
    assert [(c.start, c.stop) for c in plan.decode_chunks] == [(0, 5), (4, 9), (8, 13), (12, 17)]
    # decoded frames: 17 + 3 * 16 = 65
    assert sum(5 * 4 - 3 - int(c.drop_first) for c in plan.decode_chunks) == 65


@pytest.mark.parametrize("frames", range(1, 42))
def test_frame_padding_rule(frames):
    plan = make_plan(GOLDEN, frames, 16, 16)
    assert plan.padded_frames == padded_frame_count(frames)
    assert (plan.padded_frames - 1) % 4 == 0 and 0 <= plan.padded_frames - frames < 4
    assert plan.latent_frames == (frames + 2) // 4 + 1 if frames > 1 else plan.latent_frames == 1
    # chunks cover every padded frame, consecutive chunks share one frame
    chunks = plan.encode_chunks
    assert chunks[0].start == 0 and chunks[-1].stop == plan.padded_frames
    assert all(b.start == a.stop - 1 for a, b in zip(chunks, chunks[1:]))


def test_size_padding():
    plan = make_plan(GOLDEN, 5, 37, 101)
    assert (plan.padded_height, plan.padded_width) == (40, 104)
    assert (plan.latent_height, plan.latent_width) == (5, 13)


def test_bad_settings():
    with pytest.raises(PlanError, match="multiple of 4"):
        PlanSettings(chunk_frames=10)
    with pytest.raises(PlanError, match="too small"):
        PlanSettings(tile_size=8)
    with pytest.raises(PlanError, match="positive"):
        make_plan(GOLDEN, 0, 16, 16)
