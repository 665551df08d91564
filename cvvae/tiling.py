"""Executes a :class:`~cvvae.plan.VideoPlan` with any component function (spec sections 6.2-6.5).

A *component function* maps one input tile to one output tile (the PyTorch model, an ONNX Runtime session, a TensorRT
engine). This module owns padding, chunking, tiling, blending and cropping, so that every backend runs the identical
schedule and differs only in the function it passes.

It is written once against the Python array API standard (through ``array-api-compat``): the same code runs on numpy
arrays on the CPU, torch tensors (CPU or CUDA, autograd included) and CuPy arrays, always in the namespace of the
array it is given. A component function must return an array of the family it was given.

Blending follows the official order: tiles are blended in raster order, top edge first (with the already-blended tile
above), then left edge (with the already-blended tile to the left), before any cropping.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Literal

from array_api_compat import array_namespace, device as array_device

from .errors import InputError, NonFiniteError, PlanError
from .plan import AxisTiles, Chunk, VideoPlan

Array = Any  # any array of the array API standard: numpy.ndarray, Array, cupy.ndarray, ...
ComponentFn = Callable[[Array], Array]
Direction = Literal["encode", "decode"]


def _along(x: Array, dim: int, start: int, stop: int | None = None) -> Array:
    """``x[start:stop]`` along axis ``dim`` (negative dims count from the end)."""
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, stop)
    return x[tuple(index)]


def _repeat_last(x: Array, dim: int, count: int) -> Array:
    """``x`` with its last item along ``dim`` repeated ``count`` more times (edge/last-frame padding)."""
    xp = array_namespace(x)
    last = _along(x, dim, -1)
    shape = list(x.shape)
    shape[dim] = count
    return xp.concat([x, xp.broadcast_to(last, tuple(shape))], axis=dim)


def pad_space(x: Array, plan: VideoPlan) -> Array:
    """Pad H and W of B,C,T,H,W pixels to the plan's multiples of 8 by replicating the bottom/right edge."""
    dh, dw = plan.padded_height - x.shape[3], plan.padded_width - x.shape[4]
    if dh:
        x = _repeat_last(x, 3, dh)
    if dw:
        x = _repeat_last(x, 4, dw)
    return x


def pad_video(x: Array, plan: VideoPlan) -> Array:
    """Pad B,C,T,H,W pixels to the plan's padded shape: repeat the last frame, replicate the bottom/right edge."""
    b, c, t, h, w = x.shape
    if (t, h, w) != (plan.num_frames, plan.height, plan.width):
        raise PlanError(f"input T,H,W = {(t, h, w)} does not match the plan's {(plan.num_frames, plan.height, plan.width)}")
    extra_t = plan.padded_frames - t
    if extra_t:
        x = _repeat_last(x, 2, extra_t)
    return pad_space(x, plan)


def crop_video(y: Array, plan: VideoPlan, *, frame_offset: int = 0) -> Array:
    """Crop decoded pixels back to the original size; frames past ``plan.num_frames`` are dropped.

    ``frame_offset`` is the absolute index of ``y``'s first frame (for streaming, chunk by chunk).
    """
    keep_t = max(0, min(y.shape[2], plan.num_frames - frame_offset))
    return y[:, :, :keep_t, : plan.height, : plan.width]


def _blend(prev_edge: Array, cur: Array, overlap: int, dim: int) -> Array:
    """Blend the first ``overlap`` items of ``cur`` along ``dim`` with ``prev_edge`` (the previous tile's last ones)."""
    if overlap == 0:
        return cur
    xp = array_namespace(cur)
    shape = [1] * cur.ndim
    shape[dim] = overlap
    w = xp.arange(overlap, dtype=xp.float32, device=array_device(cur)) / overlap
    w = xp.reshape(xp.astype(w, cur.dtype), tuple(shape))
    mixed = prev_edge * (1 - w) + _along(cur, dim, 0, overlap) * w
    return xp.concat([mixed, _along(cur, dim, overlap)], axis=dim)


def _tile_outputs(fn: ComponentFn, x: Array, rows: AxisTiles, cols: AxisTiles, in_scale: int,
                  batch_tiles: bool) -> dict[tuple[int, int], Array]:
    """Outputs of every tile, keyed by (row, col). With ``batch_tiles``, tiles of equal shape share one call.

    Batching is exact: every normalization in the model is per sample, so a tile's result does not depend on the
    other samples in its batch.
    """
    tiles = {
        (r, c): x[..., r0 * in_scale:(r0 + rn) * in_scale, c0 * in_scale:(c0 + cn) * in_scale]
        for r, (r0, rn) in enumerate(zip(rows.starts, rows.sizes))
        for c, (c0, cn) in enumerate(zip(cols.starts, cols.sizes))
    }
    if not batch_tiles or len(tiles) == 1:
        return {key: fn(tile) for key, tile in tiles.items()}
    xp = array_namespace(x)
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for key, tile in tiles.items():
        groups.setdefault(tuple(tile.shape), []).append(key)
    out = {}
    b = x.shape[0]
    for keys in groups.values():
        y = fn(xp.concat([tiles[k] for k in keys], axis=0))
        out.update((k, y[i * b:(i + 1) * b]) for i, k in enumerate(keys))
    return out


def run_tiles(fn: ComponentFn, x: Array, rows: AxisTiles, cols: AxisTiles, *, in_scale: int,
              out_scale: int, batch_tiles: bool = False) -> Array:
    """Run ``fn`` on every spatial tile of ``x`` (B,C,T,H,W), blend and crop, return the stitched output.

    Tile geometry is in latent cells; ``in_scale``/``out_scale`` convert it to the input/output units
    (encode: 8 and 1; decode: 1 and 8).
    """
    outputs = _tile_outputs(fn, x, rows, cols, in_scale, batch_tiles)
    o_h, o_w = rows.overlap * out_scale, cols.overlap * out_scale
    prev_row: list[Array] = []
    out_rows = []
    for r in range(len(rows)):
        row: list[Array] = []
        for c in range(len(cols)):
            y = outputs.pop((r, c))
            if r > 0:
                y = _blend(prev_row[c][..., -o_h:, :], y, o_h, dim=-2)
            if c > 0:
                y = _blend(row[c - 1][..., -o_w:], y, o_w, dim=-1)
            row.append(y)
        keep_h = rows.keeps[r] * out_scale
        out_rows.append(_join([t[..., :keep_h, : k * out_scale] for t, k in zip(row, cols.keeps)], axis=-1))
        prev_row = row
    return _join(out_rows, axis=-2)


def _join(pieces: list[Array], axis: int) -> Array:
    """Concatenate along ``axis``; a single piece is returned as it is (a view: one tile costs no copy)."""
    return pieces[0] if len(pieces) == 1 else array_namespace(pieces[0]).concat(pieces, axis=axis)
def count_nonfinite(values: Array) -> int:
    """Number of NaN/Inf entries, in any array library (array API: isfinite, logical_not, sum); 0 for shape-only
    (meta) tensors, which hold no values (FLOP counting runs the executor on them)."""
    if getattr(values, "is_meta", False):
        return 0
    xp = array_namespace(values)
    finite = xp.isfinite(values)  # a bool array (1/4 of float32): the only temporary on the common path
    if bool(xp.all(finite)):
        return 0
    return int(xp.sum(xp.astype(xp.logical_not(finite), xp.int64)))  # counted on the error path only


def check_finite(values: Array, what: str, chunk: Chunk, unit: str, advice: str) -> None:
    """Stop when a chunk's input or output holds NaN/Inf, naming what it is and which chunk, instead of passing it on.

    Every backend's tiles go through :func:`encode_chunk` / :func:`decode_chunk`, so this one check covers them all.
    """
    bad = count_nonfinite(values)
    if bad:
        raise NonFiniteError(f"{what} of the chunk of {unit} {chunk.start}-{chunk.stop - 1} has {bad:,} NaN/Inf "
                             f"values out of {math.prod(values.shape):,}; {advice}")


_OUTPUT_ADVICE = ("stopped instead of writing garbage; with --precision fp16 this is an overflow: use fp32 (or a "
                  "graph whose fp32 islands cover it), else check the model's weights")


def encode_chunk(fn: ComponentFn, frames: Array, plan: VideoPlan, chunk: Chunk, *,
                 batch_tiles: bool = False) -> Array:
    """Moments of one temporal chunk of padded frames (the chunk's own frames, B,3,t,H,W)."""
    s = plan.settings.spatial_compress
    check_finite(frames, "input pixels", chunk, "frames", "the input must hold finite pixels in [-1, 1]")
    moments = run_tiles(fn, frames, plan.rows, plan.cols, in_scale=s, out_scale=1, batch_tiles=batch_tiles)
    check_finite(moments, "encoder output", chunk, "frames", _OUTPUT_ADVICE)
    return moments[:, :, 1:] if chunk.drop_first else moments


def decode_chunk(fn: ComponentFn, latents: Array, plan: VideoPlan, chunk: Chunk, *,
                 batch_tiles: bool = False) -> Array:
    """Pixels of one temporal chunk of latents (the chunk's own latents, B,z,l,h,w); uncropped."""
    s = plan.settings.spatial_compress
    check_finite(latents, "input latents", chunk, "latents", "latents must be finite; were they made by a "
                 "diverged model or a broken sampler?")
    pixels = run_tiles(fn, latents, plan.rows, plan.cols, in_scale=1, out_scale=s, batch_tiles=batch_tiles)
    check_finite(pixels, "decoder output", chunk, "latents", _OUTPUT_ADVICE)
    return pixels[:, :, 1:] if chunk.drop_first else pixels


def iter_encode(fn: ComponentFn, x: Array, plan: VideoPlan, *,
                batch_tiles: bool = False) -> Iterator[Array]:
    """Yield the moments of each encode chunk of an already padded B,3,T,H,W video, in order."""
    for chunk in plan.encode_chunks:
        yield encode_chunk(fn, x[:, :, chunk.start:chunk.stop], plan, chunk, batch_tiles=batch_tiles)


def iter_decode(fn: ComponentFn, z: Array, plan: VideoPlan, *,
                batch_tiles: bool = False) -> Iterator[Array]:
    """Yield the cropped pixels of each decode chunk of a B,z,L,h,w latent, in order."""
    done = 0
    for chunk in plan.decode_chunks:
        pixels = decode_chunk(fn, z[:, :, chunk.start:chunk.stop], plan, chunk, batch_tiles=batch_tiles)
        frames = crop_video(pixels, plan, frame_offset=done)
        done += pixels.shape[2]
        del pixels  # hold nothing while the consumer works or the next chunk decodes: one chunk alive at a time
        yield frames
        del frames


def encode_video(fn: ComponentFn, x: Array, plan: VideoPlan, *, batch_tiles: bool = False) -> Array:
    """Moments (B,2z,L,h,w) of a B,3,T,H,W video of the plan's input shape (padding applied here)."""
    return concat_time(list(iter_encode(fn, pad_video(x, plan), plan, batch_tiles=batch_tiles)))


def decode_video(fn: ComponentFn, z: Array, plan: VideoPlan, *, batch_tiles: bool = False) -> Array:
    """Pixels (B,3,T,H,W) of the plan's original size from a B,z,L,h,w latent."""
    return concat_time(list(iter_decode(fn, z, plan, batch_tiles=batch_tiles)))


def concat_time(pieces: list[Array]) -> Array:
    """Join B,C,t,H,W pieces along time."""
    return _join(pieces, axis=2)


class StreamingEncoder:
    """Encode frames as they arrive, holding at most one chunk (spec 6.2), with the same result as the plan.

    Chunk boundaries do not depend on the total length (chunk n is frames [16n, 16n+17)), so a full chunk can be
    encoded as soon as its 17 frames are there; only the last frame is kept for the next chunk. At the end the
    remaining frames are padded to 1+4k by repeating the last one, exactly as :func:`pad_video` pads the whole video.
    """

    def __init__(self, fn: ComponentFn, plan: VideoPlan, *, batch_tiles: bool = False) -> None:
        self.fn, self.plan, self.batch_tiles = fn, plan, batch_tiles
        self.chunk = plan.settings.chunk_frames
        self.buffer: list[Array] = []   # frames of the current chunk, B,3,t,H,W pieces
        self.buffered = 0
        self.frames_in = 0
        self.chunks_done = 0

    def _run(self, frames: Array) -> Array:
        start = 0 if self.chunk is None else self.chunks_done * self.chunk  # chunk n starts at frame 16n
        chunk = Chunk(start, start + frames.shape[2], drop_first=self.chunks_done > 0)
        self.chunks_done += 1
        return encode_chunk(self.fn, frames, self.plan, chunk, batch_tiles=self.batch_tiles)

    def push(self, frames: Array) -> Iterator[Array]:
        """Add B,3,t,H,W frames (H, W already padded to the plan); yield moments of every chunk completed."""
        self.buffer.append(frames)
        self.buffered += frames.shape[2]
        self.frames_in += frames.shape[2]
        if self.chunk is None:
            return
        if self.buffered < self.chunk + 1:
            return
        # join the pieces once; each chunk is then a view, so a whole video pushed at once is never copied again
        window = concat_time(self.buffer)
        start = 0
        while window.shape[2] - start >= self.chunk + 1:
            yield self._run(window[:, :, start:start + self.chunk + 1])
            start += self.chunk
        rest = window[:, :, start:]
        self.buffer, self.buffered = [rest], rest.shape[2]

    def finish(self) -> Iterator[Array]:
        """Pad and encode what is left (nothing when the last chunk ended exactly on the final frame)."""
        if self.frames_in == 0:
            raise InputError("no frames were given to encode")
        if self.chunks_done and self.buffered <= 1:
            return
        window = concat_time(self.buffer)
        target = self.plan.settings.padded_frames(window.shape[2])
        if target > window.shape[2]:
            window = _repeat_last(window, 2, target - window.shape[2])
        yield self._run(window)

