"""Checkpoint loading: official layouts, single files, training checkpoints, presets, and errors that name keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import max_abs
from cvvae.config import ConfigError, ModelConfig, preset
from cvvae.errors import CheckpointError
from cvvae.loading import create_model, infer_config, load_model, save_model
from cvvae.model import CVVAE

X = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _same_outputs(a: CVVAE, b: CVVAE) -> None:
    assert max_abs(a.encode(X).mean, b.encode(X).mean) == 0.0


def test_full_size_keys_and_counts():
    """Spec 3/4/7 sanity numbers on meta tensors (no memory): 254/182,446,475 (v1) and 244/181,892,515 (SD3)."""
    with torch.device("meta"):
        v1, sd3 = CVVAE(preset("cvvae-v1")), CVVAE(preset("cvvae-sd3"))
    sd = v1.state_dict()
    assert len(sd) == 254 and sum(t.numel() for t in sd.values()) == 182_446_475
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1, 1)
    assert sd["encoder.down.0.downsample.conv.weight"].shape == (128, 128, 3, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3, 3)
    assert sd["decoder.up.3.upsample.conv.weight"].shape == (1024, 512, 3, 3, 3)
    assert sd["decoder.up.2.upsample.conv.weight"].shape == (512, 512, 3, 3, 3)
    assert sd["decoder.up.1.upsample.conv.weight"].shape == (512, 256, 3, 3, 3)
    assert sd["decoder.mid.attn_1.q_t.weight"].shape == (512, 512)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1, 1)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    sd = sd3.state_dict()
    assert len(sd) == 244 and sum(t.numel() for t in sd.values()) == 181_892_515
    assert sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["encoder.down_blocks.2.resnets.0.conv_shortcut.weight"].shape == (512, 256, 1, 1)
    assert sd["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3, 3)
    assert sd["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == (1024, 512, 3, 3, 3)
    assert sd["decoder.up_blocks.1.upsamplers.0.conv.weight"].shape == (512, 512, 3, 3, 3)
    assert sd["decoder.up_blocks.2.upsamplers.0.conv.weight"].shape == (512, 256, 3, 3, 3)
    assert sd["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in sd
    assert sd["decoder.conv_norm_out.weight"].shape == (128,)


def test_sd3_official_layout_round_trip(golden_sd3, tmp_path):
    model = load_model(golden_sd3 / "checkpoint")
    assert model.config.variant == "sd3" and model.config.latent_channels == 16
    assert model.config.scaling_factor is None
    out = save_model(model, tmp_path / "sd3")
    saved = json.loads((out / "config.json").read_text())
    official = json.loads((golden_sd3 / "checkpoint" / "config.json").read_text())
    for key in ("_class_name", "block_out_channels", "out_channels", "layers_per_block", "tile_spatial_size"):
        assert saved[key] == official[key]
    assert load_file(str(out / "diffusion_pytorch_model.safetensors")).keys() == \
        load_file(str(golden_sd3 / "checkpoint" / "diffusion_pytorch_model.safetensors")).keys()
    _same_outputs(model, load_model(out))


def test_vae3d_subfolder_and_bin(golden_v1, tmp_path):
    folder = tmp_path / "release" / "vae3d"
    folder.mkdir(parents=True)
    shutil.copy(golden_v1 / "checkpoint" / "config.json", folder)
    sd = load_file(str(golden_v1 / "checkpoint" / "diffusion_pytorch_model.safetensors"))
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    model = load_model(tmp_path / "release")
    _same_outputs(model, load_model(golden_v1 / "checkpoint"))
    (tmp_path / "release" / "vae3d_sd3").mkdir()
    shutil.copy(golden_v1 / "checkpoint" / "config.json", tmp_path / "release" / "vae3d_sd3")
    with pytest.raises(CheckpointError, match="several CV-VAE subfolders"):
        load_model(tmp_path / "release")
    assert load_model(tmp_path / "release", subfolder="vae3d").config.variant == "v1"


def test_lightning_checkpoint_with_training_keys(golden_v1, tmp_path, caplog):
    sd = load_file(str(golden_v1 / "checkpoint" / "diffusion_pytorch_model.safetensors"))
    ckpt = {"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                           "model.loss.logvar": torch.zeros(()),
                           "model.loss.discriminator.main.0.weight": torch.zeros(4, 3, 3, 3, 3),
                           "model.constraint_decoder.conv_in.weight": torch.zeros(128, 4, 3, 3)},
            "global_step": 10}
    torch.save(ckpt, tmp_path / "last.ckpt")
    with caplog.at_level("INFO"):
        model = load_model(tmp_path / "last.ckpt", preset="tiny-v1")
    assert len(model.checkpoint_info.ignored_keys) == 3
    assert "ignoring 3 keys" in caplog.text
    _same_outputs(model, load_model(golden_v1 / "checkpoint"))


def test_bare_safetensors_infers_config(golden_v1, tmp_path):
    shutil.copy(golden_v1 / "checkpoint" / "diffusion_pytorch_model.safetensors", tmp_path / "w.safetensors")
    model = load_model(tmp_path / "w.safetensors")
    assert model.checkpoint_info.config_source == "inferred from tensor shapes"
    assert model.config.widths == (32, 64, 64, 64) and model.config.latent_channels == 4
    # the config.json carried the 64 px tiles; the inferred one falls back to the release's 576
    assert model.config.tile_spatial_size == 576


def test_sd3_legacy_attention_names(golden_sd3, tmp_path):
    sd = load_file(str(golden_sd3 / "checkpoint" / "diffusion_pytorch_model.safetensors"))
    legacy = {k.replace("attentions.0.to_q", "attentions.0.query").replace("attentions.0.to_out.0", "attentions.0.proj_attn"): v
              for k, v in sd.items()}
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    model = load_model(tmp_path / "legacy.safetensors")
    _same_outputs(model, load_model(golden_sd3 / "checkpoint"))


def test_mismatch_error_lists_offending_keys(golden_v1, tmp_path):
    sd = load_file(str(golden_v1 / "checkpoint" / "diffusion_pytorch_model.safetensors"))
    del sd["decoder.mid.attn_1.q_t.weight"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad.safetensors", preset="tiny-v1")
    msg = str(e.value)
    assert "1 missing: decoder.mid.attn_1.q_t.weight" in msg
    assert "1 unexpected: encoder.extra.weight" in msg
    assert "encoder.conv_in.weight (checkpoint (32, 3, 3, 3), model (32, 3, 3, 3, 3))" in msg


def test_wrong_variant_preset(golden_v1):
    with pytest.raises(CheckpointError, match="does not match the sd3 architecture"):
        load_model(golden_v1 / "checkpoint" / "diffusion_pytorch_model.safetensors", preset="tiny-sd3")


def test_loader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a CV-VAE checkpoint folder"):
        load_model(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors"):
        load_model(tmp_path / "junk.safetensors")
    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a CV-VAE state_dict"):
        load_model(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_model("random:nope")
    with pytest.raises(ConfigError, match="not a CV-VAE"):
        ModelConfig.from_dict({"_class_name": "AutoencoderKL"})


def test_dtype_and_random_models():
    model = load_model("random:tiny-sd3", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.encode(X).mean.dtype == torch.bfloat16
    a, b = create_model("tiny-v1", seed=1), create_model("tiny-v1", seed=1)
    _same_outputs(a, b)
    assert infer_config(a.state_dict()).widths == (32, 64, 64, 64)
