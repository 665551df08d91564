"""Runtime: streaming equals the plan, golden values through VideoVAE, input formats, batching, streaming decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import max_abs
from cvvae.errors import InputError
from cvvae.runtime import Latents, VideoVAE, to_pixels
from cvvae.runtime.backends import TorchBackend

TOL = 1e-4


@pytest.fixture(scope="module")
def vae(tiny_v1):
    return VideoVAE(TorchBackend(tiny_v1), tiny_v1.plan_settings(chunk_frames=8, tile_size=24, tile_overlap_ratio=0.34))


@pytest.mark.parametrize("frames", [1, 2, 5, 8, 9, 10, 13, 17, 18, 26])
def test_streaming_encode_equals_plan(vae, tiny_v1, frames):
    x = torch.rand(1, 3, frames, 24, 40, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    pieces = []
    i, sizes = 0, [3, 1, 7, 2]
    while i < frames:  # irregular pieces, as a decoder of a video file delivers them
        n = sizes[len(pieces) % len(sizes)]
        pieces.append(x[:, :, i:i + n])
        i += n
    items = list(vae.encode_stream(pieces))
    assert items[-1][2].num_frames == frames  # the last item carries the final plan
    streamed = torch.cat([m for m, _, _ in items if m.numel()], dim=2)
    reference = tiny_v1.encode(x, vae.settings)
    assert vae.plan(frames, 24, 40).num_tiles == 2
    assert streamed.shape == reference.mean.shape
    assert max_abs(streamed, reference.mean) <= 1e-6


def test_golden_through_runtime(golden_v1):
    ref = load_file(str(golden_v1 / "reference.safetensors"))
    vae = VideoVAE.load(golden_v1 / "checkpoint")
    for case in ("image", "clip9", "clip33_tiled"):
        latents = vae.encode(ref[f"{case}.input"])
        assert max_abs(latents.mean, ref[f"{case}.latent_mean"]) <= TOL
        assert max_abs(latents.logvar, ref[f"{case}.latent_logvar"]) <= TOL
        assert max_abs(vae.decode(ref[f"{case}.latent_mean"]), ref[f"{case}.decoded"]) <= TOL


def test_input_formats_agree(vae):
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 24, 32, 3), dtype=np.uint8)
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
    a = vae.encode(frames).mean
    assert max_abs(a, vae.encode(pixels).mean) == 0.0
    assert max_abs(a, vae.encode(torch.from_numpy(frames)[None]).mean) == 0.0
    assert max_abs(a, vae.encode(pixels.numpy()[None]).mean) == 0.0
    assert to_pixels(frames).shape == (1, 3, 5, 24, 32)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((5, 24, 32, 4), np.uint8), "RGB"),
    (np.zeros((2, 5, 24, 32), np.float32), "(B,3,T,H,W)"),
    (np.zeros((5, 24, 32, 3), np.int32), "not supported"),
    ([1, 2, 3], "numpy array or a DLPack-capable array"),
])
def test_bad_inputs(vae, bad, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vae.encode(bad)


def test_batched_tiles_are_exact(tiny_v1):
    x = torch.rand(2, 3, 9, 56, 72, generator=torch.Generator().manual_seed(2)) * 2 - 1
    settings = tiny_v1.plan_settings(tile_size=32)
    plain = VideoVAE(TorchBackend(tiny_v1), settings)
    batched = VideoVAE(TorchBackend(tiny_v1), settings, batch_tiles=True)
    assert plain.plan(9, 56, 72).num_tiles == 6
    a, b = plain.encode(x), batched.encode(x)
    # same math per sample; only the kernels' summation order may change with the batch size (float rounding)
    assert max_abs(a.mean, b.mean) <= 1e-5
    assert max_abs(plain.decode(a), batched.decode(a)) <= 5e-5


def test_decode_stream_yields_chunks_of_original_size(vae):
    x = torch.rand(1, 3, 30, 20, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = vae.encode(x)
    assert latents.mean.shape[2] == 9 and (latents.num_frames, latents.height, latents.width) == (30, 20, 28)
    chunks = list(vae.decode_stream(latents))
    assert [c.shape[2] for c in chunks] == [9, 8, 8, 5]  # 8-frame chunks = 2 latents: 33 frames, cropped to 30
    assert all(c.shape[3:] == (20, 28) for c in chunks)
    assert max_abs(torch.cat(chunks, 2), vae.decode(latents)) == 0.0


def test_latents_file_round_trip(vae, tmp_path):
    x = torch.rand(1, 3, 6, 16, 16) * 2 - 1
    latents = vae.encode(x, metadata={"fps": 12.5})
    latents.save(tmp_path / "z.safetensors")
    back = Latents.load(tmp_path / "z.safetensors")
    assert (back.num_frames, back.height, back.width) == (6, 16, 16)
    assert back.metadata["fps"] == 12.5 and back.metadata["variant"] == "v1"
    assert max_abs(back.mean, latents.mean) == 0.0
    with pytest.raises(FileExistsError, match="--force"):
        latents.save(tmp_path / "z.safetensors")


def test_unavailable_backend_says_what_to_install():
    from cvvae.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        VideoVAE.load("random:tiny-v1", backend="tensorrt")
    with pytest.raises(InputError, match="unknown backend 'jax'"):
        VideoVAE.load("random:tiny-v1", backend="jax")
