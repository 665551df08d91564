"""Verification of exported graphs: ONNX Runtime (CPU) against the PyTorch reference, and static TensorRT checks.

Comparisons are data (:mod:`cvvae.compare`): one :class:`~cvvae.compare.Comparison` per (case, output) with
max/mean/p99 absolute error, like Polygraphy's ``OutputCompareResult``; a :class:`VerificationReport` collects them per
graph file and goes into the manifest. The reference is the raw PyTorch encoder/decoder in fp32 (no chunking or
tiling), run on small synthetic clips at shapes other than the export sample: T = 1, 5, 17 frames, non-square sizes,
batch 1 and 2. The tolerances (:data:`TOLERANCES`, :data:`FP16_END_TO_END`) are :data:`cvvae.compare.EXPORT`; their
values and reasons are written down there.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from cvvae import compare as comparisons
from cvvae.compare import FP16_END_TO_END, Tolerance, compare
from cvvae.compare import Comparison as OutputComparison
from cvvae.export import contract
from cvvae.export.precision import Precision
from cvvae.model import CVVAE
from cvvae.onnxrt import ORT_DTYPES, ort_session

log = logging.getLogger(__name__)


# ----- tolerances and results -----------------------------------------------------------------------------------
TOLERANCES: dict[Precision, Tolerance] = {Precision(p): t for p, t in comparisons.EXPORT.items()}


@dataclass
class VerificationReport:
    """All comparisons of one graph file."""

    component: str
    precision: str
    file: str
    tolerance: Tolerance
    comparisons: list[OutputComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def worst(self) -> dict[str, float]:
        """Largest errors per output over all cases."""
        out: dict[str, float] = {}
        for c in self.comparisons:
            out[c.output] = max(out.get(c.output, 0.0), c.max_abs)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "passed" if self.passed else "failed",
            "reference": "pytorch-fp32",
            "runtime": "onnxruntime-cpu",
            "tolerance": asdict(self.tolerance),
            "max_abs_by_output": self.worst(),
            "comparisons": [c.as_dict() for c in self.comparisons],
        }


def format_table(rows: Sequence[OutputComparison]) -> str:
    """The verification table (the CLI prints it; export errors carry it)."""
    return comparisons.format_table(rows, "verify")


# ----- inputs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyCase:
    """A pixel-space shape; the decoder's case is the latent of that clip."""

    batch: int
    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"b{self.batch}_t{self.frames}_{self.height}x{self.width}"


# T = 1, 5, 17 (latents 1, 2, 5); non-square; batch 2 in one case. Tiny sizes keep a full-size check cheap.
DEFAULT_CASES = (VerifyCase(1, 1, 24, 40), VerifyCase(2, 5, 32, 24), VerifyCase(1, 17, 16, 32))
CALIBRATION_CASE = VerifyCase(1, 9, 24, 32)


def smooth_video(case: VerifyCase, *, seed: int) -> torch.Tensor:
    """A deterministic clip in [-1, 1] with natural-image-like statistics: smooth colour fields plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(case.batch, 3, max(2, case.frames // 4 + 1), case.height // 8 + 2, case.width // 8 + 2,
                         generator=g)
    x = F.interpolate(coarse, size=(case.frames, case.height, case.width), mode="trilinear", align_corners=True)
    x = 0.6 * torch.tanh(x) + 0.05 * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


@dataclass
class ReferenceCase:
    name: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@torch.no_grad()
def _component_io(model: CVVAE, components: Sequence[str], clip: torch.Tensor) -> dict[str, tuple[dict, dict]]:
    """(inputs, outputs) per component for one clip; the decoder decodes the clip's latent mean."""
    mean, logvar = torch.chunk(model.encoder(clip), 2, 1)
    io: dict[str, tuple[dict, dict]] = {}
    if contract.ENCODER in components:
        outputs = dict(zip(contract.ENCODER_OUTPUTS, (mean.numpy(), logvar.numpy())))
        io[contract.ENCODER] = ({contract.ENCODER_INPUT: clip.numpy()}, outputs)
    if contract.DECODER in components:
        io[contract.DECODER] = ({contract.DECODER_INPUT: mean.numpy()},
                                {contract.DECODER_OUTPUT: model.decoder(mean).numpy()})
    return io


def reference_cases(model: CVVAE, components: Sequence[str] = contract.COMPONENTS,
                    cases: Sequence[VerifyCase] = DEFAULT_CASES, *, seed: int = 0) -> dict[str, list[ReferenceCase]]:
    """Inputs and PyTorch outputs (``model`` in fp32) per component and case; the decoder's input is the clip's
    latent mean, so it sees realistic latents."""
    model.eval()
    out: dict[str, list[ReferenceCase]] = {c: [] for c in components}
    for k, case in enumerate(cases):
        for component, (inputs, outputs) in _component_io(model, components, smooth_video(case, seed=seed + k)).items():
            out[component].append(ReferenceCase(case.name, inputs, outputs))
    return out


def calibration_feeds(model: CVVAE, components: Sequence[str] = contract.COMPONENTS, *,
                      seed: int = 1234) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs per component for measuring value ranges (fp16 rule): a clip unlike the verification clips."""
    io = _component_io(model.eval(), components, smooth_video(CALIBRATION_CASE, seed=seed))
    return {c: [inputs] for c, (inputs, _) in io.items()}


# ----- running graphs -------------------------------------------------------------------------------------------
def run_graph(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with inputs cast to the graph's input dtypes; outputs come back as float32."""
    cast = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
    results = session.run(None, {k: np.ascontiguousarray(v, dtype=cast[k]) for k, v in feeds.items()})
    return {o.name: r.astype(np.float32) for o, r in zip(session.get_outputs(), results)}


def verify_graph(path: str | Path, component: str, precision: Precision | str, cases: Sequence[ReferenceCase],
                 tolerance: Tolerance | None = None) -> VerificationReport:
    """Run the graph on every case in ONNX Runtime CPU and compare each output with the PyTorch reference."""
    precision = Precision(precision)
    tolerance = tolerance or TOLERANCES[precision]
    session = ort_session(path, threads=2)
    report = VerificationReport(component, precision.value, Path(path).name, tolerance)
    for case in cases:
        got = run_graph(session, case.inputs)
        for name, ref in case.outputs.items():
            report.comparisons.append(compare(got[name], ref, tolerance, component=component,
                                              precision=precision.value, case=case.name, output=name))
    return report


# ----- static TensorRT readiness ----------------------------------------------------------------------------------
# ONNX operators the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md), minus GroupNormalization
# (version 21 fails in TensorRT 10.7 and ONNX Runtime's CUDA provider; the exporters lower GroupNorm to
# InstanceNormalization instead).
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Erf
Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater
GreaterOrEqual HardSigmoid HardSwish Identity InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mish Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu
QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements ScatterND Selu Shape Shrink Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())

_DOUBLE = onnx.TensorProto.DOUBLE


def check_tensorrt_ready(model: onnx.ModelProto) -> list[str]:
    """Problems that would stop or slow a TensorRT build; an empty list means ready.

    Checks: default-domain opset in 17-20; only operators from :data:`TENSORRT_OPS` (so no GroupNormalization of
    any version, no contrib ops); Pad's optional ``axes`` input, when present, is a constant; no float64 anywhere;
    every Cast target is a dtype TensorRT has.
    """
    issues: list[str] = []
    opsets = {o.domain or "": o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is None or not contract.OPSET_MIN <= opset <= contract.OPSET_MAX:
        issues.append(f"default-domain opset {opset} is outside {contract.OPSET_MIN}-{contract.OPSET_MAX}")
    constants = {i.name for i in model.graph.initializer}
    constants.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    bad_ops: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
            bad_ops[key] = bad_ops.get(key, 0) + 1
        if node.op_type == "Pad" and len(node.input) > 3 and node.input[3] and node.input[3] not in constants:
            issues.append(f"Pad {node.name}: axes input {node.input[3]!r} is not a constant")
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to == _DOUBLE:
                issues.append(f"Cast {node.name} casts to float64")
    for op, count in sorted(bad_ops.items()):
        hint = " (export at opset <= 20 with InstanceNormalization)" if op == "GroupNormalization" else ""
        issues.append(f"operator {op} x{count} is not on the TensorRT allow-list{hint}")
    doubles = [i.name for i in model.graph.initializer if i.data_type == _DOUBLE]
    doubles += [v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)
                if v.type.tensor_type.elem_type == _DOUBLE]
    if doubles:
        issues.append(f"{len(doubles)} float64 tensors (e.g. {doubles[0]}); TensorRT has no float64")
    return issues


def nonfinite_count(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum((~np.isfinite(a)).sum() for a in arrays.values()))


__all__ = ["Tolerance", "TOLERANCES", "FP16_END_TO_END", "OutputComparison", "VerificationReport", "VerifyCase",
           "DEFAULT_CASES",
           "compare", "format_table", "smooth_video", "reference_cases", "calibration_feeds", "verify_graph",
           "run_graph", "ort_session", "check_tensorrt_ready", "TENSORRT_OPS"]
