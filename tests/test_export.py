"""ONNX export (fp32): graphs match PyTorch, manifest holds the contract, bad input fails cleanly, inspect works.

The golden checkpoints (v1 and SD3 tiny) are exported once per module; ONNX Runtime CPU runs the graphs at shapes
other than the export sample (T = 1, 5, 9, 17; two non-square sizes; batch 1 and 2) and must match the raw PyTorch
encoder/decoder within 1e-4 max abs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, golden_dir
from cvvae.cli import main
from cvvae.config import ModelConfig
from cvvae.errors import ExportError
from cvvae.export import contract
from cvvae.export.inspect_onnx import inspect_graph
from cvvae.export.manifest import load_manifest
from cvvae.export.precision import Precision
from cvvae.export.to_onnx import ExportConfig, export_model, simplify
from cvvae.export.verify import (TOLERANCES, Tolerance, VerifyCase, check_tensorrt_ready, compare, ort_session,
                                 run_graph, smooth_video)
from cvvae.loading import create_model, load_model
from cvvae.model import LOGVAR_MAX, LOGVAR_MIN
from cvvae.plan import PlanSettings

TOL = 1e-4
# (batch, frames, height, width): every T of {1, 5, 9, 17} at both non-square sizes, batch 1 and 2
CASES = [VerifyCase(b, t, h, w) for t, sizes in ((1, ((1, 24, 40), (2, 40, 16))), (5, ((2, 24, 40), (1, 40, 16))),
                                                 (9, ((1, 24, 40), (2, 40, 16))), (17, ((2, 24, 40), (1, 40, 16))))
         for b, h, w in sizes]


def _export(tmp_path_factory, name: str, **config) -> tuple:
    ckpt = golden_dir(name) / "checkpoint"
    model = load_model(ckpt)
    out = tmp_path_factory.mktemp(name) / "export"
    manifest = export_model(model, out, ExportConfig(**config))
    return model, manifest


@pytest.fixture(scope="module")
def v1_export(tmp_path_factory):
    return _export(tmp_path_factory, "public-v1-tiny", precisions=(Precision.FP32,))


@pytest.fixture(scope="module")
def sd3_export(tmp_path_factory):
    return _export(tmp_path_factory, "public-sd3-tiny", precisions=(Precision.FP32,))


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.cvvae-tmp-")]


# ----- parity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["v1", "sd3"])
def test_fp32_graphs_match_pytorch(variant, v1_export, sd3_export):
    model, manifest = v1_export if variant == "v1" else sd3_export
    encoder = ort_session(manifest.graph_path("encoder", "fp32"))
    decoder = ort_session(manifest.graph_path("decoder", "fp32"))
    worst = {}
    for k, case in enumerate(CASES):
        x = smooth_video(case, seed=100 + k)
        with torch.no_grad():
            mean, logvar = torch.chunk(model.encoder(x), 2, 1)
            video = model.decoder(mean)
        got = run_graph(encoder, {"video": x.numpy()})
        assert got["mean"].shape == (case.batch, model.config.latent_channels, (case.frames - 1) // 4 + 1,
                                     case.height // 8, case.width // 8)
        decoded = run_graph(decoder, {"latent": mean.numpy()})["video"]
        assert decoded.shape == (case.batch, 3, case.frames, case.height, case.width)
        for name, a, r in (("mean", got["mean"], mean), ("logvar", got["logvar"], logvar), ("video", decoded, video)):
            c = compare(a, r.numpy(), Tolerance(TOL), case=case.name, output=name)
            worst[(case.name, name)] = c.max_abs
            assert c.passed, f"{variant} {case.name} {name}: max abs {c.max_abs:.3g} > {TOL}"
    assert max(worst.values()) < TOL


def test_export_verification_is_recorded(v1_export):
    _, manifest = v1_export
    for component in contract.COMPONENTS:
        verified = manifest.graph_file(component, "fp32").verified
        assert verified["status"] == "passed"
        assert verified["tolerance"]["atol"] == TOLERANCES[Precision.FP32].atol == 1e-4
        cases = {c["case"] for c in verified["comparisons"]}
        assert cases == {"b1_t1_24x40", "b2_t5_32x24", "b1_t17_16x32"}
        assert all(c["max_abs"] <= 1e-4 and c["passed"] for c in verified["comparisons"])
        assert {"max_abs", "mean_abs", "p99_abs"} <= set(verified["comparisons"][0])


# ----- manifest and graph contract ------------------------------------------------------------------------------
def test_manifest_holds_the_contract(v1_export):
    model, manifest = v1_export
    m = load_manifest(manifest.directory)
    assert m.format == "cvvae-export/1" and m.variant == "v1"
    assert m.model_config() == model.config
    assert m.plan_settings() == PlanSettings.from_config(model.config)
    assert m.plan_settings(tile_size=None).tile_size is None
    assert m.precisions("encoder") == ["fp32"]
    assert m.graph_path("encoder", "fp32") == manifest.directory / "encoder.onnx"
    assert m.graph_path("decoder", "fp32").name == "decoder.onnx"
    assert m.logvar_clamp == [-30.0, 20.0] == [LOGVAR_MIN, LOGVAR_MAX]
    assert m.scaling_factor == pytest.approx(0.18215) and m.shift_factor is None
    assert m.compression == {"time": 4, "space": 8, "latent_channels": 4}
    assert m.frame_rules["latent_frames"] == "1 + (T - 1) // time_compress"
    assert m.opset == contract.DEFAULT_OPSET == 19 and m.exporter == "torchscript"
    assert m.checkpoint["sha256"] == model.checkpoint_info.sha256 is not None
    assert set(m.tool_versions) >= {"torch", "onnx", "onnxruntime", "cvvae"}
    enc = m.component("encoder")
    assert enc.input_names == ["video"] and enc.output_names == ["mean", "logvar"]
    assert enc.inputs[0].dims == ["batch", 3, "frames", "height", "width"]
    assert enc.outputs[1].dims == ["batch", 4, "latent_frames", "latent_height", "latent_width"]
    dec = m.component("decoder")
    assert dec.input_names == ["latent"] and dec.output_names == ["video"]
    f = m.graph_file("decoder", "fp32")
    assert f.io_dtypes == {"latent": "float32", "video": "float32"} and not f.external_data
    assert f.op_counts["InstanceNormalization"] == 30
    m.check_files()
    raw = json.loads((manifest.directory / "manifest.json").read_text())
    assert raw["config"]["_class_name"] == "CVVAEModel" and raw["components"]["encoder"]["files"]["fp32"]["sha256"]
    with pytest.raises(ExportError, match="no fp16 encoder; available: fp32"):
        m.graph_path("encoder", "fp16")
    with pytest.raises(ExportError, match="no 'upsampler' graph"):
        m.graph_path("upsampler")


def test_load_manifest_errors(tmp_path, v1_export):
    with pytest.raises(ExportError, match="does not exist"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(ExportError, match="has no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ExportError, match="format 'other/9'"):
        load_manifest(tmp_path)
    data = json.loads((v1_export[1].directory / "manifest.json").read_text())
    del data["components"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match="lacks components"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("component", contract.COMPONENTS)
def test_graphs_are_tensorrt_ready(component, v1_export, sd3_export):
    for _, manifest in (v1_export, sd3_export):
        model = onnx.load(str(manifest.graph_path(component, "fp32")))
        onnx.checker.check_model(model, full_check=True)
        assert check_tensorrt_ready(model) == []
        ops = {n.op_type for n in model.graph.node}
        assert "GroupNormalization" not in ops and "InstanceNormalization" in ops
        assert "Constant" not in ops  # folded into initializers
        spec = contract.COMPONENT_SPECS[component]
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == [a if a else dims[1] for a in spec.inputs[0].axes] and isinstance(dims[1], int)
        pads = [n for n in model.graph.node if n.op_type == "Pad"]
        inits = {i.name for i in model.graph.initializer}
        assert pads and all(n.input[1] in inits for n in pads)  # constant pads after folding


# ----- inspect --------------------------------------------------------------------------------------------------
def test_inspect_cli(v1_export):
    path = v1_export[1].graph_path("encoder", "fp32")
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "video      float32  [batch, 3, frames, height, width]" in r.output
    assert "dynamic: batch, latent_frames, latent_height, latent_width" in r.output
    assert "opset      ai.onnx 19" in r.output and "precision  fp32" in r.output
    n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    assert f"  {'Conv':<24} {n_conv}" in r.output
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    data = json.loads(r.output)
    assert data["inputs"][0]["dims"] == ["batch", 3, "frames", "height", "width"]
    assert data["outputs"][0]["name"] == "mean" and data["op_counts"]["Conv"] == n_conv
    assert data["precision"] == "fp32" and data["opset"] == {"ai.onnx": 19}
    r = CliRunner().invoke(main, ["inspect", str(v1_export[1].directory), "--json"])
    assert [d["path"].rsplit("/", 1)[1] for d in json.loads(r.output)] == ["encoder.onnx", "decoder.onnx"]
    r = CliRunner().invoke(main, ["inspect", str(path.parent / "nope.onnx")])
    assert r.exit_code != 0 and "does not exist" in r.output


# ----- options: external data, force, exporters -----------------------------------------------------------------
def test_external_data_switch(tmp_path, v1_export):
    model = v1_export[0]
    manifest = export_model(model, tmp_path / "ext", ExportConfig(components=("decoder",), external_data_threshold=1000,
                                                                    precisions=(Precision.FP32,)))
    f = manifest.graph_file("decoder", "fp32")
    assert f.external_data and f.data_path == "decoder.onnx.data" and f.verified["status"] == "passed"
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "ext").iterdir()}
    assert sizes["decoder.onnx.data"] > 9e6 > sizes["decoder.onnx"]
    assert inspect_graph(tmp_path / "ext" / "decoder.onnx").external_data
    manifest.check_files()
    assert manifest.precisions("decoder") == ["fp32"] and list(manifest.components) == ["decoder"]


def test_cli_export_force_and_script(tmp_path, golden_v1):
    ckpt = str(golden_v1 / "checkpoint")
    out = tmp_path / "exp"
    args = ["export", "--model", ckpt, "--out", str(out), "--components", "encoder", "--precisions", "fp32"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "encoder  fp32  encoder.onnx" in r.output and "verification passed" in r.output
    assert "b1_t17_16x32" in r.output  # the error table
    first = load_manifest(out).graph_file("encoder", "fp32").sha256
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "already exists" in r.output and "--force" in r.output
    r = CliRunner().invoke(main, args + ["--force", "--no-verify", "--opset", "17"])
    assert r.exit_code == 0, r.output
    m = load_manifest(out)
    assert m.opset == 17 and m.graph_file("encoder", "fp32").verified == {"status": "skipped"}
    assert m.graph_file("encoder", "fp32").sha256 != first
    _no_leftovers(tmp_path, "nothing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    # plain-script entry point
    r = subprocess.run([sys.executable, str(REPO / "export" / "to_onnx.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--components" in r.stdout and "--precisions" in r.stdout


def test_dynamo_exporter(tmp_path):
    """torch.export path (with the any-rank attention translation): same contract, same parity. One resnet per
    level (random weights) instead of the golden model's two: torch.export's time grows with the graph."""
    model = create_model(ModelConfig(variant="v1", widths=(32, 32, 32, 32), layers_per_block=1), seed=0)
    manifest = export_model(model, tmp_path / "dyn", ExportConfig(components=("decoder",), exporter="dynamo",
                                                                  opset=18, precisions=(Precision.FP32,)))
    assert manifest.exporter == "dynamo" and manifest.opset == 18
    f = manifest.graph_file("decoder", "fp32")
    assert f.verified["status"] == "passed" and "GroupNormalization" not in f.op_counts
    g = onnx.load(str(manifest.graph_path("decoder")))
    assert [d.dim_param or d.dim_value for d in g.graph.output[0].type.tensor_type.shape.dim] == \
        ["batch", 3, "frames", "height", "width"]


# ----- bad inputs: clear error, non-zero exit, nothing written --------------------------------------------------
def _bad_config(tmp_path: Path, golden_v1: Path) -> Path:
    folder = tmp_path / "not-cvvae"
    folder.mkdir()
    cfg = json.loads((golden_v1 / "checkpoint" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(
        golden_v1 / "checkpoint" / "diffusion_pytorch_model.safetensors")
    return folder


@pytest.mark.parametrize("case", ["missing", "opset21", "opset13", "exists", "variant", "preset", "component",
                                  "bf16", "dynamo17"])
def test_bad_inputs_fail_cleanly(case, tmp_path, golden_v1):
    ckpt = golden_v1 / "checkpoint"
    out = tmp_path / "out"
    args = ["export", "--model", str(ckpt), "--out", str(out)]
    expect = {
        "missing": "does not exist", "opset21": "opset 21 is not supported", "opset13": "opset 13 is not supported",
        "exists": "already exists", "variant": "is not a CV-VAE", "preset": "does not match",
        "component": "unknown component(s) upsampler", "bf16": "bf16 is not offered",
        "dynamo17": "dynamo exporter emits opset 18 or newer",
    }[case]
    if case == "missing":
        args[2] = str(tmp_path / "no-such-checkpoint")
    elif case == "opset21":
        args += ["--opset", "21"]
    elif case == "opset13":
        args += ["--opset", "13"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "variant":
        args[2] = str(_bad_config(tmp_path, golden_v1))
    elif case == "preset":
        args[2] = str(ckpt / "diffusion_pytorch_model.safetensors")
        args += ["--preset", "tiny-sd3"]
    elif case == "component":
        args += ["--components", "encoder,upsampler"]
    elif case == "bf16":
        args += ["--precisions", "fp32,bf16"]
    elif case == "dynamo17":
        args += ["--exporter", "dynamo", "--opset", "17"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert expect in r.output, r.output
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.cvvae-tmp-")]
    else:
        _no_leftovers(tmp_path, "out")


def test_failed_verification_leaves_nothing(tmp_path, v1_export, monkeypatch):
    """A graph that misses its tolerance fails the export with the error table, and nothing is left behind."""
    from cvvae.export import verify

    monkeypatch.setitem(verify.TOLERANCES, Precision.FP32, Tolerance(atol=1e-12))
    with pytest.raises(ExportError, match=r"verification of decoder\.onnx failed") as e:
        export_model(v1_export[0], tmp_path / "out", ExportConfig(components=("decoder",),
                                                                  precisions=(Precision.FP32,)))
    assert "max_abs" in str(e.value) and "b2_t5_32x24" in str(e.value) and " NO" in str(e.value)
    _no_leftovers(tmp_path, "out")


# ----- small pieces with hand-computed numbers ------------------------------------------------------------------
def test_compare_hand_computed():
    c = compare(np.array([0, 0.1, 0.5, 0.75, 1.0], np.float32), np.full(5, 2.0, np.float32), Tolerance(1.0, 0.5),
                output="x")
    assert c.max_abs == pytest.approx(2.0) and c.mean_abs == pytest.approx(1.53)
    assert c.p99_abs == pytest.approx(1.996) and c.reference_max_abs == 2.0 and c.limit == 2.0
    assert c.passed and bool(c)
    bad = compare(np.array([np.nan, 1.0], np.float32), np.array([1.0, 1.0], np.float32), Tolerance(1.0))
    assert bad.nonfinite == 1 and not bad.passed


def test_simplify_folds_and_merges_on_hand_built_graph():
    """onnxslim (export's graph hygiene): Reshape(x, Where(Equal(ConstantOfShape([2]) * -1, [-1, 6]), ...)) folds
    to a constant shape [1, 6]; two equal Shape nodes merge into one; the dead chain and its initializers go."""
    nodes = [
        helper.make_node("ConstantOfShape", ["two"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        helper.make_node("Mul", ["ones", "minus1"], ["neg"]),
        helper.make_node("Equal", ["target", "neg"], ["eq"]),
        helper.make_node("Where", ["eq", "ones", "target"], ["shape"]),  # [-1, 6] -> [1, 6]
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        helper.make_node("Shape", ["x"], ["s1"]),
        helper.make_node("Shape", ["x"], ["s2"]),
        helper.make_node("Add", ["s1", "s2"], ["s"]),
    ]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array(-1, np.int64), "minus1"),
             numpy_helper.from_array(np.array([-1, 6], np.int64), "target")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("s", TensorProto.INT64, None)], inits)
    m = simplify(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
    assert sorted(n.op_type for n in m.graph.node) == ["Add", "Reshape", "Shape"]
    folded = {i.name: numpy_helper.to_array(i).tolist() for i in m.graph.initializer}
    assert folded == {"shape": [1, 6]}
    add = next(n for n in m.graph.node if n.op_type == "Add")
    assert add.input[0] == add.input[1] == next(n for n in m.graph.node if n.op_type == "Shape").output[0]
    assert [o.name for o in m.graph.output] == ["y", "s"] and m.graph.input[0].name == "x"


def test_simplify_without_onnxslim_says_what_to_install(monkeypatch):
    from cvvae.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "onnxslim", None)  # import fails as if not installed
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(BackendUnavailableError, match=r"ONNX export \(graph simplification\) needs the 'onnxslim' "
                                                      r"package, which is not installed: pip install "
                                                      r'"cvvae-deploy\[torch\]"'):
        simplify(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))


def test_tensorrt_check_flags_problems():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)
    nodes = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["g"], num_groups=2),
             helper.make_node("Pad", ["g", "pads", "", "axes"], ["p"]),
             helper.make_node("Cast", ["p"], ["y"], to=TensorProto.DOUBLE),
             helper.make_node("Identity", ["x"], ["axes_f"])]
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "s"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.zeros(4, np.int64), "pads")]
    g = helper.make_graph(nodes, "g", [x, helper.make_tensor_value_info("axes", TensorProto.INT64, [2])], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    issues = "\n".join(check_tensorrt_ready(m))
    assert "opset 21 is outside 17-20" in issues
    assert "GroupNormalization x1 is not on the TensorRT allow-list" in issues
    assert "axes input 'axes' is not a constant" in issues
    assert "casts to float64" in issues and "float64 tensors" in issues
