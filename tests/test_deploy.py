"""``cvvae deploy`` (what ``./build.sh`` runs) on the tiny model: every step, skipping, re-running, failing, and the
engine step on a machine without TensorRT (this one)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cvvae.cli import main
from cvvae.compare import PARITY
from cvvae.errors import DeployError
from cvvae.extras import is_installed
from cvvae.tools.deploy import STATE_NAME, DeployConfig, State, deploy

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
MODEL = "random:tiny-v1"
pytestmark = pytest.mark.skipif(not sorted(VIDEOS.glob("*.mp4")), reason=f"no clips in {VIDEOS}")


def _clips() -> list[Path]:
    return sorted(VIDEOS.glob("*.mp4"))


def _config(out: Path, **kw) -> DeployConfig:
    kw.setdefault("clip", _clips()[0])
    return DeployConfig(out=out, model=MODEL, precision="fp32", frames=5, size=(32, 48), **kw)


def _steps(result) -> dict[str, str]:
    return {s.step: s.status for s in result.steps}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "artifacts"
    return out, deploy(_config(out), say=lambda m: None)


def test_first_run_runs_every_step(first_run):
    out, result = first_run
    assert result.ok, result.summary()
    assert _steps(result) == {"model": "given", "export": "done", "int8": "skipped", "engines": "skipped",
                              "parity": "done"}
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["checkpoint"]["source"] == MODEL
    # parity: four outputs of onnxruntime fp32 against torch, judged by the fp32 parity tolerance (1e-3)
    assert [c.name for c in result.parity] == ["onnxruntime/encoder.mean", "onnxruntime/encoder.logvar",
                                               "onnxruntime/decoder.video", "onnxruntime/round_trip.video"]
    assert all(c.limit == PARITY[("fp32", "component")].atol == 1e-3 and c.max_abs < 1e-3 for c in result.parity)
    assert result.parity[2].shape == (1, 3, 5, 32, 48)
    record = json.loads((out / "deploy.json").read_text())
    assert record["ok"] and [s["step"] for s in record["steps"]] == ["model", "export", "int8", "engines", "parity"]
    state = json.loads((out / STATE_NAME).read_text())
    assert set(state["steps"]) == {"export", "parity-onnxruntime-fp32"}


@pytest.mark.skipif(is_installed("tensorrt"), reason="checks the machine without TensorRT")
def test_engine_step_without_tensorrt_says_why_and_writes_the_commands(first_run):
    out, result = first_run
    engines = next(s for s in result.steps if s.step == "engines")
    assert engines.status == "skipped"
    assert engines.detail.startswith("TensorRT is not installed; trtexec lines in ")
    trtexec = (out / "trtexec.fp32.sh").read_text().splitlines()[1:]
    polygraphy = (out / "polygraphy.fp32.sh").read_text().splitlines()[1:]
    assert len(trtexec) == len(polygraphy) == 2  # encoder, decoder
    assert all(line.startswith("trtexec --onnx=") for line in trtexec)
    enc = shlex.split(polygraphy[0])  # shell-quoted: 'video:[1,3,...]'
    assert enc[:2] == ["polygraphy", "run"] and enc[2].endswith("export/encoder.onnx")
    assert {"--trt", "--onnxrt", "--strongly-typed"} <= set(enc)
    text = " ".join(enc)
    assert "--trt-outputs mark all --onnx-outputs mark all" in text and "--atol 0.001" in text
    assert "--trt-min-shapes video:[1,3," in text and "--input-shapes video:[1,3," in text
    # the sidecars that let the tensorrt backend load what the trtexec lines build
    assert sorted(p.name for p in (out / "engines").glob("*.json")) == [
        "decoder.fp32.plan.json", "encoder.fp32.plan.json", "manifest.json"]
    summary = result.summary()
    assert "polygraphy run" in summary and "trtexec --onnx=" in summary and summary.endswith("result: ok")


def test_engines_of_another_export_of_this_run_are_replaced(first_run):
    """--int8 added (or dropped) switches the export the engines come from: OUT/engines is rebuilt, not refused."""
    from cvvae.tools.deploy import Pipeline

    out, _ = first_run
    pipeline = Pipeline(_config(out))
    assert pipeline._engines_from_other_export() is False
    other = out / "export-int8"
    other.mkdir()
    try:
        (other / "manifest.json").write_text((out / "export" / "manifest.json").read_text() + "\n")
        pipeline.export_dir = other
        assert pipeline._engines_from_other_export() is True
    finally:
        shutil.rmtree(other)


def test_second_run_skips_current_steps(first_run):
    out, _ = first_run
    export_mtime = (out / "export" / "manifest.json").stat().st_mtime_ns
    result = deploy(_config(out), say=lambda m: None)
    assert _steps(result) == {"model": "given", "export": "current", "int8": "skipped", "engines": "skipped",
                              "parity": "current"}
    assert (out / "export" / "manifest.json").stat().st_mtime_ns == export_mtime
    assert len(result.parity) == 4 and result.ok


def test_changed_input_reruns_only_that_step(first_run, tmp_path):
    out, first = first_run
    clip = tmp_path / "other.mp4"
    shutil.copy(_clips()[-1], clip)
    if _clips()[-1] == _clips()[0]:  # one clip only: a changed file all the same
        clip.write_bytes(clip.read_bytes() + b"\0")
    state = State(out)
    assert state.why_not_current("parity-onnxruntime-fp32", {**state.data["steps"]["parity-onnxruntime-fp32"]
                                                             ["inputs"], "clip": "x"}, []) == \
        "changed since the last run: clip"
    result = deploy(_config(out, clip=clip), say=lambda m: None)
    assert _steps(result)["export"] == "current" and _steps(result)["parity"] == "done"
    # a graph rewritten after the export makes the export stale (the next run re-exports, then re-runs parity)
    from cvvae.tools.deploy import _export_files

    state = State(out)
    export_inputs = state.data["steps"]["export"]["inputs"]
    assert state.why_not_current("export", export_inputs, _export_files(out / "export")) is None
    graph = out / "export" / "decoder.onnx"
    graph.write_bytes(graph.read_bytes())
    assert state.why_not_current("export", export_inputs, _export_files(out / "export")) == \
        "export/decoder.onnx changed since it was written"


def test_failing_step_stops_with_a_clear_error(tmp_path):
    out = tmp_path / "artifacts"
    (out / "export").mkdir(parents=True)
    (out / "export" / "notes.txt").write_text("a user's file, not an export")
    with pytest.raises(DeployError, match=r"^step export failed: ") as e:
        deploy(_config(out), say=lambda m: None)
    assert "it has no manifest.json, so it is not a cvvae export folder" in str(e.value)
    assert "the later steps did not run" in str(e.value)
    assert _steps(e.value.result) == {"model": "given", "export": "FAILED"}
    assert (out / "export" / "notes.txt").read_text() == "a user's file, not an export"
    assert json.loads((out / "deploy.json").read_text())["ok"] is False


def test_cli_usage_and_failure_exit_codes(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["deploy", "--out", str(tmp_path / "a"), "--precision", "int8"])
    assert r.exit_code == 2 and "'int8' is not one of 'fp32', 'fp16'" in r.output
    r = runner.invoke(main, ["deploy", "--out", str(tmp_path / "a"), "--size", "64"])
    assert r.exit_code == 2 and "expected HxW" in r.output
    r = runner.invoke(main, ["deploy", "--out", str(tmp_path / "a"), "--model", "random:no-such-preset",
                             "--clip", str(_clips()[0])])
    assert r.exit_code == 1
    assert "DeployError: step model failed: " in r.output and "result: FAILED (model)" in r.output
    assert "Traceback" not in r.output
