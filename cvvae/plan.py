"""The one chunk/tile plan (spec sections 5, 6.2-6.5 and 12).

A :class:`VideoPlan` is a pure function of the plan settings and an input shape. It lists

* how the input is padded so that it has 1+4k frames and sizes that are multiples of 8 (and how to crop back);
* the temporal chunks for encode (17 frames, sharing one frame, first latent of later chunks dropped) and decode
  (5 latents, sharing one latent, first frame of later chunks dropped);
* the spatial tiles along each axis with their blend overlap and crop.

Every backend executes the same plan (``cvvae.tiling``), so backends agree by construction. Tile geometry is kept in
latent cells and every pixel quantity is derived from it (x ``spatial_compress``), which keeps the output size equal to
the input size for any setting; for settings where the official rounding is consistent (576 px / 0.2222 and
64 px / 0.25) the tiles equal the official ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, overload

from .config import Compression, ModelConfig
from .errors import ConfigError, PlanError


@dataclass(frozen=True)
class PlanSettings(Compression):
    """Chunk and tile settings. ``None`` disables chunking (``chunk_frames``) or tiling (``tile_size``)."""

    chunk_frames: int | None = 16
    tile_size: int | None = 576  # pixels; the latent tile is tile_size // spatial_compress
    tile_overlap_ratio: float = 0.2222
    time_compress: int = 4
    spatial_compress: int = 8

    def __post_init__(self) -> None:
        if self.chunk_frames is not None and (self.chunk_frames < self.time_compress
                                              or self.chunk_frames % self.time_compress):
            raise PlanError(
                f"chunk_frames={self.chunk_frames} must be a positive multiple of {self.time_compress} "
                "(or None for no temporal chunking)"
            )
        if self.tile_size is not None and self.tile_size < 2 * self.spatial_compress:
            raise PlanError(f"tile_size={self.tile_size} px is too small; use at least {2 * self.spatial_compress}")
        if not 0.0 <= self.tile_overlap_ratio < 1.0:
            raise PlanError(f"tile_overlap_ratio={self.tile_overlap_ratio} must be in [0, 1)")

    @classmethod
    def from_config(cls, cfg: ModelConfig, **overrides: Any) -> "PlanSettings":
        base: dict[str, Any] = dict(chunk_frames=cfg.chunk_frames, tile_size=cfg.tile_spatial_size,
                                    time_compress=cfg.time_compress, spatial_compress=cfg.spatial_compress)
        if cfg.tile_overlap_ratio is not None:  # null (no tiling): a --tile-size override gets the default overlap
            base["tile_overlap_ratio"] = cfg.tile_overlap_ratio
        base.update(overrides)
        return cls(**base)

    @property
    def tile_latent(self) -> int | None:
        return None if self.tile_size is None else self.tile_size // self.spatial_compress

    @property
    def tile_overlap_latent(self) -> int:
        """Blend width in latent cells: round(latent_tile * ratio), as the official encoder computes it."""
        return 0 if self.tile_latent is None else round(self.tile_latent * self.tile_overlap_ratio)

    def as_dict(self) -> dict[str, Any]:
        return dict(chunk_frames=self.chunk_frames, tile_size=self.tile_size,
                    tile_overlap_ratio=self.tile_overlap_ratio, time_compress=self.time_compress,
                    spatial_compress=self.spatial_compress)


@dataclass(frozen=True)
class Chunk:
    """Items [start, stop) of the time axis; ``drop_first`` drops the first output item (the shared one)."""

    start: int
    stop: int
    drop_first: bool

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class AxisTiles:
    """Tiles along one spatial axis, in latent cells.

    Tile k covers latent cells [starts[k], starts[k] + sizes[k]) (pixels x ``spatial_compress``). After blending its
    first ``overlap`` cells with the previous tile's last ``overlap`` cells, tile k keeps its first ``keeps[k]`` cells.
    """

    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    overlap: int
    keeps: tuple[int, ...]

    @property
    def length(self) -> int:
        return sum(self.keeps)

    def __len__(self) -> int:
        return len(self.starts)


def blend_weights(overlap: int) -> list[float]:
    """Weight of the current tile at offsets 0..overlap-1 of the overlap: k / overlap (the previous gets 1 - k/O)."""
    return [k / overlap for k in range(overlap)]


def split_axis(length: int, tile: int | None, overlap: int) -> AxisTiles:
    """Tiles of ``tile`` cells every ``tile - overlap`` cells, stopping after the first that reaches the end."""
    if length < 1:
        raise PlanError(f"cannot tile an axis of length {length}")
    if tile is None or length <= tile:
        return AxisTiles((0,), (length,), 0, (length,))
    if not 0 <= overlap < tile:
        raise PlanError(f"tile overlap {overlap} must be smaller than the tile ({tile} latent cells)")
    stride = tile - overlap
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + stride)
    sizes = tuple(min(tile, length - s) for s in starts)
    keeps = tuple([stride] * (len(starts) - 1) + [sizes[-1]])
    return AxisTiles(tuple(starts), sizes, overlap, keeps)


class TimeChunks(Sequence[Chunk]):
    """Chunks of ``chunk + 1`` items every ``chunk`` items of a time axis, computed on access.

    A sequence rather than a tuple so that a plan for any length (10^8 frames) costs O(1) memory and time.
    """

    def __init__(self, length: int, chunk: int | None) -> None:
        self.length, self.chunk = length, chunk
        self._count = 1 if chunk is None else max(1, math.ceil((length - 1) / chunk))

    def __len__(self) -> int:
        return self._count

    @property
    def longest(self) -> int:
        """Length of the longest chunk (the first one), in O(1) whatever the count."""
        return self[0].length

    @overload
    def __getitem__(self, index: int) -> Chunk: ...

    @overload
    def __getitem__(self, index: slice) -> list[Chunk]: ...

    def __getitem__(self, index: int | slice) -> Chunk | list[Chunk]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"chunk {index} of {self._count}")
        if self.chunk is None:
            return Chunk(0, self.length, False)
        start = index * self.chunk
        return Chunk(start, min(start + self.chunk + 1, self.length), index > 0)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TimeChunks):
            return (self.length, self._count, self.chunk) == (other.length, other._count, other.chunk)
        return isinstance(other, (tuple, list)) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash((self.length, self.chunk))

    def __repr__(self) -> str:
        return f"TimeChunks(length={self.length}, chunk={self.chunk}, count={self._count})"

    def summary(self) -> list[list[int]]:
        """[start, stop] of every chunk, or of the first and last few when there are many (:func:`summarize`)."""
        return [[self[i].start, self[i].stop] for i in summarize(range(len(self)))]


SUMMARY_HEAD, SUMMARY_TAIL = 3, 2


def summarize(items: Sequence[Any]) -> list[Any]:
    """All items, or the first :data:`SUMMARY_HEAD` and the last :data:`SUMMARY_TAIL` when there are more."""
    n = len(items)
    if n <= SUMMARY_HEAD + SUMMARY_TAIL:
        return [items[i] for i in range(n)]
    return [items[i] for i in (*range(SUMMARY_HEAD), *range(n - SUMMARY_TAIL, n))]


def split_time(length: int, chunk: int | None) -> TimeChunks:
    """Chunks of ``chunk + 1`` items every ``chunk`` items (consecutive chunks share one item), spec 6.2/6.3."""
    if length < 1:
        raise PlanError(f"cannot chunk a time axis of length {length}")
    return TimeChunks(length, chunk)


@dataclass(frozen=True)
class VideoPlan:
    """Everything a backend needs to encode or decode one video of a given shape."""

    settings: PlanSettings
    num_frames: int          # as given
    height: int
    width: int
    padded_frames: int       # 1 + 4k >= num_frames (trailing frames repeat the last one)
    padded_height: int       # multiple of spatial_compress >= height (bottom rows replicate the edge)
    padded_width: int
    encode_chunks: TimeChunks          # in frames
    decode_chunks: TimeChunks          # in latents
    rows: AxisTiles                    # in latent cells
    cols: AxisTiles

    @property
    def latent_frames(self) -> int:
        return self.settings.num_latent_frames(self.padded_frames)

    @property
    def latent_height(self) -> int:
        return self.settings.latent_cells(self.padded_height)

    @property
    def latent_width(self) -> int:
        return self.settings.latent_cells(self.padded_width)

    @property
    def num_tiles(self) -> int:
        return len(self.rows) * len(self.cols)

    def describe(self) -> dict[str, Any]:
        """Plain data for manifests, `cvvae info` and latent-file metadata.

        Chunk lists of long videos are summarized: the first 3 and the last 2 chunks, with the counts beside them.
        """
        s = self.settings.spatial_compress
        return {
            "settings": self.settings.as_dict(),
            "input": [self.num_frames, self.height, self.width],
            "padded": [self.padded_frames, self.padded_height, self.padded_width],
            "latent": [self.latent_frames, self.latent_height, self.latent_width],
            "encode_chunk_count": len(self.encode_chunks),
            "decode_chunk_count": len(self.decode_chunks),
            "encode_chunks_frames": self.encode_chunks.summary(),
            "decode_chunks_latents": self.decode_chunks.summary(),
            "tile_row_count": len(self.rows),
            "tile_col_count": len(self.cols),
            "tile_rows_px": [[self.rows.starts[i] * s, (self.rows.starts[i] + self.rows.sizes[i]) * s]
                             for i in summarize(range(len(self.rows)))],
            "tile_cols_px": [[self.cols.starts[i] * s, (self.cols.starts[i] + self.cols.sizes[i]) * s]
                             for i in summarize(range(len(self.cols)))],
            "tile_overlap_px": self.rows.overlap * s if len(self.rows) > 1 else self.cols.overlap * s,
        }


def make_plan(settings: PlanSettings, num_frames: int, height: int, width: int) -> VideoPlan:
    """Plan the encode/decode of a ``num_frames`` x ``height`` x ``width`` video."""
    if min(num_frames, height, width) < 1:
        raise PlanError(f"video shape T={num_frames}, H={height}, W={width} must be positive in every axis")
    padded_frames = settings.padded_frames(num_frames)
    return VideoPlan(
        settings=settings,
        num_frames=num_frames, height=height, width=width,
        padded_frames=padded_frames, padded_height=settings.padded_pixels(height),
        padded_width=settings.padded_pixels(width),
        encode_chunks=split_time(padded_frames, settings.chunk_frames),
        decode_chunks=split_time(settings.num_latent_frames(padded_frames), settings.decode_chunk_latents),
        rows=split_axis(settings.latent_cells(height), settings.tile_latent, settings.tile_overlap_latent),
        cols=split_axis(settings.latent_cells(width), settings.tile_latent, settings.tile_overlap_latent),
    )


def make_latent_plan(settings: PlanSettings, latent_frames: int, latent_height: int, latent_width: int,
                     *, num_frames: int | None = None, height: int | None = None,
                     width: int | None = None) -> VideoPlan:
    """Plan for decoding a latent; the original video size (if known) says how much to crop back."""
    s = settings.spatial_compress
    full_t, full_h, full_w = settings.num_output_frames(latent_frames), latent_height * s, latent_width * s
    num_frames, height, width = num_frames or full_t, height or full_h, width or full_w
    plan = make_plan(settings, num_frames, height, width)
    if (plan.latent_frames, plan.latent_height, plan.latent_width) != (latent_frames, latent_height, latent_width):
        raise PlanError(
            f"original size T={num_frames}, H={height}, W={width} does not fit a latent of "
            f"{latent_frames}x{latent_height}x{latent_width} (it needs {plan.latent_frames}x{plan.latent_height}x"
            f"{plan.latent_width}); the metadata does not belong to this latent"
        )
    return plan


# ----- frame slices: how pure torch inference runs a large layer (cvvae.slicing; issue 16) ------------------------
# Part of the plan because the memory estimate depends on it: a sliced layer holds its input and output plus a few
# slices, not the four to six whole tensors of the layer run whole.

SLICE_BYTES = 64 << 20  # a slice of one activation stays below this (default model, 17x256x456: 3 frames of 17)
SLICE_BYTES_ENV = "CVVAE_SLICE_BYTES"  # overrides SLICE_BYTES for a process; 0 runs every layer whole

Slices = list[tuple[int, int]]
_slice_limit: list[int | None] = [None]  # None: not read from the environment yet


def slice_limit() -> int:
    """Bytes per slice for this process (:data:`SLICE_BYTES`, or ``$CVVAE_SLICE_BYTES``); 0: slicing is off."""
    if _slice_limit[0] is None:
        value = os.environ.get(SLICE_BYTES_ENV, "").strip()
        try:
            _slice_limit[0] = max(0, int(value)) if value else SLICE_BYTES
        except ValueError:
            raise ConfigError(f"{SLICE_BYTES_ENV}={value!r} is not a byte count; expected an integer such as "
                              f"{SLICE_BYTES} (0 turns frame slicing off)") from None
    return _slice_limit[0]


@contextmanager
def slice_bytes(limit: int | None) -> Iterator[None]:
    """Use ``limit`` bytes per slice inside the block (tests force tiny slices); ``None`` turns slicing off."""
    saved = _slice_limit[0]
    _slice_limit[0] = limit if limit is not None else 0
    try:
        yield
    finally:
        _slice_limit[0] = saved


def slice_step(frames: int, size: int, limit: int) -> int:
    """Frames per slice of a tensor of ``size`` (bytes or elements) over ``frames`` frames, for slices of about
    ``limit`` (same unit): what :func:`frame_slices` runs and the memory estimate counts."""
    return max(1, math.ceil(frames * limit / size))


def frame_slices(frames: int, tensor_bytes: int) -> Slices | None:
    """Ranges of output frames, each of them about :func:`slice_limit` bytes of a ``tensor_bytes`` tensor with
    ``frames`` frames; ``None`` when the tensor is small enough (or has one frame) and runs whole."""
    limit = slice_limit()
    if limit <= 0 or frames <= 1 or tensor_bytes <= limit:
        return None
    step = slice_step(frames, tensor_bytes, limit)
    return [(j, min(j + step, frames)) for j in range(0, frames, step)]


# ----- memory: one estimate of a plan's peak, and the plan that fits a budget (spec 6.2-6.5) --------------------
#
# Peak memory of a chunk/tile is dominated by the activations of the largest resolution level: a resnet holds its
# input, the normalised/activated copy, the padded copy its 3D conv reads and the conv outputs; the decoder's time
# upsampling conv writes 2C channels at full resolution and permutes them into time (another copy). The figures
# below count those tensors per stage (in elements, following the forward code of cvvae/blocks.py) and multiply by
# ACTIVATION_CALIBRATION; the convolution library's own buffers (oneDNN's reordered weights and inputs) add a
# workspace that grows with the weights of the component. Both were fitted against peak RSS measured with
# benchmarks/memory_calibration.py (docs/benchmarks.md, "Memory estimate"): measured/counted was 1.17-1.42 for the
# default, tiny and full-size encoders and decoders, except the full-size decoder at a small tile (2.51: 1078 MB
# above 714 MB counted, i.e. 1.45 x counted + 1.74 x its 434 MB of weights). The estimate is on the high side.
# The torch reference runs large layers frame-sliced in inference (cvvae.slicing): counted with their input, output
# and SLICE_TEMPORARIES slices, measured/counted was 1.22-1.59 over the same cases in a fresh process; a whole job
# (encode and decode, chunk after chunk, in the one heap the allocator keeps) fragments that heap, and the README
# job peaked at up to 3.00 GiB over 12 runs, which needs 2.0 x counted (SLICED_ACTIVATION_CALIBRATION). The sliced
# estimate is used only where it is below the whole-layer one.

ACTIVATION_CALIBRATION = 1.45  # measured peak activation bytes / counted bytes, largest ratio measured
SLICED_ACTIVATION_CALIBRATION = 2.0  # the same for frame-sliced layers (torch inference), whole jobs included
WORKSPACE_PER_WEIGHT_BYTE = 1.9  # convolution workspace per byte of the running component's weights
RUNTIME_BASELINE_BYTES = 450 << 20  # interpreter, torch, codecs and the video I/O buffers of a job, measured RSS
MIN_TILE_PX = 64               # the smallest tile the fitting will choose; below it the overlap is < 2 latent cells


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one encode or decode job (bytes)."""

    direction: str
    baseline: int      # process, libraries, I/O buffers
    weights: int       # parameters of the model (the runtime holds encoder and decoder)
    activations: int   # the largest chunk/tile's activations at its widest stage, and the conv workspace
    io: int            # the whole-video tensors the job holds (input pixels, latents, output pixels)
    tile_px: tuple[int, int]  # largest tile, pixels (H, W)
    chunk_frames: int  # frames of the largest chunk (decode: output frames of the largest chunk)

    @property
    def total(self) -> int:
        return self.baseline + self.weights + self.activations + self.io

    def as_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total, "direction": self.direction, "baseline_bytes": self.baseline,
                "weights_bytes": self.weights, "activations_bytes": self.activations, "video_buffers_bytes": self.io,
                "tile_px": list(self.tile_px), "chunk_frames": self.chunk_frames}

    def describe(self) -> str:
        gib = 1 << 30
        return (f"{self.total / gib:.2f} GiB ({self.direction}: activations {self.activations / gib:.2f} GiB for a "
                f"{self.chunk_frames}x{self.tile_px[0]}x{self.tile_px[1]} tile, weights {self.weights / gib:.2f}, "
                f"video buffers {self.io / gib:.2f}, runtime {self.baseline / gib:.2f})")


def _resnet_elems(cin: int, cout: int, t: int, pixels: int, causal: bool) -> int:
    """Live elements at a half-3D resnet's widest moment (cvvae/blocks.py ResnetBlock3D.forward).

    conv1: input x, silu(norm1(x)), its padded copy (causal convs pad by concatenation), output h;
    conv2: x, h, silu(norm2(h)), its (B*T) flattened copy, the output, and the residual sum.
    """
    padded = cin * (t + 2) * pixels if causal else 0
    conv1 = 2 * cin * t * pixels + padded + cout * t * pixels
    conv2 = cin * t * pixels + 5 * cout * t * pixels
    return max(conv1, conv2)


SLICE_TEMPORARIES = 4  # slice-sized buffers alive in a sliced layer: the normalised input frames with their halo,
                       # the space-padded copy, the conv output and the convolution library's reordered input


def _layer(whole: int, held: int, biggest: int, frames: int, slice_elements: int | None) -> int:
    """Live elements of one layer: ``whole`` when it runs whole; when frame-sliced (:func:`frame_slices`: its larger
    tensor of ``biggest`` elements over ``frames`` frames exceeds a slice), the ``held`` whole tensors (input and
    output) plus :data:`SLICE_TEMPORARIES` slices."""
    if slice_elements is None or frames <= 1 or biggest <= slice_elements:
        return whole
    return held + SLICE_TEMPORARIES * slice_step(frames, biggest, slice_elements) * math.ceil(biggest / frames)


def activation_elements(cfg: ModelConfig, direction: str, frames: int, height: int, width: int, *,
                        slice_elements: int | None = None) -> int:
    """Peak live activation elements of one tile: ``frames`` x ``height`` x ``width`` pixels (decode: the frames
    it outputs; height/width in pixels, multiples of the spatial compression).

    ``slice_elements``: the layers run frame-sliced with slices of that many elements (pure torch inference,
    :mod:`cvvae.slicing`); ``None``: every layer runs whole (ONNX Runtime, TensorRT, training).
    """
    if direction not in ("encode", "decode"):
        raise PlanError(f"direction must be 'encode' or 'decode', not {direction!r}")
    widths, n = cfg.widths, cfg.num_levels
    s = cfg.spatial_compress

    def resnet(cin: int, cout: int, t: int, pixels: int, causal: bool) -> int:
        return _layer(_resnet_elems(cin, cout, t, pixels, causal), (cin + cout) * t * pixels,
                      max(cin, cout) * t * pixels, t, slice_elements)

    if direction == "encode":
        sizes = cfg.encoder_level_sizes(frames, height, width)
        pixels, c_in, c0 = frames * height * width, cfg.in_channels, widths[0]
        peak = _layer(c_in * pixels * 3 + c0 * pixels, (c_in + c0) * pixels, c0 * pixels, frames, slice_elements)
        cin = widths[0]
        for i, cout in enumerate(widths):
            t, h, w = sizes[i]
            for _ in range(cfg.layers_per_block):
                peak = max(peak, resnet(cin, cout, t, h * w, causal=True))
                cin = cout
            if i != n - 1:  # padded copy (T+2 frames) and the strided output
                t_out, h_out, w_out = sizes[i + 1]
                out = cout * t_out * h_out * w_out
                peak = max(peak, _layer(cout * t * h * w + cout * (t + 2) * h * w + out, cout * t * h * w + out,
                                        cout * t * h * w, t, slice_elements))
        return peak
    sizes = cfg.decoder_level_sizes(cfg.num_latent_frames(frames), height // s, width // s)
    cin = widths[-1]
    peak = resnet(cin, cin, sizes[0][0], sizes[0][1] * sizes[0][2], causal=False)
    for k, i in enumerate(reversed(range(n))):
        t, h, w = sizes[k]
        for _ in range(cfg.layers_per_block + 1):
            peak = max(peak, resnet(cin, widths[i], t, h * w, causal=False))
            cin = widths[i]
        if i != 0:  # input, nearest x2 copy padded, conv output (x2 channels if up_time) and its permuted copy
            factor = 2 if i - 1 in cfg.time_down_levels else 1
            up = sizes[k + 1][1] * sizes[k + 1][2]
            peak = max(peak, _layer(cin * t * h * w + cin * (t + 2) * up + 2 * factor * cin * t * up,
                                    cin * t * h * w + factor * cin * t * up, factor * cin * t * up, t,
                                    slice_elements))
    t, h, w = sizes[-1]  # norm_out -> SiLU -> conv_out at full resolution: input, its normalised copy, the pixels
    pixels = t * h * w
    return max(peak, _layer(2 * cin * pixels + cfg.out_channels * pixels, (cin + cfg.out_channels) * pixels,
                            cin * pixels, t, slice_elements))


def weight_elements(cfg: ModelConfig, direction: str) -> int:
    """Parameter count of the encoder or decoder, from the config (convs dominate; norms and biases added)."""
    widths, n = cfg.widths, cfg.num_levels

    def resnet(cin: int, cout: int) -> int:
        return 27 * cin * cout + 9 * cout * cout + (cin * cout if cin != cout else 0) + 6 * cout + 2 * cin

    mid = 2 * resnet(widths[-1], widths[-1]) + 4 * widths[-1] ** 2
    if direction == "encode":
        total, cin = 27 * cfg.in_channels * widths[0], widths[0]
        for i, cout in enumerate(widths):
            for _ in range(cfg.layers_per_block):
                total, cin = total + resnet(cin, cout), cout
            if i != n - 1:
                total += 27 * cout * cout
        return total + mid + 27 * widths[-1] * 2 * cfg.latent_channels
    total, cin = 27 * cfg.latent_channels * widths[-1] + mid + 4 * widths[-1] ** 2, widths[-1]
    for i in reversed(range(n)):
        for _ in range(cfg.layers_per_block + 1):
            total, cin = total + resnet(cin, widths[i]), widths[i]
        if i != 0:
            total += 27 * cin * cin * (2 if i % 2 == 1 else 1)
    return total + 27 * widths[0] * cfg.out_channels


def estimate_memory(cfg: ModelConfig, plan: VideoPlan, direction: str, *, dtype_bytes: int = 4, batch: int = 1,
                    batch_tiles: bool = False, whole_output: bool = False, sliced: bool = False) -> MemoryEstimate:
    """The one estimate of a job's peak memory: runtime + weights + the largest tile's activations + video buffers.

    ``whole_output`` counts the job's full output held in memory (``VideoVAE.decode``/``encode`` of a whole tensor);
    streaming jobs (the CLI writing a video) hold one chunk. Activations are counted at ``dtype_bytes`` per element
    (fp32 4, bf16/fp16 2); the video buffers are float32. ``sliced``: the backend runs large layers a few frames at
    a time (the torch backend in inference, :mod:`cvvae.slicing`, unless ``$CVVAE_SLICE_BYTES`` is 0), so they
    hold their input and output plus a few slices; exported graphs run every layer whole.
    """
    s = plan.settings.spatial_compress
    tile_h, tile_w = max(plan.rows.sizes) * s, max(plan.cols.sizes) * s
    if direction == "encode":
        frames = plan.encode_chunks.longest
    else:
        frames = plan.settings.num_output_frames(plan.decode_chunks.longest)
    tiles = plan.num_tiles if batch_tiles else 1
    scale = dtype_bytes * batch * tiles
    act = activation_elements(cfg, direction, frames, tile_h, tile_w) * scale * ACTIVATION_CALIBRATION
    if sliced and slice_limit() > 0:  # a slice is a byte count of the whole (batched) tensor
        elements = activation_elements(cfg, direction, frames, tile_h, tile_w, slice_elements=slice_limit() // scale)
        act = min(act, elements * scale * SLICED_ACTIVATION_CALIBRATION)
    pixels_chunk = 3 * frames * plan.padded_height * plan.padded_width * 4 * batch
    latents = 2 * cfg.latent_channels * plan.latent_frames * plan.latent_height * plan.latent_width * 4 * batch
    video = 3 * plan.padded_frames * plan.padded_height * plan.padded_width * 4 * batch
    io = latents + 2 * pixels_chunk + (video if whole_output else 0)
    weights = (weight_elements(cfg, "encode") + weight_elements(cfg, "decode")) * dtype_bytes
    workspace = weight_elements(cfg, direction) * dtype_bytes * WORKSPACE_PER_WEIGHT_BYTE
    return MemoryEstimate(direction, RUNTIME_BASELINE_BYTES, weights, int(act + workspace), io, (tile_h, tile_w),
                          frames)


def fit_plan(cfg: ModelConfig, settings: PlanSettings, num_frames: int, height: int, width: int, budget: int,
             directions: tuple[str, ...] = ("encode", "decode"), *, fixed_tiles: bool = False,
             fixed_chunks: bool = False, what: str | None = None, **estimate_kw: Any) -> tuple[PlanSettings, str]:
    """Settings whose plan fits ``budget`` bytes for every direction: the given ones when they fit, else the
    largest tile (steps of 8 latent cells, down to ``MIN_TILE_PX``) that fits, then halved chunks.

    ``fixed_tiles`` / ``fixed_chunks``: the caller chose the tiling / chunking (``--tile-size``, ``--no-tiling``,
    ``--chunk-frames``, ``--no-chunking``), so it is kept as given. ``what`` names the job in messages (default: a
    ``num_frames``x``height``x``width`` video). Returns the settings and a one-line note ('' when unchanged). Raises
    :class:`PlanError` with the estimate when nothing fits.
    """

    def worst(candidate: PlanSettings) -> MemoryEstimate:
        plan = make_plan(candidate, num_frames, height, width)
        return max((estimate_memory(cfg, plan, d, **estimate_kw) for d in directions), key=lambda e: e.total)

    first = worst(settings)
    if first.total <= budget:
        return settings, ""
    s = settings.spatial_compress
    largest = (max(settings.padded_pixels(height), settings.padded_pixels(width)) if settings.tile_size is None
               else settings.tile_size)
    tiles = [px for px in range(largest - largest % (8 * s), MIN_TILE_PX - 1, -8 * s) if px < largest]
    chunks = [settings.chunk_frames] if settings.chunk_frames else [None]
    c = settings.chunk_frames or settings.padded_frames(num_frames) - 1
    while c > settings.time_compress and not fixed_chunks:
        c = max(settings.time_compress, (c // 2) // settings.time_compress * settings.time_compress)
        chunks.append(c)
    for n, chunk in enumerate(chunks):
        if fixed_tiles:  # only the chunk shrinks; n == 0 is the configured plan, estimated above
            candidates = [] if n == 0 else [settings.tile_size]
        else:
            candidates = tiles if n == 0 else [largest, *tiles]
        for tile in candidates:
            candidate = PlanSettings(chunk, tile, settings.tile_overlap_ratio, settings.time_compress, s)
            est = worst(candidate)
            if est.total <= budget:
                changed = ", ".join(([] if fixed_tiles else [f"tile {tile} px"])
                                    + ([] if n == 0 else [f"chunk {chunk} frames"]))
                return candidate, (f"plan changed to fit the {budget / (1 << 30):.2f} GiB memory budget: {changed} "
                                   f"(estimated peak {est.describe()}; the configured plan needed "
                                   f"{first.total / (1 << 30):.2f} GiB)")
    tile = settings.tile_size if fixed_tiles else MIN_TILE_PX
    smallest = worst(PlanSettings(chunks[-1], tile, settings.tile_overlap_ratio, settings.time_compress, s))
    tiled = "no tiling" if tile is None else f"{tile} px tiles"
    chunked = "no chunking" if chunks[-1] is None else f"{chunks[-1]}-frame chunks"
    kept = [name for name, flag in (("tiling", fixed_tiles), ("chunking", fixed_chunks)) if flag]
    advice = "raise --max-memory"
    if kept:
        advice += (f", let the budget choose the {' and '.join(kept)} (leave out --tile-size/--no-tiling/"
                   "--chunk-frames/--no-chunking)")
    raise PlanError(f"{what or f'a {num_frames}x{height}x{width} video'} needs about {smallest.describe()} with its "
                    f"smallest plan ({tiled}, {chunked}{'; ' + ' and '.join(kept) + ' as asked' if kept else ''}), "
                    f"more than the {budget / (1 << 30):.2f} GiB budget; {advice} or process a smaller size")
