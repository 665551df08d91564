"""`cvvae info/encode/decode` on tensor files: outputs, metadata, and clear errors that write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cvvae.cli import main
from cvvae.latent_io import load_latents

MODEL = ["--model", "random:tiny-v1"]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture()
def pixels(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 6, 20, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy"


def test_info_json_and_plan():
    r = run("info", *MODEL, "--size", "65x100x130", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["parameters"] == 3_849_579
    assert data["plan"]["padded"] == [65, 104, 136] and data["plan"]["latent"] == [17, 13, 17]
    assert data["plan"]["encode_chunks_frames"] == [[0, 17], [16, 33], [32, 49], [48, 65]]


def test_encode_decode_round_trip_keeps_shape(tmp_path, pixels):
    r = run("encode", str(pixels), "-o", str(tmp_path / "z.safetensors"), *MODEL)
    assert r.exit_code == 0, r.output
    z = load_latents(tmp_path / "z.safetensors")
    assert z.mean.shape == (1, 4, 3, 3, 4) and z.logvar.shape == (1, 4, 3, 3, 4)  # 6 frames -> 9 -> 3 latents
    assert (z.num_frames, z.height, z.width) == (6, 20, 28)
    assert z.metadata["variant"] == "v1" and z.metadata["scaling_factor"] == 0.18215
    r = run("decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "y.npy"), *MODEL)
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "y.npy").shape == (1, 3, 6, 20, 28)
    r = run("encode", str(pixels), "-o", str(tmp_path / "m.npy"), *MODEL, "--no-tiling")
    assert r.exit_code == 0 and np.load(tmp_path / "m.npy").shape == (4, 3, 3, 4)


def test_existing_output_needs_force(tmp_path, pixels):
    out = tmp_path / "z.npy"
    out.write_bytes(b"keep me")
    r = run("encode", str(pixels), "-o", str(out), *MODEL)
    assert r.exit_code != 0 and "--force" in r.output
    assert out.read_bytes() == b"keep me"
    assert run("encode", str(pixels), "-o", str(out), *MODEL, "--force").exit_code == 0
    assert np.load(out).shape == (4, 3, 3, 4)


def test_bad_tensor_inputs(tmp_path):
    np.save(tmp_path / "u8.npy", np.zeros((3, 5, 16, 16), np.uint8))
    np.save(tmp_path / "range.npy", np.full((3, 5, 16, 16), 5.0, np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((4, 5, 16, 16), np.float32))
    for name, message in [("u8.npy", "expected float pixels"), ("range.npy", "expected pixels in [-1, 1]"),
                          ("shape.npy", "expected (B,3,T,H,W)"), ("missing.npy", "does not exist")]:
        r = run("encode", str(tmp_path / name), "-o", str(tmp_path / "z.safetensors"), *MODEL)
        assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "z.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".cvvae-tmp-" in p.name]


def test_decode_refuses_latents_of_another_model(tmp_path):
    save_file({"mean": torch.zeros(1, 16, 2, 2, 2)}, str(tmp_path / "sd3.safetensors"))
    r = run("decode", str(tmp_path / "sd3.safetensors"), "-o", str(tmp_path / "y.npy"), *MODEL)
    assert r.exit_code != 0 and "does not fit this v1 model" in r.output
    save_file({"other": torch.zeros(1)}, str(tmp_path / "nokey.safetensors"))
    r = run("decode", str(tmp_path / "nokey.safetensors"), "-o", str(tmp_path / "y.npy"), *MODEL)
    assert r.exit_code != 0 and "no 'mean' or 'latent' tensor" in r.output
    assert not (tmp_path / "y.npy").exists()


def test_decode_refuses_other_checkpoint(tmp_path, golden_v1, pixels):
    ckpt = str(golden_v1 / "checkpoint")
    assert run("encode", str(pixels), "-o", str(tmp_path / "z.safetensors"), "--model", ckpt).exit_code == 0
    other = tmp_path / "other.safetensors"
    from cvvae.loading import create_model
    save_file(create_model("tiny-v1", seed=5).state_dict(), str(other))
    r = run("decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "y.npy"), "--model", str(other),
            "--preset", "tiny-v1")
    assert r.exit_code != 0 and "made by model sha256" in r.output
    r = run("decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "y.npy"), "--model", str(other),
            "--preset", "tiny-v1", "--ignore-model-mismatch")
    assert r.exit_code == 0, r.output
