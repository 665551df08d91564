"""The one comparison/tolerance module (cvvae.compare), the metrics it uses, and the ONNX Runtime session factory."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cvvae.compare import (EXPORT, FP16_END_TO_END, PARITY, Comparison, Tolerance, compare, format_table,
                           parity_tolerance)
from cvvae.metrics import psnr
from cvvae.onnxrt import ort_session


def test_tolerance_values_are_the_documented_ones():
    assert EXPORT["fp32"] == Tolerance(atol=1e-4)
    assert EXPORT["fp16"] == Tolerance(atol=1e-2, rtol=1e-2, mean_atol=2e-3, mean_rtol=1e-3)
    assert FP16_END_TO_END == Tolerance(atol=3e-2, rtol=2e-2, mean_atol=5e-3, mean_rtol=2e-3)
    # docs/engines.md: parity fp32 1e-3; fp16 2e-2 per component, 5e-2 round trip; int8 by PSNR (30 / 20 dB)
    assert [parity_tolerance(p, o).describe() for p in ("fp32", "fp16", "int8")
            for o in ("encoder.mean", "round_trip.video")] == ["1e-03", "1e-03", "2e-02", "5e-02", ">=30dB", ">=20dB"]
    assert len(PARITY) == 6
    with pytest.raises(ValueError, match="no parity tolerance for precision 'bf16'; known: fp16, fp32, int8"):
        parity_tolerance("bf16", "decoder.video")


def test_compare_statistics_limits_and_torch_inputs():
    ref = np.full(5, 2.0, np.float32)
    got = np.array([0, 0.1, 0.5, 0.75, 1.0], np.float32)
    c = compare(got, ref, Tolerance(1.0, 0.5, mean_atol=1.0), output="y")
    err = np.abs(got - ref)
    assert c.max_abs == pytest.approx(2.0) and c.mean_abs == pytest.approx(err.mean())
    assert c.limit == pytest.approx(2.0) and c.mean_limit == pytest.approx(1.0)
    assert c.psnr == pytest.approx(psnr(got, ref)) == pytest.approx(10 * math.log10(4 / np.mean(err ** 2)))
    assert c.passed is False and c.failure() == "mean abs 1.53 > 1"
    t = compare(torch.from_numpy(got), torch.from_numpy(ref), Tolerance(1.0, 0.5, mean_atol=1.0), output="y")
    assert t == c
    bad = compare(np.array([np.nan, 1.0], np.float32), np.array([1.0, 1.0], np.float32), Tolerance(10.0))
    assert bad.nonfinite == 1 and not bad and bad.failure() == "1 non-finite"
    same = compare(ref, ref, Tolerance(min_psnr=30.0))
    assert same.psnr == math.inf and same.passed and same.as_dict()["psnr"] is None
    assert Comparison.from_dict(same.as_dict()) == same
    with pytest.raises(ValueError, match=r"encoder y: shape \(3,\) differs from the reference \(5,\)"):
        compare(got[:3], ref, component="encoder", output="y")


def test_psnr_floor_judges_int8():
    ref = np.linspace(-1, 1, 1000)
    noisy = ref + 0.02  # MSE 4e-4 -> 40 dB
    assert compare(noisy, ref, parity_tolerance("int8", "encoder.mean")).passed
    assert not compare(ref + 0.1, ref, parity_tolerance("int8", "encoder.mean")).passed  # 26 dB < 30 dB


def test_tables_keep_their_layouts():
    c = compare(np.ones(4), np.zeros(4), Tolerance(atol=1e-3), output="video", component="decoder",
                precision="fp32", case="b1_t1_24x40", backend="onnxruntime")
    verify = format_table([c], "verify").splitlines()
    # the headers the export, parity and build.sh printed before they shared this module
    assert verify[0] == ("component prec  case                   output    max_abs  mean_abs   p99_abs  |ref|max     "
                         "limit  ok")
    assert verify[2].endswith("1.00e-03  NO")
    parity = format_table([c], "parity").splitlines()
    assert parity[0] == "output                          max abs   mean abs    p99 abs  PSNR dB  status"
    assert parity[2].startswith("onnxruntime/video") and parity[2].endswith("FAIL (max abs 1 > 0.001)")
    deploy = format_table([c], "deploy").splitlines()
    assert deploy[0] == ("backend      prec  output                max abs   mean abs  PSNR dB tolerance  status")


def test_no_torch_at_import():
    code = ("import sys; sys.modules['torch'] = None; import cvvae.compare, cvvae.metrics, cvvae.onnxrt, numpy as np; "
            "print(cvvae.compare.compare(np.zeros(3), np.ones(3)).max_abs)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1.0"


def _identity_graph() -> bytes:
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", io[:1], io[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_session_factory_from_bytes_and_path(tmp_path):
    import onnxruntime as ort

    data = _identity_graph()
    (tmp_path / "g.onnx").write_bytes(data)
    for source in (data, tmp_path / "g.onnx", str(tmp_path / "g.onnx")):
        s = ort_session(source, threads=1, arena=False, optimization="disable")
        assert s.run(None, {"x": np.array([-1, 2], np.float32)})[0].tolist() == [0, 2]
        opts = s.get_session_options()
        assert opts.intra_op_num_threads == 1 and opts.enable_cpu_mem_arena is False
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert s.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="optimization must be one of disable, basic, extended, all, got 'max'"):
        ort_session(data, optimization="max")
