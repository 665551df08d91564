"""The SD image VAE (ldm layout): architecture, diffusers key conversion, loading and saving."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cvvae.config import ConfigError
from cvvae.errors import CheckpointError
from cvvae.training.image_vae import (IMAGE_PRESETS, ImageVAE, ImageVAEConfig, diffusers_to_ldm, ldm_to_diffusers,
                             load_image_vae, save_image_vae)

TINY = IMAGE_PRESETS["tiny-image"]

# stabilityai/sd-vae-ft-mse config.json (the SD1/SD2 VAE), as diffusers writes it
SD_VAE_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 256,
}


@pytest.fixture(scope="module")
def tiny() -> ImageVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ImageVAE(TINY)
        with torch.no_grad():
            for name, p in model.named_parameters():  # non-trivial norms and biases, so every tensor matters
                if name.endswith("bias"):
                    p.normal_(0, 0.05)
                elif "norm" in name:
                    p.normal_(1, 0.1)
    return model.eval()


def test_sd_vae_architecture_counts():
    with torch.device("meta"):
        model = ImageVAE(IMAGE_PRESETS["sd-vae"])
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # SD1/SD2 first_stage_model
    assert len(sd) == 248
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)  # up.3 = lowest resolution
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1) and sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)


def test_config_from_diffusers_config():
    cfg = ImageVAEConfig.from_diffusers_config(SD_VAE_DIFFUSERS_CONFIG)
    assert cfg == ImageVAEConfig()  # sd-vae preset; scaling_factor defaults to 0.18215 when absent
    assert ImageVAEConfig.from_diffusers_config(TINY.to_diffusers_config()) == TINY
    eps5 = TINY.replace(eps=1e-5)
    assert eps5.to_diffusers_config()["norm_eps"] == 1e-5 and "norm_eps" not in TINY.to_diffusers_config()
    assert ImageVAEConfig.from_diffusers_config(eps5.to_diffusers_config()) == eps5
    with pytest.raises(ConfigError, match="act_fn"):
        ImageVAEConfig.from_diffusers_config({**SD_VAE_DIFFUSERS_CONFIG, "act_fn": "gelu"})


def test_shapes(tiny):
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = tiny.encode(x)
        xrec, post2 = tiny(x, generator=torch.Generator().manual_seed(0))
    assert posterior.mean.shape == (2, 4, 4, 6) and posterior.logvar.shape == (2, 4, 4, 6)
    assert tiny.decode(posterior.mean).shape == (2, 3, 32, 48)
    assert xrec.shape == (2, 3, 32, 48) and torch.equal(post2.mean, posterior.mean)


def test_key_conversion_named_pairs_and_round_trip(tiny):
    sd = tiny.state_dict()
    diff = ldm_to_diffusers(sd, TINY)
    # hand-picked pairs of the table (n = 4 levels, decoder up.{3-i} <-> up_blocks.{i})
    pairs = {
        "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down.2.downsample.conv.bias": "encoder.down_blocks.2.downsamplers.0.conv.bias",
        "encoder.mid.block_2.norm1.weight": "encoder.mid_block.resnets.1.norm1.weight",
        "encoder.norm_out.weight": "encoder.conv_norm_out.weight",
        "decoder.mid.attn_1.norm.bias": "decoder.mid_block.attentions.0.group_norm.bias",
        "decoder.mid.attn_1.proj_out.weight": "decoder.mid_block.attentions.0.to_out.0.weight",
        "decoder.up.3.block.2.conv1.weight": "decoder.up_blocks.0.resnets.2.conv1.weight",
        "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.bias": "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
        "quant_conv.weight": "quant_conv.weight",
    }
    for ldm_key, diff_key in pairs.items():
        assert diff_key in diff, diff_key
        assert torch.equal(diff[diff_key].flatten(), sd[ldm_key].flatten())
    assert diff["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)  # Linear in diffusers
    assert len(diff) == len(sd)
    back = diffusers_to_ldm(diff, TINY)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_legacy_attention_names(tiny):
    diff = ldm_to_diffusers(tiny.state_dict(), TINY)
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
              .replace("to_out.0", "proj_attn"): v for k, v in diff.items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    back = diffusers_to_ldm(legacy, TINY)
    assert all(torch.equal(back[k], v) for k, v in tiny.state_dict().items())


def test_save_load_round_trip(tiny, tmp_path):
    folder = save_image_vae(tiny, tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["block_out_channels"] == [32, 64, 64, 64]
    keys = set(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in keys and not any(".up." in k for k in keys)
    loaded = load_image_vae(folder)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.moments(x), tiny.moments(x))
        z = torch.randn(1, 4, 2, 3)
        assert torch.equal(loaded.decode(z), tiny.decode(z))
    with pytest.raises(FileExistsError):
        save_image_vae(tiny, folder)
    save_image_vae(tiny, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [".cvvae-output.json", "config.json",
                                                       "diffusion_pytorch_model.safetensors"]  # marker: ours
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]  # no temporary leftovers
    assert load_image_vae(folder, dtype=torch.float64).dtype == torch.float64


def test_load_ldm_checkpoint_with_wrapper_prefix_and_training_keys(tiny, tmp_path):
    sd = {f"first_stage_model.{k}": v for k, v in tiny.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    sd["first_stage_model.model_ema.decay"] = torch.tensor(0.999)
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "sd.ckpt")
    loaded = load_image_vae(tmp_path / "sd.ckpt", preset="tiny-image")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.moments(x), tiny.moments(x))
    # a bare ldm safetensors file takes its config from config.json beside it
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_diffusers_config()))
    assert torch.equal(load_image_vae(tmp_path / "vae.safetensors").decoder.conv_out.bias,
                       tiny.decoder.conv_out.bias)


def test_checkpoint_error_lists_offending_keys(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_image_vae(tmp_path / "bad.safetensors", preset="tiny-image")
    message = str(info.value)
    assert "1 missing: decoder.conv_out.bias" in message
    assert "1 unexpected: encoder.extra.weight" in message
    assert "1 mis-shaped: quant_conv.weight (checkpoint (8, 8, 3, 3), model (8, 8, 1, 1))" in message
    with pytest.raises(CheckpointError, match="no config.json"):
        load_image_vae(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_image_vae(tmp_path / "missing")
