"""One executor for every array family: the same cvvae.tiling code on numpy arrays and torch tensors (thin runtime).

Parametrized over both families through the same path; the golden cases agree to 1e-6 between them (and with the
official tensors to 1e-4; the tiled 33-frame case runs the numpy family alone, test_golden runs it in torch).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="compares the numpy executor with the torch one: needs the torch extra")

from safetensors.numpy import load_file  # noqa: E402

from conftest import golden_cases, max_abs  # noqa: E402
from array_api_compat import array_namespace, device as array_device  # noqa: E402

from cvvae import tiling  # noqa: E402
from cvvae.loading import load_model  # noqa: E402
from cvvae.plan import PlanSettings, make_plan  # noqa: E402
from cvvae.runtime import VideoVAE  # noqa: E402
from cvvae.runtime.backends import TorchBackend  # noqa: E402

FAMILIES = {"numpy": lambda a: np.ascontiguousarray(a), "torch": lambda a: torch.from_numpy(np.array(a))}


def nearest_decoder(z):
    """A decoder stand-in written once for any family: 8x nearest upsampling, 4(L-1)+1 frames, 3 channels, plus the
    tile's mean (so that neighbouring tiles disagree in their overlap and the blend shows)."""
    xp = array_namespace(z)
    b, _, l, h, w = z.shape
    frames = xp.asarray([0] + [k for k in range(1, l) for _ in range(4)], device=array_device(z))
    y = xp.take(z[:, :3], frames, axis=2)[:, :, :, :, None, :, None]
    y = xp.reshape(xp.broadcast_to(y, (b, 3, y.shape[2], h, 8, w, 8)), (b, 3, y.shape[2], h * 8, w * 8))
    return y + xp.mean(z)


@pytest.fixture(scope="module")
def golden_model(golden_v1):
    return load_model(golden_v1 / "checkpoint"), load_file(str(golden_v1 / "reference.safetensors"))


def test_executor_pads_tiles_blends_crops_in_the_callers_family():
    plan = make_plan(PlanSettings(chunk_frames=8, tile_size=32, tile_overlap_ratio=0.25), 11, 50, 70)
    assert plan.num_tiles == 6 and len(plan.decode_chunks) == 2
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 3, 11, 50, 70)).astype(np.float32)
    z = rng.uniform(-1, 1, (1, 4, plan.latent_frames, plan.latent_height, plan.latent_width)).astype(np.float32)
    out = {}
    for family, make in FAMILIES.items():
        padded = tiling.pad_video(make(x), plan)
        decoded = tiling.decode_video(nearest_decoder, make(z), plan)
        assert type(padded) is type(make(x)) and type(decoded) is type(make(x))
        assert tuple(padded.shape) == (1, 3, 13, 56, 72) and tuple(decoded.shape) == (1, 3, 11, 50, 70)
        out[family] = padded, decoded
    assert max_abs(out["numpy"][0], out["torch"][0]) == 0.0
    assert max_abs(out["numpy"][1], out["torch"][1]) <= 1e-6
    # the blend really happened: tile seams differ from a plain nearest upsampling of the whole latent
    assert max_abs(out["numpy"][1], nearest_decoder(z)[:, :, :11, :50, :70]) > 0.01


@pytest.mark.parametrize("case", golden_cases("public-v1-tiny"))
def test_numpy_and_torch_executors_agree_on_golden_cases(golden_model, case):
    model, ref = golden_model
    vae = VideoVAE(TorchBackend(model))
    results = {}
    # the tiled clip (12 s a family here) runs numpy only: test_golden holds the torch tensors to the same 1e-4
    families = {"numpy": FAMILIES["numpy"]} if "tiled" in case else FAMILIES
    for family, make in families.items():
        latents = vae.encode(make(ref[f"{case}.input"]))
        pixels = vae.decode(make(ref[f"{case}.latent_mean"]))
        assert type(latents.mean) is type(make(ref[f"{case}.input"])) and type(pixels) is type(latents.mean)
        results[family] = latents.mean, latents.logvar, pixels
        assert max_abs(latents.mean, ref[f"{case}.latent_mean"]) <= 1e-4
        assert max_abs(pixels, ref[f"{case}.decoded"]) <= 1e-4
    if "torch" in results:
        for a, b in zip(results["numpy"], results["torch"]):
            assert max_abs(a, b) <= 1e-6
