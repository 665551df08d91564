"""Any frame count and size: latent counts, exact round trip of the frame count, odd sizes (spec 5)."""

from __future__ import annotations

import pytest
import torch

from conftest import max_abs
from cvvae.plan import PlanSettings


@pytest.fixture(scope="module")
def videos():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 41, 16, 16, generator=g) * 2 - 1


@pytest.mark.parametrize("frames", range(1, 42))
def test_every_frame_count_round_trips(tiny_v1, videos, frames):
    x = videos[:, :, :frames]
    result = tiny_v1.encode(x)
    assert result.mean.shape == (1, 4, (frames + 2) // 4 + 1 if frames > 1 else 1, 2, 2)
    assert result.num_frames == frames
    y = tiny_v1.decode(result.mean, num_frames=result.num_frames, height=16, width=16)
    assert y.shape == x.shape


def test_padding_repeats_last_frame_then_is_cropped(tiny_v1, videos):
    x = videos[:, :, :6]  # padded to 9 by repeating frame 5
    padded = torch.cat([x, x[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)
    assert torch.equal(tiny_v1.encode(x).mean, tiny_v1.encode(padded).mean)
    full = tiny_v1.decode(tiny_v1.encode(padded).mean)
    cropped = tiny_v1.decode(tiny_v1.encode(x).mean, num_frames=6)
    assert full.shape[2] == 9 and cropped.shape[2] == 6
    assert max_abs(full[:, :, :6], cropped) == 0.0


@pytest.mark.parametrize("h,w", [(17, 23), (33, 47), (8, 72), (65, 9)])
@pytest.mark.parametrize("name", ["tiny_v1", "tiny_sd3"])
def test_odd_sizes(request, name, h, w):
    model = request.getfixturevalue(name)
    x = torch.rand(1, 3, 5, h, w, generator=torch.Generator().manual_seed(h * w)) * 2 - 1
    result = model.encode(x)
    assert result.mean.shape[-2:] == (-(-h // 8), -(-w // 8))
    y = model.decode(result.mean, num_frames=5, height=h, width=w)
    assert y.shape == (1, 3, 5, h, w)


def test_unbatched_and_image_inputs(tiny_v1):
    x = torch.rand(3, 5, 16, 24) * 2 - 1
    assert tiny_v1.encode(x).mean.shape == (1, 4, 2, 2, 3)
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    assert tiny_v1.encode(images).mean.shape == (2, 4, 1, 2, 3)


def test_tiled_chunked_equals_manual_schedule(tiny_sd3):
    """The executor really runs several tiles and chunks: compare with untiled runs where they must agree."""
    x = torch.rand(1, 3, 9, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    settings = PlanSettings.from_config(tiny_sd3.config, tile_size=24, tile_overlap_ratio=0.34, chunk_frames=4)
    plan = tiny_sd3.plan(9, 40, 40, settings)
    assert plan.num_tiles == 4 and len(plan.encode_chunks) == 2
    tiled = tiny_sd3.encode(x, settings).mean
    whole = tiny_sd3.encode(x, PlanSettings.from_config(tiny_sd3.config, tile_size=None, chunk_frames=None)).mean
    assert tiled.shape == whole.shape
    # tiles and chunks have their own GroupNorm statistics, so the results differ from one whole pass
    assert max_abs(tiled, whole) > 1e-3
    # the kept, unblended corner of the first tile of the first chunk equals an encode of that tile alone
    top_left = torch.chunk(tiny_sd3.encoder(x[:, :, :5, :24, :24]), 2, dim=1)[0]
    assert max_abs(tiled[:, :, :2, :2, :2], top_left[:, :, :2, :2, :2]) < 1e-5


def test_posterior_sample_uses_generator(tiny_v1):
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    post = tiny_v1.encode(x).posterior
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    assert post.logvar.min() >= -30 and post.logvar.max() <= 20
