"""INT8 calibration end to end on the golden tiny checkpoint and a real clip, plus the pieces with hand-made cases.

The end-to-end path (export -> calibrate (2 chunks + 1 held out, 5x32x32) -> int8 graphs -> runtime round trip with
the export's chunk/tile plan -> accuracy report) runs once per module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import VIDEOS
from cvvae.calibration.data import ChunkSpec, find_clips, sample_chunks
from cvvae.calibration.quantize import Exclusions, check_qdq, module_path
from cvvae.calibration.sensitivity import Score, layer_groups, search
from cvvae.cli import main
from cvvae.errors import InputError
from cvvae.export.manifest import load_manifest
from cvvae.export.to_onnx import ExportConfig, export_model
from cvvae.loading import load_model
from cvvae.metrics import psnr
from cvvae.plan import PlanSettings
from cvvae.runtime import VideoVAE
from cvvae.video_io import read_video


def _clip() -> Path:
    clips = sorted(VIDEOS.glob("*.mp4"))
    if not clips:
        pytest.skip(f"no real clips in {VIDEOS}")
    return clips[0]


@pytest.fixture(scope="module")
def exported(golden_v1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "fp"
    export_model(load_model(golden_v1 / "checkpoint"), out, ExportConfig(verify=False))
    return out


@pytest.fixture(scope="module")
def calibrated(exported) -> tuple[Path, str]:
    out = exported.parent / "int8"
    r = CliRunner().invoke(main, ["calibrate", "--export", str(exported), "--data", str(_clip()), "-o", str(out),
                                  "--num-chunks", "2", "--holdout-chunks", "1", "--chunk-frames", "4",
                                  "--tile-size", "32", "--threads", "1", "--target-psnr-drop", "0.5"])
    assert r.exit_code == 0, r.output
    return out, r.output


# ----- end to end ------------------------------------------------------------------------------------------------
def test_manifest_lists_int8_with_calibration_record(calibrated, exported):
    out, _ = calibrated
    m = load_manifest(out)
    m.check_files()  # every listed file is there with its sha256, the copied fp32/fp16 ones included
    src = load_manifest(exported)
    for c in ("encoder", "decoder"):
        assert m.precisions(c) == ["fp32", "fp16", "int8"]
        assert m.graph_file(c, "fp32").sha256 == src.graph_file(c, "fp32").sha256
        f = m.graph_file(c, "int8")
        assert f.path == f"{c}.int8.onnx" and f.io_dtypes[next(iter(f.io_dtypes))] == "float32"
        rec = f.calibration
        assert rec["method"] == "percentile" and rec["num_chunks"] == 2 and rec["holdout_chunks"] == 1
        assert rec["data"][0]["sha256"] and len(rec["data"][0]["chunks_start_top_left"]) == 2
        assert rec["input_shape"] == ([1, 3, 5, 32, 32] if c == "encoder" else [1, 4, 2, 4, 4])
        assert set(rec["exclusions"]["nodes"].values()) >= {"first convolution", "last convolution"}
        sens = rec["sensitivity"]
        assert sens["target_drop_db"] == 0.5 and sens["final"]["drop_db"] <= 0.5
        assert sens["ranking"] and all(r["decision"] in ("int8", "float") for r in sens["ranking"])
        assert rec["qdq"]["issues"] == [] and rec["qdq"]["quantized_nodes"] > 10
    assert "INT8 nodes" in calibrated[1]


def _walk_qdq(model: onnx.ModelProto) -> tuple[int, int]:
    """Independent check of the scheme: every Q/DQ zero point is int8 0; weight DQs per output channel."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pairs = weights = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        pairs += 1
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
        scale = numpy_helper.to_array(inits[n.input[1]])
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight
            weights += 1
            w = inits[n.input[0]]
            (user,) = consumers[n.output[0]]
            axis = {a.name: a.i for a in n.attribute}["axis"]
            if user.op_type == "Conv":  # (out, in, k...): per output channel = axis 0
                assert axis == 0 and scale.shape == (w.dims[0],), n.name
            else:  # MatMul x @ W with W (in, out): the output channel is axis 1
                assert user.op_type == "MatMul" and axis == 1 and scale.shape == (w.dims[1],), n.name
        else:
            assert scale.size == 1, n.name  # activations per tensor
            if n.op_type == "DequantizeLinear":
                assert {u.op_type for u in consumers[n.output[0]]} <= {"Conv", "MatMul", "Gemm"}, n.name
    return pairs, weights


def test_every_qdq_is_symmetric_and_weights_per_channel(calibrated):
    out, _ = calibrated
    for c in ("encoder", "decoder"):
        model = onnx.load(str(out / f"{c}.int8.onnx"))
        pairs, weights = _walk_qdq(model)
        assert pairs > 40 and weights > 20
        assert {o.domain or "" for o in model.opset_import} == {""}
        assert {p.key: p.value for p in model.metadata_props}["cvvae.precision"] == "int8"
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        assert producers.get(convs[0].input[1]) != "DequantizeLinear"   # first conv stays float
        assert producers.get(convs[-1].input[1]) != "DequantizeLinear"  # last conv stays float


def test_int8_runs_through_the_runtime_with_the_same_plan(calibrated):
    out, _ = calibrated
    frames, _ = read_video(_clip(), max_frames=9, size=(48, 72))
    fp32 = VideoVAE.load(out, backend="onnxruntime", precision="fp32", threads=1)
    int8 = VideoVAE.load(out, backend="onnxruntime", precision="int8", threads=1)
    plan = int8.plan(9, 48, 72)
    assert plan.num_tiles == 2 and plan == fp32.plan(9, 48, 72)  # tile 64 px: two tiles across
    a, b = fp32.encode(torch.from_numpy(frames)), int8.encode(torch.from_numpy(frames))  # torch in, torch out
    assert b.mean.shape == a.mean.shape == (1, 4, 3, 6, 9) and b.metadata["precision"] == "int8"
    ya, yb = fp32.decode(a), int8.decode(b)
    assert yb.shape == ya.shape == (1, 3, 9, 48, 72) and torch.isfinite(yb).all()
    # random weights with perturbed norms: INT8 is far from fp32 on this checkpoint, but clearly correlated
    assert psnr(yb, ya) > 12.0


def test_accuracy_report(calibrated, tmp_path):
    out, _ = calibrated
    report = tmp_path / "report"
    r = CliRunner().invoke(main, ["accuracy", "--export", str(out), "--data", str(_clip()), "-o", str(report),
                                  "--max-frames", "5", "--size", "32x48", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert {p.name for p in report.iterdir()} == {"report.md", "report.json", "per_frame_psnr.png",
                                                 "side_by_side.png", ".cvvae-output.json"}
    data = json.loads((report / "report.json").read_text())
    rows = {(s["precision"], s["component"]): s for s in data["summary"]}
    assert set(rows) == {(p, c) for p in ("fp32", "fp16", "int8") for c in ("encoder", "decoder", "round_trip")}
    assert rows[("fp32", "round_trip")]["psnr_vs_fp32"] is None  # identical: inf
    assert rows[("int8", "round_trip")]["psnr_vs_fp32"] < rows[("fp16", "round_trip")]["psnr_vs_fp32"]
    assert len(data["rows"][1]["per_frame_psnr_vs_input"]) == 5
    assert "| int8 | round_trip |" in (report / "report.md").read_text()
    assert (report / "per_frame_psnr.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_to_write_into_the_source_export(exported):
    r = CliRunner().invoke(main, ["calibrate", "--export", str(exported), "--data", str(_clip()),
                                  "-o", str(exported), "--force"])
    assert r.exit_code != 0 and "new directory" in r.output


# ----- pieces ----------------------------------------------------------------------------------------------------
def test_chunk_spec_follows_the_plan():
    s = PlanSettings(chunk_frames=16, tile_size=64)
    spec = ChunkSpec.from_plan(s)
    assert (spec.frames, spec.height, spec.width) == (17, 64, 64)
    assert spec.latent_shape(4) == (1, 4, 5, 8, 8)  # chunk/4 + 1 latents of tile/8 cells
    assert ChunkSpec.from_plan(s, chunk_frames=4, tile_size=32).latent_shape(16) == (1, 16, 2, 4, 4)
    with pytest.raises(InputError, match="1\\+4k"):
        ChunkSpec(6, 32, 32)
    with pytest.raises(InputError, match="--tile-size"):
        ChunkSpec.from_plan(PlanSettings(chunk_frames=16, tile_size=None))


def test_sampling_is_deterministic_and_in_bounds():
    clip = _clip()
    spec = ChunkSpec(5, 32, 40, frame_stride=2)
    a = sample_chunks([clip], spec, 3, seed=1)
    b = sample_chunks([clip], spec, 3, seed=1)
    assert [c.where() for c in a] == [c.where() for c in b]
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    assert [c.where() for c in sample_chunks([clip], spec, 3, seed=2)] != [c.where() for c in a]
    assert all(c.frames.shape == (5, 32, 40, 3) and c.pixels().shape == (1, 3, 5, 32, 40) for c in a)
    starts = [c.start for c in a]
    assert starts == sorted(starts)  # one chunk per stratum of the clip, in order
    full, _ = read_video(clip, start=a[0].start, stride=2, max_frames=5)
    assert np.array_equal(a[0].frames, full[:, a[0].top:a[0].top + 32, a[0].left:a[0].left + 40])
    with pytest.raises(InputError, match="too small"):
        sample_chunks([clip], ChunkSpec(5, 4000, 32), 1)
    with pytest.raises(InputError, match="does not exist"):
        find_clips([clip.parent / "missing.mp4"])


def _conv(name: str, weight: str, x: str, y: str, cin: int = 2, cout: int = 2) -> tuple:
    w = numpy_helper.from_array(np.full((cout, cin, 1, 1), 0.5, np.float32), weight)
    return helper.make_node("Conv", [x, weight], [y], name=name), w


def _tiny_graph() -> onnx.ModelProto:
    r"""x -> conv_in -> c1 (up.0.block.0) -> c2 (up.0.block.1) -> q,k MatMul -> Softmax -> MatMul(v) -> c3 -> conv_out

    Names as the TorchScript exporter writes them: the ModuleList index is missing from node names but present in
    the weight names.
    """
    nodes, inits = [], []
    for name, weight, x, y in (("/decoder/conv_in/Conv", "decoder.conv_in.weight", "x", "a"),
                               ("/decoder/block.0/conv1/Conv", "decoder.up.0.block.0.conv1.weight", "a", "b"),
                               ("/decoder/block.1/conv1/Conv", "decoder.up.0.block.1.conv1.weight", "b", "c"),
                               ("/decoder/block.0/conv1_1/Conv", "decoder.up.1.block.0.conv1.weight", "c", "d"),
                               ("/decoder/conv_out/Conv", "decoder.conv_out.weight", "s", "y")):
        n, w = _conv(name, weight, x, y)
        nodes.append(n)
        inits.append(w)
    nodes[4:4] = [
        helper.make_node("Reshape", ["d", "shape"], ["d2"], name="/decoder/mid/attn_1/Reshape"),
        helper.make_node("MatMul", ["d2", "d2"], ["logits"], name="/decoder/mid/attn_1/MatMul"),
        helper.make_node("Softmax", ["logits"], ["p"], name="/decoder/mid/attn_1/Softmax"),
        helper.make_node("MatMul", ["p", "d2"], ["o"], name="/decoder/mid/attn_1/MatMul_1"),
        helper.make_node("Reshape", ["o", "shape4"], ["s"], name="/decoder/mid/attn_1/Reshape_1"),
    ]
    inits += [numpy_helper.from_array(np.array([2, 2, 2], np.int64), "shape"),
              numpy_helper.from_array(np.array([1, 2, 2, 2], np.int64), "shape4")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_default_exclusions_and_patterns():
    model = _tiny_graph()
    reasons = Exclusions().select(model)
    assert reasons == {"/decoder/conv_in/Conv": "first convolution", "/decoder/conv_out/Conv": "last convolution",
                       "/decoder/mid/attn_1/MatMul": "attention (Softmax neighbour)",
                       "/decoder/mid/attn_1/MatMul_1": "attention (Softmax neighbour)"}
    # patterns match the module path (with the ModuleList index) or the node name
    picked = Exclusions(patterns=("decoder.up.1.*",), first_last_conv=False, attention_matmuls=False).select(model)
    assert picked == {"/decoder/block.0/conv1_1/Conv": "pattern decoder.up.1.*"}
    assert set(Exclusions(op_types=("MatMul",), first_last_conv=False, attention_matmuls=False).select(model)) == {
        "/decoder/mid/attn_1/MatMul", "/decoder/mid/attn_1/MatMul_1"}
    with pytest.raises(InputError, match="never quantized"):
        Exclusions(op_types=("Softmax",))


def test_layer_groups_use_the_module_prefix():
    model = _tiny_graph()
    weights = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    assert module_path(by_name["/decoder/block.0/conv1_1/Conv"], weights) == "decoder.up.1.block.0.conv1"
    assert module_path(by_name["/decoder/mid/attn_1/MatMul"], weights) == "decoder.mid.attn_1"
    names = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul")]
    assert layer_groups(model, names) == {
        "decoder.conv_in": ["/decoder/conv_in/Conv"],
        "decoder.up.0.block.0": ["/decoder/block.0/conv1/Conv"],
        "decoder.up.0.block.1": ["/decoder/block.1/conv1/Conv"],
        "decoder.up.1.block.0": ["/decoder/block.0/conv1_1/Conv"],
        "decoder.mid.attn_1": ["/decoder/mid/attn_1/MatMul", "/decoder/mid/attn_1/MatMul_1"],
        "decoder.conv_out": ["/decoder/conv_out/Conv"]}


def test_check_qdq_flags_asymmetric_and_per_tensor_weights():
    """   x -> Q(zp 3) -> DQ -> Conv <- DQ(per-tensor) <- W(int8)   """
    w = numpy_helper.from_array(np.ones((4, 2, 1, 1), np.int8), "w_q")
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "zp"),
             numpy_helper.from_array(np.array(0.2, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "ws", "wzp"], ["wd"], name="wdq"),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    summary = check_qdq(helper.make_model(graph))
    assert summary.quantized_nodes == ["conv"]
    assert any(i.startswith("q: zero point must be int8 0") for i in summary.issues)
    assert any(i.startswith("wdq: weight scale must be per output channel (axis 0, 4 values)") for i in summary.issues)


class _FakeQuantizer:
    """Stands in for GraphQuantizer: remembers which nodes the last quantize() call put in INT8."""

    def __init__(self, model, candidates):
        self.model, self.candidates, self.quantized = model, candidates, set()

    def quantize(self, path, *, exclude=(), only=None, final=False):
        self.quantized = set(only if only is not None else self.candidates) - set(exclude)


class _FakeTrip:
    """Round trip whose error against fp32 is the sum of fixed per-node costs (MSE); fp32 vs input MSE is 0.01."""

    fp32_mse = 0.01

    def __init__(self, quantizers, costs):
        self.quantizers, self.costs, self.videos = quantizers, costs, [None]
        self.fp32_psnr = 10 * math.log10(4 / self.fp32_mse)

    def run(self, encoder=None, decoder=None):
        active = [q for c, q in self.quantizers.items() if (encoder if c == "encoder" else decoder) is not None]
        err = sum(self.costs[n] for q in active for n in q.quantized)
        m = self.fp32_mse + err
        p_in = 10 * math.log10(4 / m)
        return Score(m, err, p_in, math.inf if err == 0 else 10 * math.log10(4 / err), self.fp32_psnr - p_in), []


def test_search_excludes_the_worst_groups_until_the_target_is_met(tmp_path):
    model = _tiny_graph()
    candidates = ["/decoder/block.0/conv1/Conv", "/decoder/block.1/conv1/Conv", "/decoder/block.0/conv1_1/Conv"]
    costs = dict(zip(candidates, (0.002, 0.04, 0.01)))
    q = _FakeQuantizer(model, candidates)
    trip = _FakeTrip({"decoder": q}, costs)
    # all INT8: MSE 0.01 + 0.052 -> drop 10*log10(6.2) = 7.92 dB. Excluding the worst (up.0.block.1, 0.04) leaves
    # 0.012 -> 10*log10(2.2) = 3.42 dB; excluding the two worst leaves 0.002 -> 10*log10(1.2) = 0.79 dB.
    result = search({"decoder": q}, trip, tmp_path, target_drop_db=1.0)
    assert [c.group for c in result.ranking] == ["decoder.up.0.block.1", "decoder.up.1.block.0", "decoder.up.0.block.0"]
    assert result.all_int8.drop_db == pytest.approx(10 * math.log10(6.2))
    assert result.excluded_groups == ["decoder:decoder.up.0.block.1", "decoder:decoder.up.1.block.0"]
    assert result.final.drop_db == pytest.approx(10 * math.log10(1.2))
    assert set(result.excluded_nodes("decoder")) == {"/decoder/block.1/conv1/Conv", "/decoder/block.0/conv1_1/Conv"}
    assert [s.excluded for s in result.steps] == [0, 2, 1]  # predicted k=2 met the target; k=1 checked and missed
    # a loose target excludes nothing; an impossible one excludes every group
    assert search({"decoder": q}, trip, tmp_path, target_drop_db=8.0).excluded_groups == []
    assert len(search({"decoder": q}, trip, tmp_path, target_drop_db=0.0).excluded_groups) == 3


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibration_methods_on_a_heavy_tailed_input(tmp_path, method):
    """x (mostly N(0,1), 8 values at +-40) -> Conv 1x1 -> y: MinMax keeps the outliers; Percentile (99.9) and
    Entropy (2048 bins, as TensorRT; quantize_static's own 128-bin default would equal MinMax) clip them."""
    from onnxruntime.quantization import load_tensors_data

    from cvvae.calibration.quantize import GraphQuantizer, QuantizeConfig

    n, w = _conv("/conv/Conv", "conv.weight", "x", "y")
    graph = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 64, 64])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 64, 64)).astype(np.float32)
    x.flat[rng.choice(x.size, 8, replace=False)] = np.array([40, -40] * 4, np.float32)
    q = GraphQuantizer("encoder", tmp_path / "m.onnx", tmp_path / "work",
                       QuantizeConfig(method=method, percentile=99.9,
                                      exclusions=Exclusions(first_last_conv=False)))
    q.calibrate([{"x": x}])
    lo, hi = (float(np.max(np.abs(v))) for v in load_tensors_data(q.cache).data["x"].range_value)
    threshold = max(abs(lo), abs(hi))
    if method == "minmax":
        assert threshold == 40.0
    else:
        assert 2.0 < threshold < 10.0, threshold
    model = q.quantize(tmp_path / "q.onnx")
    scale = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "x_scale")
    assert float(scale) == pytest.approx(threshold / 127, rel=1e-5)  # symmetric int8: scale = |range| / 127
    assert check_qdq(model).issues == []


def test_check_qdq_accepts_float_weights_behind_q_dq():
    """   W(float) -> Q -> DQ (per channel, axis 0) -> Conv <- DQ <- Q <- x   (the form modelopt may write)   """
    inits = [numpy_helper.from_array(np.ones((4, 2, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wzp"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["w", "ws", "wzp"], ["wq"], name="wq", axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], name="wdq", axis=0),
             helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    summary = check_qdq(helper.make_model(graph))
    assert summary.issues == [] and summary.quantized_nodes == ["conv"] and summary.weight_dequantize == 1


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_near_uniform_softmax_feeding_an_excluded_matmul_calibrates(tmp_path, method):
    """A temporal attention near its identity init attends ~uniformly: its Softmax gives 1/3 +- 1e-7 everywhere,
    which numpy cannot split into 2048 bins. Only the inputs of nodes that may be quantized are calibrated, so the
    excluded attention MatMul's input is never histogrammed (this failed on the trained default model)."""
    from onnxruntime.quantization import load_tensors_data

    from cvvae.calibration.quantize import GraphQuantizer, QuantizeConfig

    conv, w = _conv("/conv/Conv", "conv.weight", "x", "y")
    nodes = [conv, helper.make_node("Softmax", ["x"], ["p"], name="/attn/Softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="/attn/MatMul")]  # attention . values
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 64, 3]),
                                           helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 64, 3]),
                               helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 2, 64, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 2, 64, 3)).astype(np.float32) * 1e-6
    q = GraphQuantizer("decoder", tmp_path / "m.onnx", tmp_path / "work",
                       QuantizeConfig(method=method, exclusions=Exclusions(first_last_conv=False)))
    assert q.candidates == ["/conv/Conv"] and q.candidate_inputs() == {"x"}
    v = np.ones((1, 2, 3, 4), np.float32)
    q.calibrate([{"x": x, "v": v}, {"x": x * 2, "v": v}])
    assert set(load_tensors_data(q.cache).data) == {"x"}  # the Softmax output "p" is not calibrated
    model = q.quantize(tmp_path / "q.onnx")
    assert check_qdq(model).issues == []
    quantized = {n.name for n in model.graph.node if any(i.endswith("_DequantizeLinear_Output") for i in n.input)}
    assert "/conv/Conv" in quantized and "/attn/MatMul" not in quantized
