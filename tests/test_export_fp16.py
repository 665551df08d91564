"""fp16 graphs: the fp32-island rule, an error table against fp32 with stated tolerances, finite on real clips.

Stated tolerances, per graph (``cvvae.export.verify.TOLERANCES[fp16]``): max abs <= 1e-2 + 1e-2 * max|fp32 output|
and mean abs <= 2e-3 + 1e-3 * mean|fp32 output| per output; end to end, fp16 encoder into fp16 decoder
(``FP16_END_TO_END``): max abs <= 3e-2 + 2e-2 * max|fp32 output| and mean abs <= 5e-3 + 2e-3 * mean|fp32 output|.
Both on synthetic clips and on real video frames.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import VIDEOS, golden_dir
from cvvae.errors import ExportError
from cvvae.export.precision import (ALWAYS_FP32_OPS, FP16_MAX, Fp16Rule, Precision, convert_precision,
                                    parse_precisions, select_with_ranges, tensor_types)
from cvvae.export.to_onnx import ExportConfig, export_model
from cvvae.export.verify import (FP16_END_TO_END, TOLERANCES, VerifyCase, check_tensorrt_ready, compare,
                                 format_table, ort_session, run_graph, smooth_video)
from cvvae.loading import load_model

FP16 = TOLERANCES[Precision.FP16]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = load_model(golden_dir("public-v1-tiny") / "checkpoint")
    out = tmp_path_factory.mktemp("fp16") / "export"
    return model, export_model(model, out, ExportConfig(precisions=(Precision.FP32, Precision.FP16)))


@pytest.fixture(scope="module")
def sessions(exported):
    _, m = exported
    return {(c, p): ort_session(m.graph_path(c, p)) for c in ("encoder", "decoder") for p in ("fp32", "fp16")}


def test_stated_tolerances():
    assert (FP16.atol, FP16.rtol, FP16.mean_atol, FP16.mean_rtol) == (1e-2, 1e-2, 2e-3, 1e-3)
    assert (FP16_END_TO_END.atol, FP16_END_TO_END.rtol, FP16_END_TO_END.mean_atol, FP16_END_TO_END.mean_rtol) == \
        (3e-2, 2e-2, 5e-3, 2e-3)
    # the mean limit grows with the output's magnitude: 2e-3 near 0, 2e-3 + 1e-3 * 15 for a logvar around 15
    assert FP16.mean_limit(0.0) == 2e-3 and FP16.mean_limit(15.0) == pytest.approx(0.017)
    c = compare(np.full(4, 15.01, np.float32), np.full(4, 15.0, np.float32), FP16)
    assert c.mean_limit == pytest.approx(0.017) and c.passed and c.mean_abs == pytest.approx(0.01, rel=1e-3)
    assert TOLERANCES[Precision.FP32].atol == 1e-4


def test_fp16_graph_structure(exported):
    _, m = exported
    for component in ("encoder", "decoder"):
        f = m.graph_file(component, "fp16")
        assert f.path == f"{component}.fp16.onnx" and f.precision == "fp16"
        assert set(f.io_dtypes.values()) == {"float16"}
        assert f.verified["status"] == "passed" and f.verified["tolerance"]["rtol"] == FP16.rtol
        rule = f.fp16_rule
        assert rule["rule"]["io_dtype"] == "float16" and rule["rule"]["max_abs"] == 4096.0
        assert rule["fp32_by_op"]["InstanceNormalization"] == f.op_counts["InstanceNormalization"]
        assert rule["fp32_by_op"]["Softmax"] == rule["fp32_by_reason"]["attention"] == f.op_counts["Softmax"]
        g = onnx.load(str(m.graph_path(component, "fp16")))
        assert check_tensorrt_ready(g) == []
        types = tensor_types(g)
        inits = {i.name: i for i in g.graph.initializer}
        for node in g.graph.node:
            if node.op_type in ALWAYS_FP32_OPS:  # statistics in fp32
                assert types[node.input[0]] == TensorProto.FLOAT, node.name
            if node.op_type == "Conv":  # weights and activations in fp16
                assert types[node.input[0]] == TensorProto.FLOAT16
                assert inits[node.input[1]].data_type == TensorProto.FLOAT16
        assert m.graph_file(component, "fp16").size_bytes < 0.6 * m.graph_file(component, "fp32").size_bytes


def _clips():
    yield from ((case.name, smooth_video(case, seed=7 + k)) for k, case in enumerate(
        [VerifyCase(1, 1, 24, 40), VerifyCase(2, 5, 40, 16), VerifyCase(1, 9, 24, 40), VerifyCase(1, 17, 40, 16)]))
    from cvvae.video_io import frames_to_tensor, read_video

    for path in sorted(VIDEOS.glob("*.mp4"))[:2]:
        frames, _ = read_video(path, max_frames=9, size=(64, 96))
        yield f"real:{path.name[:12]}", torch.from_numpy(frames_to_tensor(frames))[None]


def test_fp16_error_table_vs_fp32(exported, sessions):
    """fp16 graphs against fp32 graphs (= PyTorch to 1e-4): record the table, hold the stated tolerances."""
    model, _ = exported
    comparisons = []
    real = 0
    for name, clip in _clips():
        real += name.startswith("real:")
        x = clip.numpy()
        enc32 = run_graph(sessions["encoder", "fp32"], {"video": x})
        enc16 = run_graph(sessions["encoder", "fp16"], {"video": x})
        dec32 = run_graph(sessions["decoder", "fp32"], {"latent": enc32["mean"]})["video"]
        dec16 = run_graph(sessions["decoder", "fp16"], {"latent": enc32["mean"]})["video"]
        # end to end in fp16 (encoder fp16 -> decoder fp16), as a TensorRT fp16 pipeline would run
        e2e16 = run_graph(sessions["decoder", "fp16"], {"latent": enc16["mean"]})["video"]
        for out, a, r in (("mean", enc16["mean"], enc32["mean"]), ("logvar", enc16["logvar"], enc32["logvar"]),
                          ("video", dec16, dec32), ("e2e", e2e16, dec32)):
            assert np.isfinite(a).all(), f"{name} {out}: non-finite values in fp16"
            tol = FP16_END_TO_END if out == "e2e" else FP16
            comparisons.append(compare(a, r, tol, component="fp16/fp32", precision="fp16", case=name, output=out))
    assert real == 2, "both real clips of shared/data/videos must be part of the table"
    table = format_table(comparisons)
    print("\n" + table)
    failed = [c for c in comparisons if not c.passed]
    assert not failed, "fp16 outside the stated tolerance:\n" + table


def test_fp16_rule_on_hand_made_ranges(exported, tmp_path):
    """A tensor measured at 1e4 (>= max_abs) keeps its producer and readers in fp32; the graph still runs."""
    _, m = exported
    base = onnx.load(str(m.graph_path("decoder", "fp32")))
    conv = next(n for n in base.graph.node if n.name == "/decoder/upsample/conv_1/Conv")
    readers = [n.name for n in base.graph.node if conv.output[0] in n.input]
    sel = select_with_ranges(base, {conv.output[0]: 1.0e4}, Fp16Rule())
    assert sel.fp32_nodes[conv.name].startswith("range: |") and all(
        sel.fp32_nodes[r].startswith("range") for r in readers)
    assert sel.reasons()["op"] == sum(n.op_type in ALWAYS_FP32_OPS for n in base.graph.node)
    low = convert_precision(base, Precision.FP16, sel.fp32_nodes, io_low=False)
    onnx.checker.check_model(low, full_check=True)
    types = tensor_types(low)
    assert types[conv.output[0]] == TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in (*low.graph.input, *low.graph.output)] == [TensorProto.FLOAT] * 2
    path = tmp_path / "dec.onnx"
    onnx.save(low, str(path))
    z = np.random.default_rng(0).standard_normal((1, 4, 2, 3, 2)).astype(np.float32)
    got = run_graph(ort_session(path), {"latent": z})["video"]
    ref = run_graph(ort_session(m.graph_path("decoder", "fp32")), {"latent": z})["video"]
    assert compare(got, ref, FP16).passed


def test_convert_keeps_typed_inputs_on_hand_built_graph(tmp_path):
    """Resize scales stay float32, Pad's value and Conv weights follow fp16, InstanceNorm runs in fp32."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array(0.0, np.float32), "padval"),
             numpy_helper.from_array(np.ones(4, np.float32), "s"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest", name="resize"),
             helper.make_node("Pad", ["r", "pads", "padval"], ["p"], name="pad"),
             helper.make_node("Conv", ["p", "w"], ["c"], name="conv"),
             helper.make_node("InstanceNormalization", ["c", "s", "b"], ["n"], name="norm"),
             helper.make_node("Sigmoid", ["n"], ["y"], name="act")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    fp32 = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
    sel = select_with_ranges(fp32, {}, Fp16Rule())
    assert sel.fp32_nodes == {"norm": "op: InstanceNormalization computes statistics or exponentials"}
    low = convert_precision(fp32, Precision.FP16, sel.fp32_nodes)
    onnx.checker.check_model(low, full_check=True)
    init_types = {i.name: i.data_type for i in low.graph.initializer}
    assert init_types["scales"] == TensorProto.FLOAT and init_types["w__fp16"] == TensorProto.FLOAT16
    assert init_types["padval__fp16"] == TensorProto.FLOAT16 and init_types["s"] == TensorProto.FLOAT
    assert [n.op_type for n in low.graph.node] == ["Resize", "Pad", "Conv", "Cast", "InstanceNormalization", "Cast",
                                                   "Sigmoid"]
    x = rng.uniform(-1, 1, (1, 2, 3, 5)).astype(np.float32)
    paths = {}
    for name, model in (("fp32", fp32), ("fp16", low)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
    got = run_graph(ort_session(paths["fp16"]), {"x": x})["y"]
    ref = run_graph(ort_session(paths["fp32"]), {"x": x})["y"]
    assert got.shape == (1, 4, 6, 10) and np.abs(got - ref).max() < 5e-3


def test_fp32_io_variant(exported, tmp_path):
    _, m = exported
    base = onnx.load(str(m.graph_path("encoder", "fp32")))
    low = convert_precision(base, Precision.FP16, select_with_ranges(base, {}, Fp16Rule()).fp32_nodes, io_low=False)
    assert {v.type.tensor_type.elem_type for v in (*low.graph.input, *low.graph.output)} == {TensorProto.FLOAT}
    onnx.save(low, str(tmp_path / "e.onnx"))
    x = smooth_video(VerifyCase(1, 5, 16, 24), seed=3).numpy()
    got = run_graph(ort_session(tmp_path / "e.onnx"), {"video": x})
    ref = run_graph(ort_session(m.graph_path("encoder", "fp32")), {"video": x})
    assert all(compare(got[k], ref[k], FP16).passed for k in ("mean", "logvar"))


def test_precision_parsing():
    assert parse_precisions("fp32, FP16,half") == (Precision.FP32, Precision.FP16)
    with pytest.raises(ExportError, match="opset 22"):
        parse_precisions("fp32,bf16")
    with pytest.raises(ExportError, match="calibration"):
        parse_precisions("int8")
    with pytest.raises(ExportError, match="choose from fp32, fp16"):
        parse_precisions("fp8")
    assert ExportConfig(precisions=(Precision.FP16,)).precisions == (Precision.FP32, Precision.FP16)
    assert Fp16Rule().max_abs == 4096.0 and 15.9 < FP16_MAX / Fp16Rule().max_abs < 16  # 16x headroom


def test_shipped_default_model_exports_fp16_within_tolerance(tmp_path):
    """The built-in model's posterior logvar reaches |17-20|; its fp16 encoder must still pass verification."""
    model = load_model()
    m = export_model(model, tmp_path / "default", ExportConfig(precisions=(Precision.FP32, Precision.FP16)))
    for component in ("encoder", "decoder"):
        verified = m.graph_file(component, "fp16").verified
        assert verified["status"] == "passed"
    logvar = [c for c in m.graph_file("encoder", "fp16").verified["comparisons"] if c["output"] == "logvar"]
    assert logvar and max(c["reference_max_abs"] for c in logvar) > 10  # the case the relative mean limit is for
    assert all(c["mean_limit"] > 2e-3 + 1e-3 * 5 for c in logvar)
