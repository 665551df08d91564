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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from .errors import ConfigError, InputError, PlanError

Variant = Literal["v1", "sd3"]

V1_CLASS = "CVVAEModel"
SD3_CLASS = "CVVAESD3Model"
CLASS_TO_VARIANT: dict[str, Variant] = {V1_CLASS: "v1", SD3_CLASS: "sd3"}
VARIANT_TO_CLASS: dict[Variant, str] = {"v1": V1_CLASS, "sd3": SD3_CLASS}


# Upper bounds of config values: far above the released models (widths 128-512, 2 resnets per level, 4 or 16 latent
# channels, 16-frame chunks, 576 px tiles), low enough that a typo cannot ask for terabytes. What stays within them
# and still does not fit in memory is refused by the parameter-count check (cvvae.memory).
MAX_WIDTH = 8192
MAX_LEVELS = 8
MAX_LAYERS_PER_BLOCK = 32
MAX_LATENT_CHANNELS = 1024
MAX_IO_CHANNELS = 64
MAX_CHUNK_FRAMES = 1 << 16
MAX_TILE = 1 << 16
MAX_VIDEO_FRAMES = 1 << 31


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type (for messages about config.json)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return {"list": "list", "dict": "object", "tuple": "list"}.get(type(value).__name__, type(value).__name__)


def _was_null(d: dict[str, Any], key: str) -> bool:
    return key in d and d[key] is None


def _check_int(name: str, value: Any, *, lo: int, hi: int) -> None:
    """``value`` (or each item of a tuple/list) is an int (not a bool) in [lo, hi]."""
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name} must be an integer, got {v!r} (a {_json_type(v)})")
        if not lo <= v <= hi:
            raise ConfigError(f"{name}={v} is out of range: expected an integer in {lo}..{hi}")


def _check_float(name: str, value: Any, *, optional: bool = False, positive: bool = False) -> None:
    """``value`` is a finite number (not a bool), positive when asked; None only when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r} (a {_json_type(value)})")
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} must be a finite number")
    if positive and value <= 0:
        raise ConfigError(f"{name}={value} must be positive")


class _Reader:
    """Typed access to a config.json dict: each getter checks the JSON type and range of one key."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d

    def _get(self, key: str, default: Any, optional: bool) -> tuple[Any, bool]:
        value = self.d.get(key, default)
        if value is None:
            if not optional and default is not None:
                raise ConfigError(f"{key} must not be null (expected a value such as {default!r})")
            return None, True
        return value, False

    def integer(self, key: str, default: Any, *, hi: int, lo: int = 1, optional: bool = False) -> Any:
        value, null = self._get(key, default, optional)
        if not null:
            _check_int(key, value, lo=lo, hi=hi)
        return value

    def number(self, key: str, default: Any, *, optional: bool = False, positive: bool = False) -> Any:
        value, null = self._get(key, default, optional)
        if not null:
            _check_float(key, value, positive=positive)
            value = float(value)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.d.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r} (a {_json_type(value)})")
        return value

    def text(self, key: str, default: str) -> str:
        value = self.d.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r} (a {_json_type(value)})")
        return value

    def array(self, key: str, default: Any) -> list[Any]:
        value = self.d.get(key, default)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r} (a {_json_type(value)})")
        return list(value)

    def int_list(self, key: str, default: Any, *, hi: int) -> tuple[int, ...]:
        value = self.array(key, default)
        if not value:
            raise ConfigError(f"{key} must not be empty")
        _check_int(key, value, lo=1, hi=hi)
        return tuple(value)


class Compression:
    """The shape arithmetic of a VAE that compresses time ``time_compress``-fold and space ``spatial_compress``-fold
    (spec 5, 6.2), shared by :class:`ModelConfig` and :class:`cvvae.plan.PlanSettings`: latent counts, padded sizes
    and output sizes are computed here and nowhere else."""

    time_compress: int
    spatial_compress: int
    chunk_frames: int | None

    @property
    def decode_chunk_latents(self) -> int | None:
        """Latents per decode chunk (the chunk's frames / 4, spec 6.3; each chunk also takes the one it shares)."""
        return None if self.chunk_frames is None else self.chunk_frames // self.time_compress

    def num_latent_frames(self, num_frames: int) -> int:
        """floor((T-1)/4)+1: latents produced by T frames (spec 5)."""
        if num_frames < 1:
            raise InputError(f"a video needs at least 1 frame, got {num_frames}")
        return (num_frames - 1) // self.time_compress + 1

    def num_output_frames(self, num_latents: int) -> int:
        """4(L-1)+1: frames decoded from L latents (spec 5)."""
        if num_latents < 1:
            raise InputError(f"a latent needs at least 1 frame, got {num_latents}")
        return self.time_compress * (num_latents - 1) + 1

    def padded_frames(self, num_frames: int) -> int:
        """Smallest 1 + 4k >= T: the frames a video is padded to (the last frame repeats, spec 6.2)."""
        if num_frames < 1:
            raise PlanError(f"a video needs at least 1 frame, got {num_frames}")
        return 1 + -(-(num_frames - 1) // self.time_compress) * self.time_compress

    def latent_cells(self, pixels: int) -> int:
        """Latent cells of a frame side: ceil(pixels / 8), the side padded to a multiple of 8 (spec 6.2) over 8."""
        return -(-pixels // self.spatial_compress)

    def padded_pixels(self, pixels: int) -> int:
        """A frame side padded to a multiple of ``spatial_compress`` (the bottom/right edge repeats)."""
        return self.latent_cells(pixels) * self.spatial_compress


@dataclass(frozen=True)
class ModelConfig(Compression):
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
    # None = no temporal chunking / no spatial tiling (official ``null``); the overlap is only read when tiling.
    chunk_frames: int | None = 16
    time_compress: int = 4
    spatial_compress: int = 8
    tile_spatial_size: int | None = 576
    tile_overlap_ratio: float | None = 0.2222
    # The official config.json as read (kept so that saving writes back every key, unknown ones included).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.variant not in ("v1", "sd3"):
            raise ConfigError(f"unknown variant {self.variant!r}; expected 'v1' or 'sd3'")
        _check_int("widths", self.widths, lo=1, hi=MAX_WIDTH)
        if not 2 <= len(self.widths) <= MAX_LEVELS:
            raise ConfigError(f"widths {list(self.widths)} must list 2 to {MAX_LEVELS} resolution levels")
        _check_int("layers_per_block", self.layers_per_block, lo=1, hi=MAX_LAYERS_PER_BLOCK)
        _check_int("latent_channels", self.latent_channels, lo=1, hi=MAX_LATENT_CHANNELS)
        _check_int("in_channels", self.in_channels, lo=1, hi=MAX_IO_CHANNELS)
        _check_int("out_channels", self.out_channels, lo=1, hi=MAX_IO_CHANNELS)
        _check_int("norm_num_groups", self.norm_num_groups, lo=1, hi=MAX_WIDTH)
        bad = [w for w in self.widths if w % self.norm_num_groups]
        if bad:
            raise ConfigError(f"widths {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        for name in ("double_z", "causal_encoder", "causal_decoder", "half_3d"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not self.double_z:
            raise ConfigError("double_z=False is not supported: CV-VAE encoders output mean and logvar")
        for name in ("scaling_factor", "shift_factor"):
            _check_float(name, getattr(self, name), optional=True, positive=name == "scaling_factor")
        levels = len(self.widths) - 1
        _check_int("spatial_compress", self.spatial_compress, lo=1, hi=2 ** MAX_LEVELS)
        _check_int("time_compress", self.time_compress, lo=1, hi=2 ** MAX_LEVELS)
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
        if self.chunk_frames is not None:
            _check_int("chunk_frames", self.chunk_frames, lo=self.time_compress, hi=MAX_CHUNK_FRAMES)
            if self.chunk_frames % self.time_compress:
                raise ConfigError(
                    f"chunk_frames={self.chunk_frames} must be a multiple of time_compress={self.time_compress}"
                )
        if self.tile_spatial_size is not None:
            _check_int("tile_spatial_size", self.tile_spatial_size, lo=2 * self.spatial_compress, hi=MAX_TILE)
            if self.tile_overlap_ratio is None:
                raise ConfigError("tile_overlap_ratio is null but tile_spatial_size is set; a tiled model needs "
                                  "an overlap ratio in [0, 1) (the official class asserts this too)")
        if self.tile_overlap_ratio is not None:
            _check_float("tile_overlap_ratio", self.tile_overlap_ratio)
            if not 0.0 <= self.tile_overlap_ratio < 1.0:
                raise ConfigError(f"tile_overlap_ratio={self.tile_overlap_ratio} must be in [0, 1)")

    # ----- derived geometry ---------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.widths)

    @property
    def time_down_levels(self) -> tuple[int, ...]:
        """Encoder levels whose downsample also halves time: even, non-last levels (spec 3)."""
        return tuple(i for i in range(self.num_levels - 1) if i % 2 == 0)

    def encoded_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        """(B, z, L, h, w) of the mean (and of the logvar) the encoder makes of a (B, C, T, H, W) input whose H and
        W are multiples of ``spatial_compress`` (spec 5)."""
        b, _, t, h, w = video_shape
        s = self.spatial_compress
        return (b, self.latent_channels, self.num_latent_frames(t), h // s, w // s)

    def decoded_shape(self, latent_shape: Sequence[int]) -> tuple[int, ...]:
        """(B, C, T, H, W) of the pixels the decoder makes of a (B, z, L, h, w) latent (spec 5)."""
        b, _, l, h, w = latent_shape
        s = self.spatial_compress
        return (b, self.out_channels, self.num_output_frames(l), h * s, w * s)

    def encoder_level_sizes(self, frames: int, height: int, width: int) -> list[tuple[int, int, int]]:
        """(T, H, W) of the encoder's feature maps at each level, the input's first: every downsample halves H and
        W, those of :attr:`time_down_levels` also take T to (T-1)//2+1 (spec 3)."""
        sizes = [(frames, height, width)]
        for i in range(self.num_levels - 1):
            t, h, w = sizes[-1]
            sizes.append(((t - 1) // 2 + 1 if i in self.time_down_levels else t, h // 2, w // 2))
        return sizes

    def decoder_level_sizes(self, latents: int, height: int, width: int) -> list[tuple[int, int, int]]:
        """(T, H, W) of the decoder's feature maps at each level, the latent's (the lowest level) first: every
        upsample doubles H and W; those mirroring a time-downsampling level also take T to 2T-1 (spec 3)."""
        sizes = [(latents, height, width)]
        for i in reversed(range(1, self.num_levels)):
            t, h, w = sizes[-1]
            sizes.append((2 * t - 1 if i - 1 in self.time_down_levels else t, h * 2, w * 2))
        return sizes

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----- official config.json ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        """Read an official config.json dict (``_class_name`` picks the variant; v1 when absent).

        Every value is checked before anything is built: its JSON type (an integer is an integer, not ``"32"``,
        ``32.5`` or ``true``), its sign and its upper bound (:data:`LIMITS`), and floats are finite. Fields that
        are ``Optional`` in the official constructors may be ``null`` with the official meaning:
        ``en_de_n_frames_a_time`` (no temporal chunking), ``tile_spatial_size`` (no spatial tiling, and then
        ``tile_overlap_ratio`` may be null too), ``time_n_compress``/``spatial_n_compress`` (taken from the
        architecture; the official class needs them only for chunking/tiling), ``num_video_frames``.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object of settings, not a {_json_type(d)}")
        r = _Reader(d)
        class_name = r.text("_class_name", V1_CLASS)
        if class_name not in CLASS_TO_VARIANT:
            raise ConfigError(
                f"config _class_name {class_name!r} is not a CV-VAE; expected one of {sorted(CLASS_TO_VARIANT)}"
            )
        variant = CLASS_TO_VARIANT[class_name]
        causal_encoder, causal_decoder = r.flag("causal_encoder", True), r.flag("causal_decoder", False)
        half_3d = r.flag("half_3d", True)
        if not causal_encoder or causal_decoder or not half_3d:
            raise ConfigError(
                "only causal_encoder=True, causal_decoder=False, half_3d=True (the released models) are supported; "
                f"got causal_encoder={causal_encoder}, causal_decoder={causal_decoder}, half_3d={half_3d}"
            )
        for key in ("reshape_x_dim_to_4", "reshape_z_dim_to_4"):
            r.flag(key, False)
        num_video_frames = r.integer("num_video_frames", None, hi=MAX_VIDEO_FRAMES, optional=True)
        chunk_frames = r.integer("en_de_n_frames_a_time", 16, hi=MAX_CHUNK_FRAMES, optional=True)
        tile = r.integer("tile_spatial_size", 576, hi=MAX_TILE, optional=True)
        overlap = r.number("tile_overlap_ratio", 0.2222, optional=True)
        time_n = r.integer("time_n_compress", 4, hi=2 ** MAX_LEVELS, optional=True)
        space_n = r.integer("spatial_n_compress", 8, hi=2 ** MAX_LEVELS, optional=True)
        if time_n is None and (chunk_frames is not None or num_video_frames is not None):
            raise ConfigError("time_n_compress is null but en_de_n_frames_a_time or num_video_frames is set; set "
                              "time_n_compress (4), or make both null (no temporal chunking)")
        if tile is not None and space_n is None:
            raise ConfigError("tile_spatial_size is set but spatial_n_compress is null; set spatial_n_compress "
                              "(8) or make tile_spatial_size null for no spatial tiling")
        if variant == "v1":
            ch = r.integer("ch", 128, hi=MAX_WIDTH)
            ch_mult = r.int_list("ch_mult", (1, 2, 4, 4), hi=MAX_WIDTH)
            if r.array("attn_resolutions", []):
                raise ConfigError(f"attn_resolutions={d['attn_resolutions']} is not supported (released models: [])")
            if not r.flag("use_3d_conv", True):
                raise ConfigError("use_3d_conv=false is not supported (released models: true)")
            r.number("dropout", 0.0)
            r.text("encoder_attn_type", "vanilla-xformers")
            r.text("decoder_attn_type", "spatial-temporal-xformer")
            widths = tuple(ch * m for m in ch_mult)
            arch = dict(layers_per_block=r.integer("num_res_blocks", 2, hi=MAX_LAYERS_PER_BLOCK),
                        latent_channels=r.integer("z_channels", 4, hi=MAX_LATENT_CHANNELS),
                        out_channels=r.integer("out_ch", 3, hi=MAX_IO_CHANNELS),
                        scaling_factor=r.number("scaling_factor", 0.18215, optional=True, positive=True))
        else:
            widths = tuple(r.int_list("block_out_channels", (128, 256, 512, 512), hi=MAX_WIDTH))
            if r.text("act_fn", "silu") != "silu":
                raise ConfigError(f"act_fn={d['act_fn']!r} is not supported (released models: 'silu')")
            if not r.flag("mid_block_add_attention", True):
                raise ConfigError("mid_block_add_attention=false is not supported (released models: true)")
            for key, block in (("down_block_types", "DownEncoderBlock3D"), ("up_block_types", "UpDecoderBlock3D")):
                types = r.array(key, [block] * len(widths))
                if list(types) != [block] * len(widths):
                    raise ConfigError(f"{key}={types} is not supported: expected {len(widths)} x {block!r}, one per "
                                      "entry of block_out_channels")
            arch = dict(layers_per_block=r.integer("layers_per_block", 2, hi=MAX_LAYERS_PER_BLOCK),
                        latent_channels=r.integer("out_channels", 16, hi=MAX_LATENT_CHANNELS),
                        out_channels=3,
                        norm_num_groups=r.integer("norm_num_groups", 32, hi=MAX_WIDTH),
                        scaling_factor=r.number("scaling_factor", None, optional=True, positive=True))
        levels = len(widths)
        derived_time = 2 ** len([i for i in range(levels - 1) if i % 2 == 0])
        return cls(
            variant=variant,
            widths=widths,
            in_channels=r.integer("in_channels", 3, hi=MAX_IO_CHANNELS),
            shift_factor=r.number("shift_factor", None, optional=True),
            double_z=r.flag("double_z", True),
            causal_encoder=causal_encoder,
            causal_decoder=causal_decoder,
            half_3d=half_3d,
            chunk_frames=chunk_frames,
            time_compress=derived_time if time_n is None else time_n,
            spatial_compress=2 ** (levels - 1) if space_n is None else space_n,
            tile_spatial_size=tile,
            tile_overlap_ratio=overlap,
            extra=dict(d),
            **arch,
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
            # a null read stays null while unused (the official class reads them only for chunking/tiling)
            time_n_compress=(None if _was_null(d, "time_n_compress") and self.chunk_frames is None
                             and d.get("num_video_frames") is None else self.time_compress),
            spatial_n_compress=(None if _was_null(d, "spatial_n_compress") and self.tile_spatial_size is None
                                else self.spatial_compress),
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
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

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
