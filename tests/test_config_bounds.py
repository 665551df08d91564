"""Config values are typed and bounded, official nulls keep their meaning, and memory estimates refuse what cannot fit.

(Issue 13, items 4, 5 and 11; the CLI side is tests/test_hardening_cli.py.)
"""

from __future__ import annotations

import math
import re

import pytest

from cvvae import memory
from cvvae.config import PRESETS, ConfigError, ModelConfig
from cvvae.errors import ResourceError
from cvvae.loading import create_model
from cvvae.plan import PlanSettings, estimate_memory, make_plan

V1 = PRESETS["cvvae-v1"].to_official_dict()
SD3 = PRESETS["cvvae-sd3"].to_official_dict()


@pytest.mark.parametrize("change, message", [
    ({"ch": "32"}, "ch must be an integer, got '32' (a string)"),
    ({"ch": 32.5}, "ch must be an integer, got 32.5 (a number)"),
    ({"ch": 128.0}, "ch must be an integer, got 128.0"),
    ({"z_channels": True}, "z_channels must be an integer, got True (a boolean)"),
    ({"ch": -32}, "ch=-32 is out of range: expected an integer in 1..8192"),
    ({"ch": 0}, "ch=0 is out of range"),
    ({"ch_mult": [1, 2, "4", 4]}, "ch_mult must be an integer, got '4'"),
    ({"ch_mult": []}, "ch_mult must not be empty"),
    ({"ch_mult": [1, 2, 4, 4, 4, 4, 4, 4, 4]}, "must list 2 to 8 resolution levels"),
    ({"num_res_blocks": 33}, "num_res_blocks=33 is out of range: expected an integer in 1..32"),
    ({"scaling_factor": math.nan}, "scaling_factor=nan must be a finite number"),
    ({"scaling_factor": math.inf}, "scaling_factor=inf must be a finite number"),
    ({"scaling_factor": -0.18}, "scaling_factor=-0.18 must be positive"),
    ({"tile_overlap_ratio": 1.5}, "tile_overlap_ratio=1.5 must be in [0, 1)"),
    ({"tile_overlap_ratio": "0.25"}, "tile_overlap_ratio must be a number, got '0.25'"),
    ({"en_de_n_frames_a_time": 10}, "chunk_frames=10 must be a multiple of time_compress=4"),
    ({"tile_spatial_size": 8}, "tile_spatial_size=8 is out of range: expected an integer in 16..65536"),
    ({"double_z": 1}, "double_z must be true or false, got 1 (a number)"),
    ({"attn_resolutions": "none"}, "attn_resolutions must be a list"),
    ({"z_channels": None}, "z_channels must not be null"),
    ({"tile_overlap_ratio": None}, "tile_overlap_ratio is null but tile_spatial_size is set"),
    ({"time_n_compress": None}, "time_n_compress is null but en_de_n_frames_a_time or num_video_frames is set"),
    ({"spatial_n_compress": None}, "tile_spatial_size is set but spatial_n_compress is null"),
    ({"num_video_frames": 0}, "num_video_frames=0 is out of range"),
])
def test_v1_values_are_typed_and_bounded(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict({**V1, **change})


@pytest.mark.parametrize("change, message", [
    ({"block_out_channels": [128, 256, 512.5, 512]}, "block_out_channels must be an integer, got 512.5"),
    ({"layers_per_block": -1}, "layers_per_block=-1 is out of range"),
    ({"out_channels": 100000}, "out_channels=100000 is out of range: expected an integer in 1..1024"),
    ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
    ({"down_block_types": ["DownEncoderBlock3D"] * 3}, "down_block_types="),
    ({"mid_block_add_attention": False}, "mid_block_add_attention=false is not supported"),
])
def test_sd3_values_are_typed_and_bounded(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict({**SD3, **change})


@pytest.mark.parametrize("data", [[V1], "config", 3, None])
def test_config_must_be_an_object(data):
    with pytest.raises(ConfigError, match="a model config must be a JSON object of settings, not a"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("base", [V1, SD3], ids=["v1", "sd3"])
def test_official_optional_fields_as_null(base):
    cfg = ModelConfig.from_dict({**base, "en_de_n_frames_a_time": None, "time_n_compress": None,
                                 "tile_spatial_size": None, "tile_overlap_ratio": None,
                                 "spatial_n_compress": None, "num_video_frames": None})
    assert (cfg.chunk_frames, cfg.tile_spatial_size, cfg.tile_overlap_ratio) == (None, None, None)
    assert (cfg.time_compress, cfg.spatial_compress, cfg.decode_chunk_latents) == (4, 8, None)
    settings = PlanSettings.from_config(cfg)
    plan = make_plan(settings, 41, 600, 700)
    assert len(plan.encode_chunks) == 1 and plan.num_tiles == 1
    # --tile-size on a model without tiling gets the default overlap
    assert PlanSettings.from_config(cfg, tile_size=256).tile_overlap_ratio == 0.2222
    # written back as the official class reads it: nulls stay null
    official = cfg.to_official_dict()
    for key in ("en_de_n_frames_a_time", "time_n_compress", "tile_spatial_size", "tile_overlap_ratio",
                "spatial_n_compress", "num_video_frames"):
        assert official[key] is None, key
    assert ModelConfig.from_dict(official) == cfg
    # each one alone
    assert ModelConfig.from_dict({**base, "en_de_n_frames_a_time": None}).chunk_frames is None
    assert ModelConfig.from_dict({**base, "tile_spatial_size": None}).tile_overlap_ratio == 0.2222
    assert ModelConfig.from_dict({**base, "num_video_frames": 17}).chunk_frames == 16


def test_parameter_count_is_exact_and_allocates_nothing():
    for name in ("tiny-v1", "tiny-sd3"):
        assert memory.parameter_count(PRESETS[name]) == create_model(name).num_parameters()
    assert memory.parameter_count(PRESETS["cvvae-v1"]) == 182_446_475  # meta device: no 730 MB allocated


def test_too_large_model_is_refused_with_the_estimate(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1_000_000_000)
    big = ModelConfig.from_dict({**V1, "ch": 512})  # 2.9 G parameters, within the bounds
    with pytest.raises(ResourceError, match=r"a model of 2,91\d,\d{3},\d{3} parameters .* needs about 23\.\d GB "
                                            r"\(weights 23\.\d GB, headroom 268\.4 MB\), but only 1\.0 GB"):
        create_model(big)
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # unknown: nothing is refused
    assert memory.check_model_fits(PRESETS["tiny-v1"]) == 3_849_579


def test_plan_memory_estimate_and_refusal(monkeypatch):
    cfg = PRESETS["tiny-v1"]
    plan = make_plan(PlanSettings.from_config(cfg), 17, 256, 256)
    est = memory.plan_memory(plan, cfg, direction="decode")
    assert est == estimate_memory(cfg, plan, "decode")  # the one estimate (cvvae.plan), not a second model
    assert memory.plan_memory(plan, cfg).total == max(estimate_memory(cfg, plan, d).total for d in ("encode", "decode"))
    batched = memory.plan_memory(plan, cfg, direction="decode", batch_tiles=True)
    assert plan.num_tiles == 25 and batched.activations > 20 * est.activations  # all 25 tiles at once
    monkeypatch.setattr(memory, "available_memory", lambda: est.total - 1)
    with pytest.raises(ResourceError, match=r"decode 1 x 17 frames of 256x256 in 64 px tiles needs about "
                                            r"\d\.\d\d GiB \(decode: activations "):
        memory.check_plan_fits(plan, cfg, direction="decode")
    monkeypatch.setattr(memory, "available_memory", lambda: est.total)
    assert memory.check_plan_fits(plan, cfg, direction="decode").total == est.total


def test_available_memory_reads_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   12345678 kB\n")
    assert memory._meminfo_available(tmp_path / "meminfo") == 12345678 * 1024
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert memory._cgroup_remaining(tmp_path) == 600000
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_remaining(tmp_path) is None
    assert memory.available_memory() is None or memory.available_memory() > 0


def test_long_plans_are_summarized():
    plan = make_plan(PlanSettings.from_config(PRESETS["tiny-v1"]), 100_000_000, 64, 64)
    d = plan.describe()
    assert d["encode_chunk_count"] == 6_250_000 and len(plan.encode_chunks) == 6_250_000
    assert d["encode_chunks_frames"] == [[0, 17], [16, 33], [32, 49], [99999968, 99999985], [99999984, 100000001]]
    assert plan.encode_chunks[-1].drop_first and not plan.encode_chunks[0].drop_first
    assert plan.encode_chunks[1:3] == [plan.encode_chunks[1], plan.encode_chunks[2]]
    short = make_plan(PlanSettings.from_config(PRESETS["tiny-v1"]), 65, 64, 64).describe()
    assert short["encode_chunks_frames"] == [[0, 17], [16, 33], [32, 49], [48, 65]]
