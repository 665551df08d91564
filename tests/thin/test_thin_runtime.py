"""The thin runtime: what a torch-free install (docs/thin-runtime.md) runs, checked in that install by .ci/run.

Runs in any environment: in the torch-free one it is the acceptance check of the base install; where torch is
installed too it checks the same ONNX Runtime paths (the golden export is then made here instead of taken from
``$CVVAE_GOLDEN_EXPORT``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from conftest import VIDEOS, golden_cases, max_abs
from cvvae.cli import main
from cvvae.extras import is_installed
from cvvae.runtime import Latents, VideoVAE
from cvvae.runtime.backends import default_backend

TOL = 1e-4


@pytest.fixture(scope="session")
def golden_export(shared_exports) -> Path:
    """An ONNX export of the golden v1 checkpoint: $CVVAE_GOLDEN_EXPORT (made by .ci/run), else made here."""
    given = os.environ.get("CVVAE_GOLDEN_EXPORT")
    if given:
        return Path(given)
    if not is_installed("torch"):
        pytest.skip("set CVVAE_GOLDEN_EXPORT to `cvvae export` of the golden v1 checkpoint (.ci/run does)")
    return shared_exports.get("golden-v1")


@pytest.fixture(scope="module")
def default_vae() -> VideoVAE:
    return VideoVAE.load(backend="onnxruntime")


def _frames(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth moving colour gradients (uint8 T,H,W,3): something a VAE reconstructs well."""
    t, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    rgb = [np.sin(x / 9 + t / 5 + phase[0]), np.cos(y / 11 - t / 7 + phase[1]), np.sin((x + y) / 13 + phase[2])]
    return np.stack([(127.5 * (c + 1)).astype(np.uint8) for c in rgb], axis=-1)


def test_default_backend_is_onnxruntime_without_torch(caplog):
    assert default_backend() == ("torch" if is_installed("torch") else "onnxruntime")
    if not is_installed("torch"):
        vae = VideoVAE.load()
        assert vae.backend.name == "onnxruntime"
        assert "PyTorch is not installed: using the onnxruntime backend" in caplog.text


@pytest.mark.parametrize("case", golden_cases("public-v1-tiny"))
def test_golden_cases_through_onnxruntime(golden_v1, golden_export, case):
    ref = load_file(str(golden_v1 / "reference.safetensors"))
    vae = VideoVAE.load(golden_export, backend="onnxruntime")
    latents = vae.encode(ref[f"{case}.input"])
    assert isinstance(latents.mean, np.ndarray)
    assert max_abs(latents.mean, ref[f"{case}.latent_mean"]) <= TOL
    assert max_abs(latents.logvar, ref[f"{case}.latent_logvar"]) <= TOL
    decoded = vae.decode(ref[f"{case}.latent_mean"])
    assert isinstance(decoded, np.ndarray)
    assert max_abs(decoded, ref[f"{case}.decoded"]) <= TOL


def test_reconstruct_real_clip_with_the_default_model(tmp_path):
    clips = sorted(VIDEOS.glob("*.mp4"))
    if not clips:
        pytest.skip(f"no real clips in {VIDEOS} (set CVVAE_SHARED to the shared/ folder)")
    from cvvae.video_io import probe_video, read_video

    out = tmp_path / "out.mp4"
    r = CliRunner().invoke(main, ["reconstruct", str(clips[0]), "-o", str(out), "--max-frames", "17",
                                  "--resize-short-side", "64", "--save-latents", str(tmp_path / "z.safetensors")])
    assert r.exit_code == 0, r.output
    original, _ = read_video(clips[0], max_frames=17, resize_short_side=64)
    rebuilt, _ = read_video(out)
    h, w = original.shape[1:3]
    assert min(h, w) == 64 and probe_video(out).num_frames == 17 and rebuilt.shape == original.shape
    latents = Latents.load(tmp_path / "z.safetensors")
    assert latents.mean.shape == (1, 4, 5, -(-h // 8), -(-w // 8)) and latents.num_frames == 17
    mse = np.mean((original.astype(np.float64) - rebuilt.astype(np.float64)) ** 2)
    assert 10 * np.log10(255.0 ** 2 / mse) > 20.0  # the default model's PSNR on real footage (docs/default-model.md)


def test_streaming_decode_of_65_frames_in_bounded_memory(default_vae):
    latents = default_vae.encode(_frames(65))
    assert latents.mean.shape == (1, 4, 17, 8, 8) and latents.num_frames == 65
    whole = default_vae.decode(latents)
    tracemalloc.start()
    chunks, sums, done = [], [], []
    for pixels in default_vae.decode_stream(latents, on_progress=lambda n, total: done.append((n, total))):
        chunks.append(pixels.shape[2])  # keep nothing of the chunk but its size and sum (no copies while traced)
        sums.append(float(pixels.sum(dtype=np.float64)))
        del pixels
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    starts = np.cumsum([0] + chunks[:-1])
    assert sums == [float(whole[:, :, s:s + n].sum(dtype=np.float64)) for s, n in zip(starts, chunks)]
    assert chunks == [17, 16, 16, 16] and done[-1] == (65, 65)
    chunk_bytes = whole.nbytes * 17 / 65  # the first (largest) decode chunk: 17 frames
    assert peak < 1.5 * chunk_bytes, f"streaming decode held {peak / chunk_bytes:.2f} chunks at once"


def test_two_threads_decode_at_once(default_vae):
    latents = default_vae.encode(_frames(21, seed=1))
    expected = default_vae.decode(latents)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            vae = VideoVAE.load(backend="onnxruntime")  # one VideoVAE per thread (docs/thin-runtime.md)
            start.wait()
            results[i] = vae.decode(latents)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == [0, 1]
    for pixels in results.values():
        assert max_abs(pixels, expected) <= 1e-6


def test_runtime_path_never_imports_torch(tmp_path):
    """Encode, stream-decode, two threads and the CLI in a fresh interpreter: torch is never imported (installed or
    not). ``doctor`` runs only where torch is absent: where it is installed, doctor asks it for the GPUs by design."""
    script = textwrap.dedent(f"""
        import importlib.util, sys, threading
        import numpy as np
        from click.testing import CliRunner
        from cvvae.cli import main
        from cvvae.runtime import VideoVAE
        vae = VideoVAE.load(backend="onnxruntime")
        frames = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
        latents = vae.encode(frames)
        assert sum(p.shape[2] for p in vae.decode_stream(latents)) == 9
        threads = [threading.Thread(target=lambda: VideoVAE.load(backend="onnxruntime").decode(latents))
                   for _ in range(2)]
        [t.start() for t in threads]; [t.join() for t in threads]
        np.save({str(tmp_path / 'x.npy')!r}, (frames.transpose(3, 0, 1, 2) / 127.5 - 1).astype(np.float32))
        for args in (["encode", {str(tmp_path / 'x.npy')!r}, "-o", {str(tmp_path / 'z.safetensors')!r},
                      "--backend", "onnxruntime"],
                     ["decode", {str(tmp_path / 'z.safetensors')!r}, "-o", {str(tmp_path / 'y.mp4')!r},
                      "--backend", "onnxruntime"],
                     ["info"], *([["doctor"]] if importlib.util.find_spec("torch") is None else [])):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0, (args, r.output)
        print("torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx")))
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False []"


def test_command_needing_torch_says_the_install_line(monkeypatch):
    if is_installed("torch"):
        import cvvae.extras

        real = cvvae.extras.is_installed
        monkeypatch.setattr(cvvae.extras, "is_installed", lambda m: m != "torch" and real(m))
    r = CliRunner().invoke(main, ["export", "--model", "whatever", "-o", "out"])
    assert r.exit_code == 1
    assert r.output.strip() == ("Error: `cvvae export` needs the 'torch' package, which is not installed: "
                                'pip install "cvvae-deploy[torch]" (in a checkout: pip install "torch==2.13.0" '
                                '-e ".[torch]")')


def test_frames_pushed_one_by_one_give_the_whole_video_latents(default_vae):
    frames = _frames(22, 16, 24, seed=2)
    whole = default_vae.encode(frames)
    session = default_vae.encode_session(total_frames=22)
    pushed = [session.push(frames[i:i + 1]) for i in range(22)]
    assert [len(p) for p in pushed].count(1) == 1 and pushed[16]  # the first chunk is back at its 17th frame
    items = [item for p in pushed for item in p] + session.finish()
    mean = np.concatenate([m for m, _, _ in items if m.ndim == 5], axis=2)
    assert items[-1][2].num_frames == 22 and mean.shape == whole.mean.shape == (1, 4, 7, 2, 3)  # 22 frames pad to 25: 7 latents
    assert max_abs(mean, whole.mean) == 0.0
