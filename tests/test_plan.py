"""The chunk/tile plan: official numbers, invariants, and sizes the official tiler gets wrong (spec 6 and 12)."""

from __future__ import annotations

import itertools

import pytest

from cvvae.plan import PlanError, PlanSettings, blend_weights, make_plan, split_axis, split_time

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
    assert plan.padded_frames == GOLDEN.padded_frames(frames)
    assert (plan.padded_frames - 1) % 4 == 0 and 0 <= plan.padded_frames - frames < 4
    assert plan.latent_frames == (frames + 2) // 4 + 1 if frames > 1 else plan.latent_frames == 1
    # chunks cover every padded frame, consecutive chunks share one frame
    chunks = plan.encode_chunks
    assert chunks[0].start == 0 and chunks[-1].stop == plan.padded_frames
    assert all(b.start == a.stop - 1 for a, b in zip(chunks, chunks[1:]))
    for chunks in (plan.encode_chunks, plan.decode_chunks):  # the O(1) longest chunk the memory estimate uses
        assert chunks.longest == max(c.length for c in chunks)


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


def test_shape_arithmetic_lives_on_the_config_and_the_settings():
    """One definition of spec 5's sizes (cvvae.config.Compression), for any compression, not only 4x8."""
    from cvvae.config import ModelConfig, preset
    from cvvae.errors import InputError

    cfg = preset("cvvae-v1")  # 4 levels: time x4 (levels 0 and 2 halve time), space x8
    assert [cfg.num_latent_frames(t) for t in (1, 4, 5, 17, 18)] == [1, 1, 2, 5, 5]
    assert [cfg.num_output_frames(n) for n in (1, 2, 5)] == [1, 5, 17]
    assert [cfg.padded_frames(t) for t in (1, 2, 5, 6, 17)] == [1, 5, 5, 9, 17]
    assert [cfg.latent_cells(px) for px in (1, 8, 9, 720)] == [1, 1, 2, 90]
    assert [cfg.padded_pixels(px) for px in (1, 8, 9, 721)] == [8, 8, 16, 728]
    assert cfg.encoded_shape((2, 3, 17, 64, 96)) == (2, 4, 5, 8, 12)
    assert cfg.decoded_shape((2, 4, 5, 8, 12)) == (2, 3, 17, 64, 96)
    assert cfg.encoder_level_sizes(17, 64, 96) == [(17, 64, 96), (9, 32, 48), (9, 16, 24), (5, 8, 12)]
    assert cfg.decoder_level_sizes(5, 8, 12) == [(5, 8, 12), (9, 16, 24), (9, 32, 48), (17, 64, 96)]
    assert cfg.decode_chunk_latents == 4 and PlanSettings(chunk_frames=8).decode_chunk_latents == 2
    # 3 levels: one time-halving level (x2) and x4 in space
    small = ModelConfig(widths=(32, 32, 32), norm_num_groups=8, time_compress=2, spatial_compress=4, chunk_frames=8,
                        tile_spatial_size=32)
    assert small.encoded_shape((1, 3, 9, 32, 40)) == (1, 4, 5, 8, 10)
    assert small.encoder_level_sizes(9, 32, 40)[-1] == (5, 8, 10)
    assert small.decoder_level_sizes(5, 8, 10)[-1] == (9, 32, 40)
    settings = PlanSettings.from_config(small)
    assert (settings.padded_frames(6), settings.padded_pixels(33)) == (7, 36)
    plan = make_plan(settings, 6, 33, 40)
    assert (plan.padded_frames, plan.latent_frames, plan.latent_height, plan.latent_width) == (7, 4, 9, 10)
    with pytest.raises(InputError, match="a video needs at least 1 frame, got 0"):
        cfg.num_latent_frames(0)
    with pytest.raises(PlanError, match="a video needs at least 1 frame, got 0"):
        settings.padded_frames(0)
