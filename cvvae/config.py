"""Model configuration for both CV-VAE variants (spec sections 1.1, 1.2 and 7).

One frozen dataclass describes the architecture of either released class:

* ``CVVAEModel`` (variant ``"v1"``, SD2.1-compatible, ldm-style keys), whose config.json speaks of ``ch``/``ch_mult``;
* ``CVVAESD3Model`` (variant ``"sd3"``, SD3-compatible, diffusers-style keys), whose config.json speaks of
  ``block_out_channels``/``layers_per_block``.

``ModelConfig.from_dict`` reads either official config.json; ``to_official_dict`` writes it back in the official
spelling, so a folder we save loads in the official code and vice versa. Runtime settings (chunk length, tile size,
overlap) live here too because the official checkpoints carry them in config.json; the runtime may override them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Variant = Literal["v1", "sd3"]

V1_CLASS = "CVVAEModel"
SD3_CLASS = "CVVAESD3Model"
CLASS_TO_VARIANT: dict[str, Variant] = {V1_CLASS: "v1", SD3_CLASS: "sd3"}
VARIANT_TO_CLASS: dict[Variant, str] = {"v1": V1_CLASS, "sd3": SD3_CLASS}


class ConfigError(ValueError):
    """A model config that cannot describe a supported CV-VAE."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and chunk/tile settings of one CV-VAE.

    ``widths`` are the channel counts of the resolution levels (v1: ``ch * ch_mult``; SD3: ``block_out_channels``).
    ``layers_per_block`` resnets per encoder level; the decoder has one more per level.
    """

    variant: Variant = "v1"
    widths: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    double_z: bool = True
    causal_encoder: bool = True
    causal_decoder: bool = False
    half_3d: bool = True
    # SD latent scale; None for SD3 whose config has none (spec 7: use SD3's 1.5305 / 0.0609 externally).
    scaling_factor: float | None = 0.18215
    shift_factor: float | None = None
    # Temporal chunk in frames for encode (decode uses chunk_frames // time_compress latents), spec 6.2/6.3.
    chunk_frames: int = 16
    time_compress: int = 4
    spatial_compress: int = 8
    tile_spatial_size: int = 576
    tile_overlap_ratio: float = 0.2222
    # The official config.json as read (kept so that saving writes back every key, unknown ones included).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.variant not in ("v1", "sd3"):
            raise ConfigError(f"unknown variant {self.variant!r}; expected 'v1' or 'sd3'")
        if len(self.widths) < 2:
            raise ConfigError(f"widths {self.widths} must list at least 2 resolution levels")
        bad = [w for w in self.widths if w % self.norm_num_groups]
        if bad:
            raise ConfigError(f"widths {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if not self.double_z:
            raise ConfigError("double_z=False is not supported: CV-VAE encoders output mean and logvar")
        if self.chunk_frames % self.time_compress:
            raise ConfigError(
                f"chunk_frames={self.chunk_frames} must be a multiple of time_compress={self.time_compress}"
            )
        if not 0.0 <= self.tile_overlap_ratio < 1.0:
            raise ConfigError(f"tile_overlap_ratio={self.tile_overlap_ratio} must be in [0, 1)")
        if self.tile_spatial_size < self.spatial_compress:
            raise ConfigError(f"tile_spatial_size={self.tile_spatial_size} is smaller than one latent cell")
        levels = len(self.widths) - 1
        if 2 ** levels != self.spatial_compress:
            raise ConfigError(
                f"{len(self.widths)} levels give spatial compression {2 ** levels}, "
                f"but spatial_compress={self.spatial_compress}"
            )
        if 2 ** len(self.time_down_levels) != self.time_compress:
            raise ConfigError(
                f"{len(self.widths)} levels give time compression {2 ** len(self.time_down_levels)}, "
                f"but time_compress={self.time_compress}"
            )

    # ----- derived geometry ---------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.widths)

    @property
    def time_down_levels(self) -> tuple[int, ...]:
        """Encoder levels whose downsample also halves time: even, non-last levels (spec 3)."""
        return tuple(i for i in range(self.num_levels - 1) if i % 2 == 0)

    @property
    def decode_chunk_latents(self) -> int:
        return self.chunk_frames // self.time_compress

    def num_latent_frames(self, num_frames: int) -> int:
        """floor((T-1)/4)+1: latents produced by T frames (spec 5)."""
        if num_frames < 1:
            raise ValueError(f"a video needs at least 1 frame, got {num_frames}")
        return (num_frames - 1) // self.time_compress + 1

    def num_output_frames(self, num_latents: int) -> int:
        """4(L-1)+1: frames decoded from L latents (spec 5)."""
        if num_latents < 1:
            raise ValueError(f"a latent needs at least 1 frame, got {num_latents}")
        return self.time_compress * (num_latents - 1) + 1

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----- official config.json ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read an official config.json dict (``_class_name`` picks the variant; v1 when absent)."""
        class_name = d.get("_class_name", V1_CLASS)
        if class_name not in CLASS_TO_VARIANT:
            raise ConfigError(
                f"config _class_name {class_name!r} is not a CV-VAE; expected one of {sorted(CLASS_TO_VARIANT)}"
            )
        variant = CLASS_TO_VARIANT[class_name]
        common = dict(
            double_z=bool(d.get("double_z", True)),
            causal_encoder=bool(d.get("causal_encoder", True)),
            causal_decoder=bool(d.get("causal_decoder", False)),
            half_3d=bool(d.get("half_3d", True)),
            chunk_frames=int(d.get("en_de_n_frames_a_time", 16)),
            time_compress=int(d.get("time_n_compress", 4)),
            spatial_compress=int(d.get("spatial_n_compress", 8)),
            tile_spatial_size=int(d.get("tile_spatial_size", 576)),
            tile_overlap_ratio=float(d.get("tile_overlap_ratio", 0.2222)),
            extra=dict(d),
        )
        if not common["causal_encoder"] or common["causal_decoder"] or not common["half_3d"]:
            raise ConfigError(
                "only causal_encoder=True, causal_decoder=False, half_3d=True (the released models) are supported; "
                f"got causal_encoder={common['causal_encoder']}, causal_decoder={common['causal_decoder']}, "
                f"half_3d={common['half_3d']}"
            )
        if variant == "v1":
            ch = int(d.get("ch", 128))
            ch_mult = tuple(int(m) for m in d.get("ch_mult", (1, 2, 4, 4)))
            if d.get("attn_resolutions"):
                raise ConfigError(f"attn_resolutions={d['attn_resolutions']} is not supported (released models: [])")
            return cls(
                variant="v1",
                widths=tuple(ch * m for m in ch_mult),
                layers_per_block=int(d.get("num_res_blocks", 2)),
                latent_channels=int(d.get("z_channels", 4)),
                in_channels=int(d.get("in_channels", 3)),
                out_channels=int(d.get("out_ch", 3)),
                scaling_factor=float(d.get("scaling_factor", 0.18215)),
                shift_factor=d.get("shift_factor"),
                **common,
            )
        return cls(
            variant="sd3",
            widths=tuple(int(c) for c in d.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=int(d.get("layers_per_block", 2)),
            latent_channels=int(d.get("out_channels", 16)),
            in_channels=int(d.get("in_channels", 3)),
            out_channels=3,
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            scaling_factor=d.get("scaling_factor"),
            shift_factor=d.get("shift_factor"),
            **common,
        )

    def to_official_dict(self) -> dict[str, Any]:
        """The config.json the official class reads (keys it does not know are kept from ``extra``)."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            _class_name=VARIANT_TO_CLASS[self.variant],
            double_z=self.double_z,
            causal_encoder=self.causal_encoder,
            causal_decoder=self.causal_decoder,
            half_3d=self.half_3d,
            en_de_n_frames_a_time=self.chunk_frames,
            time_n_compress=self.time_compress,
            spatial_n_compress=self.spatial_compress,
            tile_spatial_size=self.tile_spatial_size,
            tile_overlap_ratio=self.tile_overlap_ratio,
            in_channels=self.in_channels,
            num_video_frames=d.get("num_video_frames"),
            reshape_x_dim_to_4=d.get("reshape_x_dim_to_4", False),
            reshape_z_dim_to_4=d.get("reshape_z_dim_to_4", False),
        )
        if self.variant == "v1":
            ch = self.widths[0]
            if any(w % ch for w in self.widths):
                raise ConfigError(f"widths {self.widths} are not multiples of the first width; not a v1 ch_mult")
            d.update(
                ch=ch,
                ch_mult=[w // ch for w in self.widths],
                num_res_blocks=self.layers_per_block,
                z_channels=self.latent_channels,
                out_ch=self.out_channels,
                scaling_factor=self.scaling_factor,
                attn_resolutions=[],
                dropout=0.0,
                use_3d_conv=True,
                encoder_attn_type=d.get("encoder_attn_type", "vanilla-xformers"),
                decoder_attn_type=d.get("decoder_attn_type", "spatial-temporal-xformer"),
                force_upcast=d.get("force_upcast", True),
            )
        else:
            d.update(
                block_out_channels=list(self.widths),
                layers_per_block=self.layers_per_block,
                out_channels=self.latent_channels,
                norm_num_groups=self.norm_num_groups,
                act_fn="silu",
                mid_block_add_attention=True,
                down_block_types=["DownEncoderBlock3D"] * self.num_levels,
                up_block_types=["UpDecoderBlock3D"] * self.num_levels,
            )
            for key in ("scaling_factor", "shift_factor"):
                if getattr(self, key) is not None:
                    d[key] = getattr(self, key)
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def summary(self) -> dict[str, Any]:
        """Plain-data view (for manifests and `cvvae info`)."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["widths"] = list(self.widths)
        return d


# Presets: the released architectures and small configs for tests. The tiny ones equal ../shared/golden.
PRESETS: dict[str, ModelConfig] = {
    "cvvae-v1": ModelConfig(variant="v1"),
    "cvvae-sd3": ModelConfig(
        variant="sd3", latent_channels=16, scaling_factor=None, shift_factor=None
    ),
    "tiny-v1": ModelConfig(
        variant="v1", widths=(32, 64, 64, 64), tile_spatial_size=64, tile_overlap_ratio=0.25
    ),
    "tiny-sd3": ModelConfig(
        variant="sd3", widths=(32, 64, 64, 64), latent_channels=16, scaling_factor=None,
        tile_spatial_size=64, tile_overlap_ratio=0.25,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None
