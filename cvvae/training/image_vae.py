"""Stable Diffusion's 2D KL autoencoder in the ldm layout, loadable without diffusers.

This is the image VAE that CV-VAE v1 is compatible with (SD2.1's ``first_stage_model``) and that it is inflated from
(:mod:`.inflate`, spec 9). The module tree uses the ldm key names of SD checkpoints, which are also the key names
of CV-VAE v1 (``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1``, ``decoder.up.{i}`` with ``up.{n-1}`` running
first), so the 2D and 3D weights line up key for key:

* ``encoder``: conv_in, per level ``num_res_blocks`` resnets and a stride-2 downsample (zero pad right/bottom by 1),
  mid block (resnet, single-head attention with 1x1 conv q/k/v/proj_out, resnet), norm_out, SiLU, conv_out (2z);
* ``quant_conv`` (1x1, 2z -> 2z) after the encoder, ``post_quant_conv`` (1x1, z -> z) before the decoder;
* ``decoder``: conv_in, mid block, per level ``num_res_blocks + 1`` resnets and a nearest x2 + conv3x3 upsample,
  norm_out, SiLU, conv_out. GroupNorm eps 1e-6 (CV-VAE v1 uses 1e-5, spec 2.1).

Checkpoints: a diffusers ``AutoencoderKL`` folder (keys converted by :func:`diffusers_to_ldm`), or an ldm state_dict
file (SD ``.ckpt``/``.safetensors`` with ``first_stage_model.``, a bare VAE ``.ckpt``, ...). ``save_image_vae`` writes
the diffusers layout, so a saved folder loads in diffusers and here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..blocks import ldm_decoder_forward, ldm_encoder_forward
from ..errors import CheckpointError, ConfigError, InputError
from ..fsutil import atomic_path
from ..loading import read_state_dict
from ..model import DiagonalGaussian

log = logging.getLogger(__name__)

DIFFUSERS_CLASS = "AutoencoderKL"
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_EPS = 1e-6  # diffusers hard-codes GroupNorm eps 1e-6 in AutoencoderKL; other values go in "norm_eps"
LDM_PREFIX = "first_stage_model."
IGNORED_PREFIXES = ("loss.", "model_ema.")


@dataclass(frozen=True)
class ImageVAEConfig:
    """Architecture of an SD-style KL autoencoder (ldm argument names). Widths are ``ch * ch_mult``."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    norm_num_groups: int = 32
    eps: float = 1e-6
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # SD1/SD2 VAEs have both 1x1 convs; the SD3/Flux VAEs have neither (diffusers use_quant_conv=False).
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if len(self.ch_mult) < 1:
            raise ConfigError("ch_mult must list at least one level")
        bad = [w for w in self.widths if w % self.norm_num_groups]
        if bad:
            raise ConfigError(f"widths {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def spatial_compress(self) -> int:
        return 2 ** (self.num_levels - 1)

    def replace(self, **changes: Any) -> "ImageVAEConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> "ImageVAEConfig":
        """Read a diffusers ``AutoencoderKL`` config.json dict."""
        class_name = d.get("_class_name", DIFFUSERS_CLASS)
        if class_name != DIFFUSERS_CLASS:
            raise ConfigError(f"config _class_name {class_name!r} is not {DIFFUSERS_CLASS!r}")
        widths = [int(c) for c in d.get("block_out_channels", (64,))]
        ch = widths[0]
        if any(w % ch for w in widths):
            raise ConfigError(f"block_out_channels {widths} are not multiples of the first width (no ldm ch_mult)")
        unsupported = {
            "act_fn": (d.get("act_fn", "silu"), "silu"),
            "mid_block_add_attention": (d.get("mid_block_add_attention", True), True),
            "down_block_types": (set(d.get("down_block_types", ["DownEncoderBlock2D"])), {"DownEncoderBlock2D"}),
            "up_block_types": (set(d.get("up_block_types", ["UpDecoderBlock2D"])), {"UpDecoderBlock2D"}),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ConfigError(f"AutoencoderKL config {key}={got!r} is not supported (expected {want!r})")
        shift = d.get("shift_factor")
        return cls(
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=int(d.get("layers_per_block", 1)),
            z_channels=int(d.get("latent_channels", 4)),
            in_channels=int(d.get("in_channels", 3)),
            out_ch=int(d.get("out_channels", 3)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            eps=float(d.get("norm_eps", DIFFUSERS_EPS)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=None if shift is None else float(shift),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``AutoencoderKL`` config.json (``norm_eps`` only when eps is not diffusers' 1e-6)."""
        n = self.num_levels
        d: dict[str, Any] = {
            "_class_name": DIFFUSERS_CLASS,
            "act_fn": "silu",
            "block_out_channels": list(self.widths),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "in_channels": self.in_channels,
            "out_channels": self.out_ch,
            "latent_channels": self.z_channels,
            "layers_per_block": self.num_res_blocks,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": True,
            "force_upcast": True,
        }
        if self.eps != DIFFUSERS_EPS:
            d["norm_eps"] = self.eps
        return d


IMAGE_PRESETS: dict[str, ImageVAEConfig] = {
    "sd-vae": ImageVAEConfig(),  # SD1.x / SD2.x first_stage_model, 83.65M parameters
    "tiny-image": ImageVAEConfig(ch=32, ch_mult=(1, 2, 2, 2)),  # same widths as the tiny-v1 CV-VAE preset
}


def image_preset(name: str) -> ImageVAEConfig:
    try:
        return IMAGE_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown image VAE preset {name!r}; available: {', '.join(sorted(IMAGE_PRESETS))}") from None


# ----- 2D modules (ldm names) -----------------------------------------------------------------------------------
class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, *, eps: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock2D(nn.Module):
    """Single-head self-attention over the H*W tokens with 1x1 conv projections, plus the residual."""

    def __init__(self, channels: int, *, eps: float, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).unflatten(2, x.shape[2:])
        return x + self.proj_out(a)


class Downsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid2D(nn.Module):
    def __init__(self, channels: int, *, eps: float, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock2D(channels, channels, eps=eps, groups=groups)
        self.attn_1 = AttnBlock2D(channels, eps=eps, groups=groups)
        self.block_2 = ResnetBlock2D(channels, channels, eps=eps, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list[nn.Module], sampler_name: str, sampler: nn.Module | None) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList()  # attn_resolutions=[]: no keys, kept for the ldm tree shape
    if sampler is not None:
        level.add_module(sampler_name, sampler)
    return level


class Encoder2D(nn.Module):
    """Pixels (B,3,H,W) -> raw moments (B,2z,H/8,W/8) (before quant_conv)."""

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        kw = dict(eps=cfg.eps, groups=cfg.norm_num_groups)
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = widths[0]
        for i, cout in enumerate(widths):
            blocks = [ResnetBlock2D(cin if j == 0 else cout, cout, **kw) for j in range(cfg.num_res_blocks)]
            cin = cout
            self.down.append(_level(blocks, "downsample", Downsample2D(cout) if i < cfg.num_levels - 1 else None))
        self.mid = _Mid2D(cin, **kw)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=cfg.eps)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ldm_encoder_forward(self, x)


class Decoder2D(nn.Module):
    """Latents (B,z,h,w) (after post_quant_conv) -> pixels (B,3,8h,8w)."""

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        kw = dict(eps=cfg.eps, groups=cfg.norm_num_groups)
        widths = cfg.widths
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid2D(cin, **kw)
        levels: list[nn.Module] = []
        for i in reversed(range(cfg.num_levels)):
            blocks = [ResnetBlock2D(cin if j == 0 else widths[i], widths[i], **kw)
                      for j in range(cfg.num_res_blocks + 1)]
            cin = widths[i]
            levels.insert(0, _level(blocks, "upsample", Upsample2D(cin) if i > 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=cfg.eps)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ldm_decoder_forward(self, z)


class ImageVAE(nn.Module):
    """SD's KL autoencoder: ``encoder`` -> ``quant_conv`` -> posterior; ``post_quant_conv`` -> ``decoder``.

    Latents are unscaled (multiply by ``config.scaling_factor`` for a diffusion UNet).
    """

    def __init__(self, config: ImageVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ImageVAEConfig()
        z = config.z_channels
        self.encoder = Encoder2D(config)
        self.decoder = Decoder2D(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,2z,H/8,W/8): mean and logvar (unclamped) after quant_conv."""
        m = self.encoder(x)
        return m if self.quant_conv is None else self.quant_conv(m)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise InputError(f"expected images (B,{self.config.in_channels},H,W), got {tuple(x.shape)}")
        return DiagonalGaussian.from_moments(self.moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise InputError(f"expected latents (B,{self.config.z_channels},h,w), got {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


# ----- key conversion: diffusers AutoencoderKL <-> ldm ------------------------------------------------------------
# Leaf renames inside a module, ldm name -> diffusers names (the first is written, all are read; the others are the
# legacy attention names diffusers still loads with _from_deprecated_attn_block).
_RESNET_LEAVES = {"nin_shortcut": ("conv_shortcut",)}
_ATTN_LEAVES = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
                "proj_out": ("to_out.0", "proj_attn")}


def module_table(cfg: ImageVAEConfig) -> list[tuple[str, str, dict[str, tuple[str, ...]]]]:
    """(ldm module, diffusers module, leaf renames) for every module of the image VAE.

    The decoder's ``up_blocks.{i}`` runs i-th (lowest resolution first), which is ldm's ``up.{n-1-i}``.
    """
    n = cfg.num_levels
    rows: list[tuple[str, str, dict[str, tuple[str, ...]]]] = []
    plain: dict[str, tuple[str, ...]] = {}
    for part in ("encoder", "decoder"):
        rows.append((f"{part}.conv_in", f"{part}.conv_in", plain))
        rows.append((f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _RESNET_LEAVES))
        rows.append((f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _ATTN_LEAVES))
        rows.append((f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _RESNET_LEAVES))
        rows.append((f"{part}.norm_out", f"{part}.conv_norm_out", plain))
        rows.append((f"{part}.conv_out", f"{part}.conv_out", plain))
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            rows.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _RESNET_LEAVES))
        if i < n - 1:
            rows.append((f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", plain))
        for j in range(cfg.num_res_blocks + 1):
            rows.append((f"decoder.up.{n - 1 - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _RESNET_LEAVES))
        if i < n - 1:
            rows.append((f"decoder.up.{n - 1 - i}.upsample", f"decoder.up_blocks.{i}.upsamplers.0", plain))
    rows.append(("quant_conv", "quant_conv", plain))
    rows.append(("post_quant_conv", "post_quant_conv", plain))
    return rows


def _split_leaf(rest: str, leaves: Mapping[str, tuple[str, ...]], *, to_ldm: bool) -> tuple[str, bool] | None:
    """Rename the leaf module of ``rest`` ("<leaf>.weight"); return (new rest, is attention linear) or None."""
    for ldm_name, diffusers_names in leaves.items():
        sources = diffusers_names if to_ldm else (ldm_name,)
        target = ldm_name if to_ldm else diffusers_names[0]
        for src in sources:
            if rest.startswith(src + "."):
                return target + rest[len(src):], leaves is _ATTN_LEAVES and ldm_name != "norm"
    return None


def _convert(sd: Mapping[str, torch.Tensor], cfg: ImageVAEConfig, *, to_ldm: bool) -> dict[str, torch.Tensor]:
    table = sorted(module_table(cfg), key=lambda row: -len(row[1 if to_ldm else 0]))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new_key = key  # keys matching no row pass through and are reported as unexpected by the loader
        for ldm_mod, diff_mod, leaves in table:
            src_mod, dst_mod = (diff_mod, ldm_mod) if to_ldm else (ldm_mod, diff_mod)
            if not key.startswith(src_mod + "."):
                continue
            rest = key[len(src_mod) + 1:]
            leaf = _split_leaf(rest, leaves, to_ldm=to_ldm) if leaves else None
            if leaf is None:
                new_key = f"{dst_mod}.{rest}"
            else:
                new_key = f"{dst_mod}.{leaf[0]}"
                if leaf[1] and rest.endswith(".weight"):  # attention projection: Linear [C,C] <-> 1x1 conv [C,C,1,1]
                    value = value.reshape(*value.shape[:2], 1, 1) if to_ldm else value.reshape(value.shape[:2])
            break
        if new_key in out:
            raise CheckpointError(f"checkpoint maps two keys onto {new_key} (e.g. both to_q and legacy query)")
        out[new_key] = value
    return out


def diffusers_to_ldm(sd: Mapping[str, torch.Tensor], cfg: ImageVAEConfig) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys (legacy attention names included) -> ldm keys of :class:`ImageVAE`."""
    return _convert(sd, cfg, to_ldm=True)


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor], cfg: ImageVAEConfig) -> dict[str, torch.Tensor]:
    """ldm keys -> diffusers ``AutoencoderKL`` keys (current attention names, Linear-shaped weights)."""
    return _convert(sd, cfg, to_ldm=False)


def is_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd)


# ----- loading and saving ---------------------------------------------------------------------------------------
def normalize_image_state_dict(sd: Mapping[str, torch.Tensor], cfg: ImageVAEConfig) -> dict[str, torch.Tensor]:
    """ldm keys from a raw state_dict: select ``first_stage_model.*`` when present, drop ``loss.*``/``model_ema.*``
    (logged), and convert diffusers-layout keys."""
    if any(k.startswith(LDM_PREFIX) for k in sd):
        others = [k for k in sd if not k.startswith(LDM_PREFIX)]
        if others:
            log.info("using the %d first_stage_model.* tensors; ignoring %d others (UNet, text encoder, ...)",
                     len(sd) - len(others), len(others))
        sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    ignored = sorted(k for k in sd if k.startswith(IGNORED_PREFIXES))
    if ignored:
        log.info("ignoring %d training-only keys (loss.*, model_ema.*), e.g. %s", len(ignored), ignored[0])
    kept = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    return diffusers_to_ldm(kept, cfg) if is_diffusers_layout(kept) else dict(kept)


def check_image_keys(model: ImageVAE, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped key (ldm names)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
                       for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
            parts.append(f"{len(keys)} {title}: {shown}")
    if parts:
        raise CheckpointError(
            f"image VAE checkpoint {source} does not match the architecture (widths {list(model.config.widths)}, "
            f"z_channels {model.config.z_channels}): " + "; ".join(parts)
            + ". Check the config.json or preset that goes with these weights."
        )


def load_image_vae(path: str | Path, *, preset: str | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", trust_pickle: bool = False) -> ImageVAE:
    """Load an SD image VAE from a diffusers ``AutoencoderKL`` folder or an ldm/diffusers state_dict file.

    The config comes from ``preset`` when given, else from the folder's (or the file's sibling) ``config.json``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"image VAE checkpoint {path} does not exist")
    if path.is_dir():
        weights = next((path / n for n in DIFFUSERS_WEIGHT_NAMES if (path / n).exists()), None)
        if weights is None:
            raise CheckpointError(f"{path} holds none of {', '.join(DIFFUSERS_WEIGHT_NAMES)}; not an AutoencoderKL "
                                  "folder (for a single weights file, pass the file)")
        config_file = path / "config.json"
    else:
        weights, config_file = path, path.parent / "config.json"
    if preset is not None:
        cfg = image_preset(preset)
    elif config_file.exists():
        cfg = ImageVAEConfig.from_diffusers_config(json.loads(config_file.read_text()))
    else:
        raise CheckpointError(f"no config.json beside {weights}; pass preset= (one of {', '.join(IMAGE_PRESETS)})")
    sd = normalize_image_state_dict(read_state_dict(weights, trust_pickle=trust_pickle), cfg)
    model = ImageVAE(cfg)
    check_image_keys(model, sd, str(weights))
    model.load_state_dict(sd)
    log.info("loaded image VAE (widths %s, z %d) from %s", list(cfg.widths), cfg.z_channels, weights)
    return model.to(device=device, dtype=dtype).eval()


def save_image_vae(model: ImageVAE, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write a diffusers ``AutoencoderKL`` folder (config.json + diffusion_pytorch_model.safetensors), atomically."""
    folder = Path(folder)
    sd = ldm_to_diffusers(model.state_dict(), model.config)
    with atomic_path(folder, overwrite=overwrite, directory=True, kind="model") as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_diffusers_config(), indent=2) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        (tmp / DIFFUSERS_WEIGHT_NAMES[0]).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    return folder
