"""The reference reproduces the official implementation's tensors (../shared/golden) to 1e-4 in fp32."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file
import numpy as np
import torch

from conftest import golden_cases, max_abs
from cvvae.cli import main
from cvvae.latent_io import load_latents
from cvvae.loading import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def v1(golden_v1):
    return load_model(golden_v1 / "checkpoint"), load_file(str(golden_v1 / "reference.safetensors"))


@pytest.fixture(scope="module")
def sd3(golden_sd3):
    return load_model(golden_sd3 / "checkpoint"), load_file(str(golden_sd3 / "reference.safetensors"))


def _check(model, ref, case):
    x = ref[f"{case}.input"]
    result = model.encode(x)
    assert max_abs(result.mean, ref[f"{case}.latent_mean"]) <= TOL
    assert max_abs(result.logvar, ref[f"{case}.latent_logvar"]) <= TOL
    decoded = model.decode(ref[f"{case}.latent_mean"], num_frames=result.num_frames, height=result.height,
                           width=result.width)
    assert max_abs(decoded, ref[f"{case}.decoded"]) <= TOL


@pytest.mark.parametrize("case", golden_cases("public-v1-tiny"))
def test_v1_golden(v1, case):
    _check(*v1, case)


@pytest.mark.parametrize("case", golden_cases("public-sd3-tiny"))
def test_sd3_golden(sd3, case):
    _check(*sd3, case)


def test_v1_golden_through_cli(golden_v1, v1, tmp_path):
    _, ref = v1
    case = "clip33_tiled"
    np.save(tmp_path / "x.npy", ref[f"{case}.input"].numpy())
    runner = CliRunner()
    ckpt = str(golden_v1 / "checkpoint")
    r = runner.invoke(main, ["encode", str(tmp_path / "x.npy"), "-o", str(tmp_path / "z.safetensors"),
                             "--model", ckpt])
    assert r.exit_code == 0, r.output
    latents = load_latents(tmp_path / "z.safetensors")
    assert max_abs(latents.mean, ref[f"{case}.latent_mean"]) <= TOL
    assert max_abs(latents.logvar, ref[f"{case}.latent_logvar"]) <= TOL
    assert (latents.num_frames, latents.height, latents.width) == (33, 96, 112)
    r = runner.invoke(main, ["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "y.npy"),
                             "--model", ckpt])
    assert r.exit_code == 0, r.output
    assert max_abs(torch.from_numpy(np.load(tmp_path / "y.npy")), ref[f"{case}.decoded"]) <= TOL
