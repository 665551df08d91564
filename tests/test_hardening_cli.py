"""Issue 13 (items 4-8, 11): hostile and careless input through the CLI gives one line, the right exit code, no trace.

Every case runs the real ``cvvae`` command line (click's standalone mode, as the console script does). To stay fast,
the cases run in one child process (:data:`DRIVER`) that calls the CLI once per case, capturing stdout/stderr and the
exit status, and turning an escaped exception into the interpreter's "Traceback" text; two cases also run as their
own ``python`` process to pin the real exit statuses 1 and 2. Models are a tiny config folder (widths 32, one resnet
per level) with 5-frame 32x32 inputs. Each case asserts the exit status (2: usage error; 1: anything else refused),
a message on one line without "Traceback", and what is on disk afterwards (no output, no temporary left behind).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cvvae.config import ModelConfig
from cvvae.export.to_onnx import ExportConfig, export_model
from cvvae.loading import create_model, load_model, save_model
from cvvae.memory import available_memory, plan_memory
from cvvae.plan import PlanSettings, make_plan
from cvvae.video_io import probe_video, tensor_to_frames, write_video

TINY = ModelConfig(variant="v1", widths=(32, 32, 32, 32), layers_per_block=1, tile_spatial_size=64,
                   tile_overlap_ratio=0.25)

DRIVER = r'''
import io, json, logging, resource, sys, traceback
from contextlib import redirect_stderr, redirect_stdout
from cvvae.cli import main

cases = json.loads(open(sys.argv[1]).read())
results = {}
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
for name, case in cases.items():
    out, err = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()
    if case.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], hard))
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(case["args"], prog_name="cvvae", standalone_mode=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                err.write(traceback.format_exc())  # what the interpreter would print
                code = 1
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
open(sys.argv[2], "w").write(json.dumps(results))
'''


def _config_dir(root: Path, name: str, config: dict | list, weights_from: Path | None = None) -> Path:
    """A checkpoint folder with this config.json (and the tiny model's weights, or an empty weights file)."""
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    weights = d / "diffusion_pytorch_model.safetensors"
    if weights_from is None:
        weights.write_bytes(b"")
    else:
        shutil.copy(weights_from / weights.name, weights)
    return d


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    tiny = save_model(create_model(TINY, seed=0), root / "tiny")
    official = json.loads((tiny / "config.json").read_text())
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 5, 32, 32)).astype(np.float32)
    np.save(root / "x.npy", x)
    write_video(root / "clip.mp4", tensor_to_frames(torch.from_numpy(x)), 10.0)
    np.save(root / "empty.npy", np.zeros((3, 0, 32, 32), np.float32))
    model = load_model(tiny)
    enc = model.encode(torch.from_numpy(x))
    meta = {"format": '"cvvae-latents/1"', "num_frames": "5", "height": "32", "width": "32"}
    mean = enc.mean.contiguous()
    save_file({"mean": mean}, str(root / "z.safetensors"), metadata=meta)
    save_file({"mean": torch.cat([mean, mean.flip(-1)])}, str(root / "batch2.safetensors"), metadata=meta)
    nan = mean.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    save_file({"mean": nan}, str(root / "nan.safetensors"), metadata=meta)
    inf = mean[0].clone().numpy()
    inf[1, 1, 1, 1] = np.inf
    np.save(root / "inf.npy", inf)
    save_file({"mean": mean}, str(root / "abc.safetensors"), metadata={**meta, "height": '"abc"'})
    np.save(root / "lat2d.npy", np.zeros((4, 4), np.float32))
    np.save(root / "lat3d.npy", np.zeros((4, 2, 4), np.float32))
    (root / "notes.pt").write_text("hello, this is not a checkpoint\n")
    # weights that overflow: the decoder's last conv filled with 3e38 makes its output infinite
    broken = load_model(tiny)
    with torch.no_grad():
        broken.decoder.conv_out.weight.fill_(3e38)
    save_model(broken, root / "overflow")

    configs = {
        "cfg_str": {**official, "ch": "32"},
        "cfg_float": {**official, "ch": 32.5},
        "cfg_bool": {**official, "num_res_blocks": True},
        "cfg_neg": {**official, "ch": -32},
        "cfg_huge": {**official, "ch": 1_000_000_000},
        "cfg_blocks": {**official, "num_res_blocks": 1_000_000},
        "cfg_nan": {**official, "scaling_factor": math.nan},
        "cfg_list": [official],
        "cfg_toolarge": {**official, "ch": 4096, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 32},
        "cfg_overlap_null_tiled": {**official, "tile_overlap_ratio": None},
    }
    for name, cfg in configs.items():
        _config_dir(root, name, cfg)
    nulls = {
        "null_chunk": {"en_de_n_frames_a_time": None},
        "null_time": {"en_de_n_frames_a_time": None, "time_n_compress": None},
        "null_tile": {"tile_spatial_size": None},
        "null_overlap": {"tile_spatial_size": None, "tile_overlap_ratio": None},
        "null_spatial": {"tile_spatial_size": None, "spatial_n_compress": None},
        "null_video_frames": {"num_video_frames": None},
        "null_all": {"en_de_n_frames_a_time": None, "time_n_compress": None, "tile_spatial_size": None,
                     "tile_overlap_ratio": None, "spatial_n_compress": None, "num_video_frames": None},
    }
    for name, change in nulls.items():
        _config_dir(root, name, {**official, **change}, weights_from=tiny)

    export = export_model(load_model(tiny), root / "E", ExportConfig(precisions=("fp32",), verify=False)).directory
    swapped = root / "E_swapped"
    shutil.copytree(export, swapped)
    (swapped / "encoder.onnx").rename(swapped / "tmp.onnx")
    (swapped / "decoder.onnx").rename(swapped / "encoder.onnx")
    (swapped / "tmp.onnx").rename(swapped / "decoder.onnx")
    empty = root / "E_empty"
    shutil.copytree(export, empty)
    (empty / "decoder.onnx").write_bytes(b"")
    return root


def cases(root: Path) -> dict[str, dict]:
    r = str(root)
    tiny = ["--model", f"{r}/tiny"]
    out = f"{r}/out"

    def case(*args: str, **extra) -> dict:
        return {"args": list(args), **extra}

    c = {
        # 4. bounded configs
        **{name: case("info", "--model", f"{r}/{name}") for name in (
            "cfg_str", "cfg_float", "cfg_bool", "cfg_neg", "cfg_huge", "cfg_blocks", "cfg_nan", "cfg_list",
            "cfg_toolarge", "cfg_overlap_null_tiled")},
        # 5. Optional fields as null
        **{name: case("info", "--model", f"{r}/{name}", "--size", "41x80x80", "--json") for name in (
            "null_chunk", "null_time", "null_tile", "null_overlap", "null_spatial", "null_video_frames")},
        "null_all_encode": case("encode", f"{r}/x.npy", "-o", f"{out}/null_all.safetensors", "--model",
                                f"{r}/null_all"),
        # 6. non-finite
        "nan_latents": case("decode", f"{r}/nan.safetensors", "-o", f"{out}/nan.mp4", *tiny),
        "inf_latents": case("decode", f"{r}/inf.npy", "-o", f"{out}/inf.npy", *tiny),
        "overflow": case("decode", f"{r}/z.safetensors", "-o", f"{out}/overflow.mp4", "--model", f"{r}/overflow",
                         "--ignore-model-mismatch"),
        # 7. batch of two latents to videos
        "batch_mp4": case("decode", f"{r}/batch2.safetensors", "-o", f"{out}/b.mp4", *tiny),
        "batch_png": case("decode", f"{r}/batch2.safetensors", "-o", f"{out}/frames", *tiny),
        "batch_npy": case("decode", f"{r}/batch2.safetensors", "-o", f"{out}/b.npy", *tiny),
        # 8. suffixes and options checked up front
        "suffix_xyz": case("decode", f"{r}/z.safetensors", "-o", f"{out}/y.xyz", *tiny),
        "suffix_avi": case("decode", f"{r}/z.safetensors", "-o", f"{out}/y.avi", *tiny),
        "suffix_gif": case("decode", f"{r}/z.safetensors", "-o", f"{out}/y.gif", *tiny),
        "save_latents_xyz": case("reconstruct", f"{r}/clip.mp4", "-o", f"{out}/r.mp4", "--save-latents",
                                 f"{out}/x.xyz", *tiny),
        "reconstruct_npy_out": case("reconstruct", f"{r}/clip.mp4", "-o", f"{out}/r.npy", *tiny),
        "encode_xyz": case("encode", f"{r}/x.npy", "-o", f"{out}/z.xyz", *tiny),
        "crf_range": case("reconstruct", f"{r}/clip.mp4", "-o", f"{out}/r.mp4", "--crf", "99", *tiny),
        "fps_nan": case("decode", f"{r}/z.safetensors", "-o", f"{out}/y.mp4", "--fps", "nan", *tiny),
        "tile_overlap": case("encode", f"{r}/x.npy", "-o", f"{out}/z.safetensors", "--tile-overlap", "1", *tiny),
        "chunk_frames": case("encode", f"{r}/x.npy", "-o", f"{out}/z.safetensors", "--chunk-frames", "6", *tiny),
        "precision": case("encode", f"{r}/x.npy", "-o", f"{out}/z.safetensors", "--precision", "int8", *tiny),
        # 11. no tracebacks
        "device_cuda": case("encode", f"{r}/x.npy", "-o", f"{out}/cuda.safetensors", "--device", "cuda", *tiny),
        "device_banana": case("encode", f"{r}/x.npy", "-o", f"{out}/z.safetensors", "--device", "banana", *tiny),
        "info_device_banana": case("info", "--device", "banana", *tiny),
        "stride0": case("encode", f"{r}/clip.mp4", "-o", f"{out}/z.safetensors", "--stride", "0", *tiny),
        "reconstruct_npy_in": case("reconstruct", f"{r}/x.npy", "-o", f"{out}/r.mp4", *tiny),
        "full_disk_safetensors": case("encode", f"{r}/x.npy", "-o", f"{out}/full.safetensors", *tiny, fsize=1024),
        "full_disk_npy": case("encode", f"{r}/x.npy", "-o", f"{out}/full.npy", *tiny, fsize=300),
        "size_16000_untiled": case("encode", f"{r}/clip.mp4", "-o", f"{out}/z.safetensors", "--size",
                                   "16000x16000", "--no-tiling", *tiny),
        "size_16000": case("encode", f"{r}/clip.mp4", "-o", f"{out}/z.safetensors", "--size", "16000x16000",
                           *tiny),
        "size_100000": case("encode", f"{r}/clip.mp4", "-o", f"{out}/z.safetensors", "--size", "100000x100000",
                            *tiny),
        "height_abc": case("decode", f"{r}/abc.safetensors", "-o", f"{out}/y.npy", *tiny),
        "onnx_swapped": case("decode", f"{r}/z.safetensors", "-o", f"{out}/y.npy", "--backend", "onnxruntime",
                             "--model", f"{r}/E_swapped"),
        "onnx_empty": case("decode", f"{r}/z.safetensors", "-o", f"{out}/y.npy", "--backend", "onnxruntime",
                           "--model", f"{r}/E_empty"),
        "empty_npy": case("encode", f"{r}/empty.npy", "-o", f"{out}/z.safetensors", *tiny),
        "latent_2d": case("decode", f"{r}/lat2d.npy", "-o", f"{out}/y.npy", *tiny),
        "latent_3d": case("decode", f"{r}/lat3d.npy", "-o", f"{out}/y.npy", *tiny),
        "text_model": case("info", "--model", f"{r}/notes.pt"),
        "info_long_plan": case("info", *tiny, "--size", "100000000x64x64"),
    }
    return c


@pytest.fixture(scope="module")
def results(setup):
    root = setup
    (root / "out").mkdir()
    spec = cases(root)
    (root / "cases.json").write_text(json.dumps(spec))
    (root / "driver.py").write_text(DRIVER)
    before = _files(root)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(root / "driver.py"), str(root / "cases.json"),
                           str(root / "results.json")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((root / "results.json").read_text())
    return root, res, before


def refused(res: dict, name: str, code: int, *needles: str) -> str:
    """The case exited with ``code``, printed one error line holding every needle, and no traceback."""
    r = res[name]
    text = r["stderr"] + r["stdout"]
    assert r["code"] == code, f"{name}: exit {r['code']}, expected {code}:\n{text}"
    assert "Traceback" not in text, f"{name}:\n{text}"
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"{name}: expected one error line:\n{text}"
    for needle in needles:
        assert needle in errors[0], f"{name}: {needle!r} not in {errors[0]!r}"
    return errors[0]


def test_config_values_are_checked_before_building(results):
    root, res, _ = results
    refused(res, "cfg_str", 1, "ch must be an integer, got '32' (a string)")
    refused(res, "cfg_float", 1, "ch must be an integer, got 32.5 (a number)")
    refused(res, "cfg_bool", 1, "num_res_blocks must be an integer, got True (a boolean)")
    refused(res, "cfg_neg", 1, "ch=-32 is out of range: expected an integer in 1..8192")
    refused(res, "cfg_huge", 1, "ch=1000000000 is out of range")
    refused(res, "cfg_blocks", 1, "num_res_blocks=1000000 is out of range: expected an integer in 1..32")
    refused(res, "cfg_nan", 1, "scaling_factor=nan must be a finite number")
    refused(res, "cfg_list", 1, "config.json: a model config must be a JSON object of settings, not a list")
    line = refused(res, "cfg_toolarge", 1, "needs about", "GB", "of memory is available")
    # the estimate: 2 copies of fp32 weights of the model the config describes
    assert "parameters" in line and "num_res_blocks" in line
    refused(res, "cfg_overlap_null_tiled", 1, "tile_overlap_ratio is null but tile_spatial_size is set")
    for name in ("cfg_str", "cfg_list", "cfg_toolarge"):  # nothing written into the checkpoint folder
        assert _files(root / name) == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_official_optional_fields_may_be_null(results):
    root, res, _ = results
    plans = {}
    for name in ("null_chunk", "null_time", "null_tile", "null_overlap", "null_spatial", "null_video_frames"):
        r = res[name]
        assert r["code"] == 0, f"{name}: {r['stderr']}"
        plans[name] = json.loads(r["stdout"])
    # 41 frames: 3 chunks of 16+1 frames normally, one chunk without chunking; 80 px: 2x2 tiles of 64, else one
    for name in ("null_chunk", "null_time"):
        p = plans[name]["plan"]
        assert p["settings"]["chunk_frames"] is None and p["encode_chunk_count"] == 1
        assert p["encode_chunks_frames"] == [[0, 41]] and p["decode_chunks_latents"] == [[0, 11]]
        assert plans[name]["compression"]["time"] == 4
    for name in ("null_tile", "null_overlap", "null_spatial"):
        p = plans[name]["plan"]
        assert p["settings"]["tile_size"] is None and (p["tile_row_count"], p["tile_col_count"]) == (1, 1)
        assert p["encode_chunk_count"] == 3 and plans[name]["compression"]["space"] == 8
    p = plans["null_video_frames"]["plan"]
    assert (p["tile_row_count"], p["encode_chunk_count"]) == (2, 3)
    assert res["null_all_encode"]["code"] == 0, res["null_all_encode"]["stderr"]
    assert (root / "out" / "null_all.safetensors").exists()


def test_nonfinite_latents_and_outputs_stop_with_the_component_and_chunk(results):
    root, res, _ = results
    refused(res, "nan_latents", 1, "mean has 1 NaN/Inf values out of 128")
    refused(res, "inf_latents", 1, "mean has 1 NaN/Inf values out of 128")
    refused(res, "overflow", 1, "decoder output of the chunk of latents 0-1 has", "NaN/Inf values")
    for name in ("nan.mp4", "inf.npy", "overflow.mp4"):
        assert not (root / "out" / name).exists()


def test_latent_batch_gives_one_video_per_item(results):
    root, res, _ = results
    out = root / "out"
    for name in ("batch_mp4", "batch_png", "batch_npy"):
        assert res[name]["code"] == 0, res[name]["stderr"]
    assert "2 videos" in res["batch_mp4"]["stdout"] and "of 5 frames each" in res["batch_mp4"]["stdout"]
    assert not (out / "b.mp4").exists()
    for b in (0, 1):
        assert probe_video(out / f"b_{b}.mp4").num_frames == 5
    # PNG frames are exact: item b of the batch, never the other's frames interleaved
    pixels = np.load(out / "b.npy")
    assert pixels.shape == (2, 3, 5, 32, 32)
    for b in (0, 1):
        pngs = sorted((out / f"frames_{b}").iterdir())
        assert len(pngs) == 5
        got = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
        assert np.array_equal(got, tensor_to_frames(torch.from_numpy(pixels[b])))
    assert not np.array_equal(pixels[0], pixels[1])


def test_suffixes_and_options_are_checked_before_the_work(results):
    root, res, _ = results
    for name in ("suffix_xyz", "suffix_avi", "suffix_gif"):
        refused(res, name, 2, "unsupported suffix", "supported: .mp4, .mkv, .mov, .webm, .npy, or no suffix for a "
                "folder of PNG frames")
    refused(res, "save_latents_xyz", 2, "--save-latents", "supported: .safetensors, .npy")
    refused(res, "reconstruct_npy_out", 2, "unsupported suffix '.npy'")
    refused(res, "encode_xyz", 2, "supported: .safetensors, .npy")
    refused(res, "crf_range", 2, "'--crf': 99 is not in the range 0<=x<=51")
    refused(res, "fps_nan", 2, "nan is not a positive frame rate")
    refused(res, "tile_overlap", 2, "--tile-overlap")
    refused(res, "chunk_frames", 2, "chunk_frames=6 must be a positive multiple of 4")
    refused(res, "precision", 2, "the torch backend runs fp32, fp16, bf16, not int8")
    for name in ("crf_range", "save_latents_xyz", "reconstruct_npy_out"):  # refused before encoding a frame
        assert "encode:" not in res[name]["stderr"]


def test_no_tracebacks(results):
    root, res, _ = results
    if torch.cuda.is_available():
        assert res["device_cuda"]["code"] == 0
    elif torch.backends.cuda.is_built():
        refused(res, "device_cuda", 1, "no CUDA GPU is visible")
    else:
        refused(res, "device_cuda", 1, "this PyTorch build", "has no CUDA support; use --device cpu")
    refused(res, "device_banana", 2, "'banana' is not a device")
    refused(res, "info_device_banana", 2, "'banana' is not a device")
    refused(res, "stride0", 2, "'--stride': 0 is not in the range x>=1")
    refused(res, "reconstruct_npy_in", 2, "reconstruct reads a video file")
    refused(res, "full_disk_safetensors", 1, "could not write", "full.safetensors", "file-size limit")
    refused(res, "full_disk_npy", 1, "could not write", "full.npy", "file-size limit")
    # the memory budget (--max-memory, default 90 % of what is available) refuses first, with its estimate
    refused(res, "size_16000_untiled", 1, "a 5x16000x16000 video (planned per chunk of 17 frames) needs about",
            "GiB", "(no tiling, 4-frame chunks; tiling as asked)", "budget",
            "let the budget choose the tiling (leave out --tile-size/--no-tiling", "smaller size")
    settings = PlanSettings.from_config(TINY)
    estimate = plan_memory(make_plan(settings, 5, 16000, 16000), TINY, direction="encode").total
    if estimate > (available_memory() or 0):
        refused(res, "size_16000", 1, "a 5x16000x16000 video (planned per chunk of 17 frames) needs about", "GiB",
                "with its smallest plan (64 px tiles, 4-frame chunks)", "budget")
    refused(res, "size_100000", 1, "frames of 100000x100000 are beyond what FFmpeg can scale")
    refused(res, "height_abc", 1, "metadata height='abc' is not a positive integer")
    refused(res, "onnx_swapped", 1, "E_swapped/encoder.onnx")  # the first graph loaded
    refused(res, "onnx_empty", 1, "decoder.onnx")
    refused(res, "empty_npy", 1, "has shape (3, 0, 32, 32): no pixels")
    refused(res, "latent_2d", 1, "holds a latent of shape (4, 4) (2-D); expected (B, z, L, h, w)")
    refused(res, "latent_3d", 1, "(3-D); expected")
    line = refused(res, "text_model", 1, "is not a checkpoint: it is neither safetensors nor a torch zip/pickle")
    assert "--trust-checkpoint" not in line
    long_plan = res["info_long_plan"]
    assert long_plan["code"] == 0 and len(long_plan["stdout"]) < 3000
    assert "6,250,000 chunks: [[0, 17], [16, 33], [32, 49], ... [99999968, 99999985]" in long_plan["stdout"]


def test_nothing_left_behind(results):
    root, res, before = results
    out = root / "out"
    written = {p.name for p in out.iterdir()}
    assert written == {"null_all.safetensors", "b_0.mp4", "b_1.mp4", "frames_0", "frames_1", "b.npy"}, written
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_real_processes_exit_2_for_usage_and_1_for_refusals(setup):
    root = setup
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cli = [sys.executable, "-c", "from cvvae.cli import main; main()"]
    usage = subprocess.run([*cli, "decode", str(root / "z.safetensors"), "-o", str(root / "y.xyz"), "--model",
                            str(root / "tiny")], capture_output=True, text=True, env=env, timeout=300)
    refusal = subprocess.run([*cli, "decode", str(root / "nan.safetensors"), "-o", str(root / "y.mp4"), "--model",
                              str(root / "tiny")], capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == 2 and refusal.returncode == 1
    for proc in (usage, refusal):
        assert "Traceback" not in proc.stderr and sum(line.startswith("Error:") for line in
                                                         proc.stderr.splitlines()) == 1, proc.stderr
    assert not (root / "y.xyz").exists() and not (root / "y.mp4").exists()
