"""Issue 13, items 1, 2, 3, 9 and 10: verified exports and engines, --force that replaces only our own outputs,
publishing that cannot clobber, recognisable temporaries removed after kill -9, permissions from the umask.

The acceptance cases run the real CLI in a subprocess; the rest use click's CliRunner (same code, no interpreter
start-up). Each asserts the exit code, a one-line message without a traceback, and what is on disk afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO
from cvvae import fsutil, integrity
from cvvae.cli import main
from cvvae.errors import IntegrityError

MODEL = ["--model", "random:tiny-v1"]


# ----- helpers --------------------------------------------------------------------------------------------------------
def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The cvvae command in a fresh interpreter, as a user runs it."""
    cmd = [sys.executable, "-c", "from cvvae.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def runner(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(text: str, *needles: str) -> str:
    """The single 'Error: ...' line of a failed command, after checking there is no traceback."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder`` with its bytes (None for folders), but the test's cache of verified hashes."""
    return {p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.relative_to(folder).parts[0] != "cache"}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if fsutil.TEMP_TAG in p.name or ".tmp" in p.name)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Exports and verified hashes go to a cache of this test only."""
    monkeypatch.setenv("CVVAE_CACHE", str(tmp_path / "cache"))
    integrity._MEMO.clear()


@pytest.fixture(scope="module")
def export_dir(shared_exports) -> Path:
    """An export of random:tiny-v1 with fp32 and fp16 graphs (shared; tests copy it)."""
    return shared_exports.get("tiny-v1", ("fp32", "fp16"))


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """Latents of 9 frames at 32x32 made by random:tiny-v1 (the model of ``export_dir``)."""
    folder = tmp_path_factory.mktemp("latents")
    np.save(folder / "px.npy", (np.random.RandomState(0).rand(3, 9, 32, 32) * 2 - 1).astype(np.float32))
    r = runner("encode", folder / "px.npy", "-o", folder / "lat.safetensors", *MODEL)
    assert r.exit_code == 0, r.output
    return folder / "lat.safetensors"


@pytest.fixture
def export_copy(export_dir, tmp_path) -> Path:
    out = tmp_path / "E"
    shutil.copytree(export_dir, out)
    return out


def decode_ort(export: Path, latents: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("decode", latents, "-o", out, "--model", export, "--backend", "onnxruntime", *extra)


# ----- item 1: graphs and engines are verified before use -------------------------------------------------------------
def test_intact_export_decodes_and_warm_start_hashes_nothing(export_copy, latents, tmp_path, monkeypatch):
    r = runner("decode", latents, "-o", tmp_path / "a.npy", "--model", export_copy, "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "a.npy").shape == (1, 3, 9, 32, 32)
    cache = json.loads((tmp_path / "cache" / integrity.CACHE_NAME).read_text())
    assert str((export_copy / "decoder.onnx").resolve()) in cache["entries"]
    # a new process (empty memo) with the on-disk cache: decoding again reads no graph to hash it
    integrity._MEMO.clear()
    hashed = []
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p) or fsutil.sha256_file(p))
    r = runner("decode", latents, "-o", tmp_path / "b.npy", "--model", export_copy, "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    assert hashed == []
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_swapped_graph_is_refused(export_copy, latents, tmp_path):
    """Acceptance: the fp16 graph copied over the fp32 one decoded with exit 0 and wrong pixels; now refused."""
    expected = json.loads((export_copy / "manifest.json").read_text())["components"]["decoder"]["files"]["fp32"]
    shutil.copyfile(export_copy / "decoder.fp16.onnx", export_copy / "decoder.onnx")
    before = tree(tmp_path)
    p = decode_ort(export_copy, latents, tmp_path / "out.npy")
    assert p.returncode == 1
    line = one_line_error(p.stderr, "IntegrityError", str(export_copy / "decoder.onnx"), expected["sha256"],
                          fsutil.sha256_file(export_copy / "decoder.fp16.onnx"), "re-export")
    assert line.count("sha256") == 1
    assert tree(tmp_path) == before  # nothing written, no temporary left


def test_tampered_graph_is_refused(export_copy, latents, tmp_path):
    """Acceptance: one byte of the graph changed, size and mtime restored: still hashed again (ctime) and refused."""
    graph = export_copy / "decoder.onnx"
    st = graph.stat()
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert graph.stat().st_size == st.st_size
    p = decode_ort(export_copy, latents, tmp_path / "out.npy")
    assert p.returncode == 1
    one_line_error(p.stderr, "IntegrityError", str(graph), "does not match")
    assert not (tmp_path / "out.npy").exists() and not temporaries(tmp_path)


def test_changed_file_is_hashed_again_despite_cache(tmp_path):
    f = tmp_path / "g.onnx"
    f.write_bytes(b"a" * 1000)
    first = integrity.file_sha256(f)
    st = f.stat()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only ctime tells
    assert integrity.file_sha256(f) == fsutil.sha256_file(f) != first


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.onnx", "sub/../../outside.onnx", "C:\\x.onnx"])
def test_manifest_path_outside_the_export_is_refused(export_copy, latents, tmp_path, name):
    """Acceptance: absolute paths and '..' in manifest.json are refused before anything is opened."""
    shutil.copyfile(export_copy / "decoder.onnx", tmp_path / "outside.onnx")
    doc = json.loads((export_copy / "manifest.json").read_text())
    doc["components"]["decoder"]["files"]["fp32"]["path"] = name
    (export_copy / "manifest.json").write_text(json.dumps(doc))
    if name.startswith("../"):  # the real subprocess only for one case each (interpreter start-up is slow)
        p = decode_ort(export_copy, latents, tmp_path / "out.npy")
        code, text = p.returncode, p.stderr
    else:
        r = runner("decode", latents, "-o", tmp_path / "out.npy", "--model", export_copy, "--backend", "onnxruntime")
        code, text = r.exit_code, r.output
    assert code == 1
    one_line_error(text, "IntegrityError", repr(name), "not a relative path inside its folder")
    assert not (tmp_path / "out.npy").exists() and not temporaries(tmp_path)


def test_symlink_leading_outside_the_export_is_refused(export_copy, latents, tmp_path):
    shutil.move(export_copy / "decoder.onnx", tmp_path / "elsewhere.onnx")
    (export_copy / "decoder.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    r = runner("decode", latents, "-o", tmp_path / "out.npy", "--model", export_copy, "--backend", "onnxruntime")
    assert r.exit_code == 1
    one_line_error(r.output, "IntegrityError", "outside")
    assert not (tmp_path / "out.npy").exists()


def test_export_cache_entry_is_verified(export_dir, tmp_path, monkeypatch):
    """cached_export (the onnxruntime backend without an export folder) checks its entry like any export."""
    from cvvae.export import to_onnx
    from cvvae.runtime.api import cached_export

    made = []

    def fake_export(model, target, config, overwrite=False):  # the real export is tested elsewhere: copy ours
        made.append(target)
        shutil.copytree(export_dir, target)

    monkeypatch.setattr(to_onnx, "export_model", fake_export)
    entry = cached_export("random:tiny-v1", precision="fp32")
    assert made == [entry] and entry.parent == tmp_path / "cache" / "exports"
    assert cached_export("random:tiny-v1", precision="fp32") == entry and len(made) == 1  # reused
    shutil.copyfile(entry / "decoder.fp16.onnx", entry / "decoder.onnx")
    with pytest.raises(IntegrityError, match=rf"decoder.onnx does not match .*; delete {entry}; it is exported"):
        cached_export("random:tiny-v1", precision="fp32")
    assert len(made) == 1


def _engine_dir(tmp_path: Path, file_name: str = "decoder.fp16.plan"):
    from cvvae.engines.sidecar import EngineDirManifest, EngineSidecar

    folder = tmp_path / "engines"
    folder.mkdir()
    plan = folder / "decoder.fp16.plan"
    plan.write_bytes(b"engine built by build-engines")
    env = {"tensorrt_version": "10.9.0", "cuda_version": "12.8", "gpu_name": "NVIDIA H200",
           "compute_capability": "9.0"}
    EngineSidecar(component="decoder", precision="fp16",
                  engine={"file": plan.name, "sha256": fsutil.sha256_file(plan), "size_bytes": 30},
                  onnx={"file": "decoder.fp16.onnx", "sha256": "0" * 64}, io={}, profiles=[], build={},
                  environment=env, cvvae_version="test").write(folder / "decoder.fp16.plan.json")
    manifest = EngineDirManifest(export={"dir": str(tmp_path / "no-export")}, model={},
                                 engines={"decoder": {"fp16": {"file": file_name,
                                                               "sidecar": "decoder.fp16.plan.json"}}})
    manifest.write(folder)
    return folder, env


def test_engine_path_outside_the_engine_dir_is_refused(tmp_path):
    from cvvae.engines.sidecar import load_engine_dir

    folder, _ = _engine_dir(tmp_path, file_name="../decoder.fp16.plan")
    with pytest.raises(IntegrityError, match="not a relative path inside its folder"):
        load_engine_dir(folder).engine_path("decoder", "fp16")


# ----- item 2: --force replaces only our own outputs ------------------------------------------------------------------
def test_force_decode_refuses_a_foreign_directory(latents, tmp_path):
    """Acceptance: `decode -o P --force` deleted P/src/main.py; now refused and P is untouched."""
    project = tmp_path / "P"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    before = tree(project)
    p = cli("decode", latents, "-o", project, "--force", *MODEL)
    assert p.returncode == 1
    one_line_error(p.stderr, "refusing to replace output", str(project), "src", "not a PNG frame written by cvvae")
    assert tree(project) == before and not temporaries(tmp_path)


def test_force_export_refuses_a_foreign_directory(tmp_path):
    """Acceptance: `export --out P --force` deleted an unrelated file; now refused and P is untouched."""
    project = tmp_path / "P"
    project.mkdir()
    (project / "notes.txt").write_text("keep me\n")
    p = cli("export", *MODEL, "--out", project, "--force", "--components", "decoder", "--precisions", "fp32",
            "--no-verify")
    assert p.returncode == 1
    one_line_error(p.stderr, "refusing to replace export directory", "no manifest.json")
    assert tree(project) == {"notes.txt": b"keep me\n"} and not temporaries(tmp_path)


def test_force_export_replaces_our_export_but_not_one_with_extra_files(export_copy, tmp_path):
    (export_copy / "decoder.onnx").write_bytes(b"stale")  # ours, even when damaged: --force re-exports it
    args = ["export", *MODEL, "--out", export_copy, "--force", "--components", "decoder", "--precisions", "fp32",
            "--no-verify"]
    r = runner(*args)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(export_copy)) == [fsutil.MARKER_NAME, "decoder.onnx", "manifest.json"]
    assert json.loads((export_copy / fsutil.MARKER_NAME).read_text())["kind"] == "export"
    (export_copy / "results.csv").write_text("mine\n")
    r = runner(*args)
    assert r.exit_code == 1
    one_line_error(r.output, "refusing to replace", "results.csv, which cvvae did not write")
    assert (export_copy / "results.csv").read_text() == "mine\n" and (export_copy / "manifest.json").exists()


def test_legacy_export_without_marker_is_ours_by_its_manifest(export_copy):
    (export_copy / fsutil.MARKER_NAME).unlink()
    assert fsutil.replace_problem(export_copy, "export") is None
    (export_copy / "other.onnx").write_bytes(b"x")
    assert "other.onnx, which cvvae did not write" in fsutil.replace_problem(export_copy, "export")
    assert "not a report folder" not in (fsutil.replace_problem(export_copy, "report") or "")
    assert fsutil.replace_problem(export_copy, "report").startswith("it has no .cvvae-output.json")


def test_model_folder_of_an_older_version_is_replaced_only_when_nothing_else_is_inside(tmp_path):
    """save_model(overwrite=True) over cvvae/weights/default as older versions wrote it (no marker)."""
    from cvvae.loading import create_model, save_model

    folder = tmp_path / "default"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"old weights")
    (folder / "README.md").write_text("mine")
    model = create_model("tiny-v1", seed=0)
    with pytest.raises(FileExistsError, match="it has no .cvvae-output.json"):
        save_model(model, folder, overwrite=True)
    assert (folder / "README.md").read_text() == "mine"
    (folder / "README.md").unlink()
    save_model(model, folder, overwrite=True)
    assert sorted(os.listdir(folder)) == [fsutil.MARKER_NAME, "config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["default"]


def test_force_replaces_our_png_folder_and_files(latents, tmp_path):
    frames = tmp_path / "frames"
    assert runner("decode", latents, "-o", frames, *MODEL).exit_code == 0
    first = tree(frames)
    assert sorted(first) == [f"frame_{i:06d}.png" for i in range(9)]
    r = runner("decode", latents, "-o", frames, *MODEL)
    assert r.exit_code == 1
    one_line_error(r.output, "already exists", "--force")
    r = runner("decode", latents, "-o", frames, "--force", *MODEL)
    assert r.exit_code == 0, r.output
    assert tree(frames) == first and not temporaries(tmp_path)
    (frames / "frame_000003.png").rename(frames / "keep.png")  # something of the user's now lives there
    r = runner("decode", latents, "-o", frames, "--force", *MODEL)
    assert r.exit_code == 1
    one_line_error(r.output, "keep.png, which is not a PNG frame written by cvvae")
    assert (frames / "keep.png").read_bytes() == first["frame_000003.png"]
    # a file output replaces a regular file, never a directory
    npy = tmp_path / "x.npy"
    npy.write_bytes(b"old")
    assert runner("decode", latents, "-o", npy, "--force", *MODEL).exit_code == 0
    assert np.load(npy).shape == (1, 3, 9, 32, 32)
    folder = tmp_path / "y.safetensors"
    (folder / "data").mkdir(parents=True)
    r = runner("encode", latents.parent / "px.npy", "-o", folder, "--force", *MODEL)
    assert r.exit_code == 1
    one_line_error(r.output, "it is a directory, and this output is a file")
    assert tree(folder) == {"data": None}


# ----- item 3: no clobber under races ---------------------------------------------------------------------------------
def _appear_during_decode(monkeypatch, action):
    """Run ``action`` (a racing writer) right after decoding, before the output is published."""
    from cvvae.runtime.api import VideoVAE

    original = VideoVAE.decode_stream

    def racing(self, *args, **kwargs):
        yield from original(self, *args, **kwargs)
        action()

    monkeypatch.setattr(VideoVAE, "decode_stream", racing)


def test_file_appearing_while_writing_is_not_clobbered(latents, tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    _appear_during_decode(monkeypatch, lambda: out.write_bytes(b"the other writer's video"))
    r = runner("decode", latents, "-o", out, *MODEL)
    assert r.exit_code == 1
    one_line_error(r.output, "appeared while writing and was left alone")
    assert out.read_bytes() == b"the other writer's video" and not temporaries(tmp_path)


def test_folder_appearing_while_writing_is_not_clobbered(latents, tmp_path, monkeypatch):
    out = tmp_path / "frames"

    def other_writer():
        out.mkdir()
        (out / "frame_000000.png").write_bytes(b"theirs")

    _appear_during_decode(monkeypatch, other_writer)
    r = runner("decode", latents, "-o", out, *MODEL)
    assert r.exit_code == 1
    one_line_error(r.output, "appeared while writing")
    assert tree(out) == {"frame_000000.png": b"theirs"} and not temporaries(tmp_path)


def test_force_with_a_foreign_folder_appearing_while_writing(latents, tmp_path, monkeypatch):
    out = tmp_path / "frames"

    def other_writer():
        out.mkdir()
        (out / "report.txt").write_text("theirs")

    _appear_during_decode(monkeypatch, other_writer)
    r = runner("decode", latents, "-o", out, "--force", *MODEL)
    assert r.exit_code == 1
    one_line_error(r.output, "refusing to replace", "report.txt")
    assert tree(out) == {"report.txt": b"theirs"} and not temporaries(tmp_path)


def test_publish_without_renameat2_still_refuses(tmp_path, monkeypatch):
    """The fallback (no renameat2): a folder never lands on an existing entry."""
    monkeypatch.setattr(fsutil, "_LIBC", [None])
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while writing"):
        with fsutil.atomic_path(target, directory=True, kind="report") as tmp:
            (tmp / "a.txt").write_text("new")
            target.mkdir()
            (target / "b.txt").write_text("theirs")
    assert tree(target) == {"b.txt": b"theirs"} and not temporaries(tmp_path)
    # --force over our own folder without RENAME_EXCHANGE: set aside, publish, remove the old
    with fsutil.atomic_path(tmp_path / "r", directory=True, kind="report") as tmp:
        (tmp / "one.txt").write_text("1")
    with fsutil.atomic_path(tmp_path / "r", directory=True, kind="report", overwrite=True) as tmp:
        (tmp / "two.txt").write_text("2")
    assert sorted(os.listdir(tmp_path / "r")) == [fsutil.MARKER_NAME, "two.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "r"]


# ----- item 9: temporaries of killed runs -----------------------------------------------------------------------------
_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from cvvae.fsutil import atomic_path
    with atomic_path(sys.argv[1], directory=sys.argv[2] == "dir", kind="report") as tmp:
        (tmp / "part").write_text("half") if sys.argv[2] == "dir" else tmp.write_bytes(b"half a shard")
        print(tmp, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_writer(target: Path, kind: str) -> Path:
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target), kind], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    tmp = Path(p.stdout.strip())
    assert tmp.exists() and tmp.name.startswith(f".{target.name}.cvvae-tmp-")
    return tmp


def test_kill_9_leftovers_are_removed_by_the_next_run(latents, tmp_path):
    out = tmp_path / "lat.safetensors"
    left_file = _killed_writer(out, "file")
    frames = tmp_path / "frames"
    left_dir = _killed_writer(frames, "dir")
    unrelated = [tmp_path / ".lat.safetensors.tmp-abc", tmp_path / ".other.cvvae-tmp-1-abcdef12", tmp_path / "keep"]
    for p in unrelated:
        p.write_text("not ours to delete")
    r = runner("encode", latents.parent / "px.npy", "-o", out, *MODEL)
    assert r.exit_code == 0, r.output
    assert not left_file.exists()
    r = runner("decode", out, "-o", frames, *MODEL)
    assert r.exit_code == 0, r.output
    assert not left_dir.exists()
    assert all(p.read_text() == "not ours to delete" for p in unrelated)
    assert sorted(os.listdir(tmp_path)) == sorted(["frames", "lat.safetensors", *(p.name for p in unrelated)])


def test_live_writers_temporary_is_kept(tmp_path):
    target = tmp_path / "out.npy"
    code = ("import sys, time; from cvvae.fsutil import make_temp; "
            "tmp, fd = make_temp(sys.argv[1]); print(tmp, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert fsutil.remove_stale_temps(target) == [] and tmp.exists()  # locked by a live process
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert fsutil.remove_stale_temps(target) == [tmp] and not tmp.exists()


def test_safetensors_written_through_our_own_temporary(latents, tmp_path, monkeypatch):
    import safetensors.torch

    def refuse(*a, **k):
        raise AssertionError("save_file makes its own private temporary; write bytes into ours")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    out = tmp_path / "z.safetensors"
    r = runner("encode", latents.parent / "px.npy", "-o", out, *MODEL)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path)) == ["z.safetensors"]
    assert safetensors.torch.load_file(out)["mean"].shape == (1, 4, 3, 4, 4)


# ----- item 10: permissions follow the umask --------------------------------------------------------------------------
def test_outputs_follow_the_umask(latents, tmp_path):
    mask = 0o027  # not the usual 022, so neither mkstemp's 0600 nor a hard-coded 0644 passes
    old = os.umask(mask)
    try:
        px = latents.parent / "px.npy"
        for name in ("z.safetensors", "z.npy"):
            assert runner("encode", px, "-o", tmp_path / name, *MODEL).exit_code == 0
        for name in ("v.mp4", "frames", "p.npy"):
            assert runner("decode", latents, "-o", tmp_path / name, *MODEL).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    files, dirs = 0o666 & ~mask, 0o777 & ~mask
    assert modes == {"z.safetensors": files, "z.npy": files, "v.mp4": files, "p.npy": files, "frames": dirs,
                     **{f"frames/frame_{i:06d}.png": files for i in range(9)}}
