"""INT8 graphs with explicit Q/DQ, the form TensorRT's strongly typed networks build INT8 engines from.

The scheme (the same for every graph; checked by :func:`check_qdq` on every output):

* symmetric int8, zero point 0, for activations and weights;
* weights per output channel (Conv: axis 0 of (O, I, k...); MatMul: axis 1 of (K, N); Gemm: axis 0 with transB),
  activations per tensor;
* Q/DQ only on the *inputs* of Conv, MatMul and Gemm, where TensorRT fuses them into INT8 kernels; the outputs of
  those ops and every other op (InstanceNormalization, Softmax, SiLU, Resize, Pad, ...) stay float; biases stay
  float (TensorRT has no INT32 DequantizeLinear);
* exclusions (:class:`Exclusions`) by node-name pattern and op type; by default the first and last convolutions
  and the two attention MatMuls around each Softmax stay float (normalizations and Softmax are never quantized).

Implementation: ``onnxruntime.quantization`` (``quant_pre_process`` then ``quantize_static`` with
``QuantFormat.QDQ``, ``per_channel=True``, ``ActivationSymmetric``/``WeightSymmetric``, MinMax/Percentile/Entropy
calibration). One calibration per graph is cached (``calibration_cache_path``), so the sensitivity search
re-quantizes with other exclusions in a fraction of a second. When ``nvidia-modelopt`` is installed (and
``quantizer="auto"`` or ``"modelopt"``), the final graph is made by ``modelopt.onnx.quantization.quantize`` with the
same exclusions instead; the search itself always uses ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from cvvae.errors import BackendUnavailableError, ExportError, InputError

log = logging.getLogger(__name__)

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
QUANTIZERS = ("auto", "onnxruntime", "modelopt")
HISTOGRAM_BINS = 2048  # percentile and entropy histograms: TensorRT's entropy calibrator uses 2048 bins too


class CalibrationMethod(str, Enum):
    """How activation ranges are computed from the calibration chunks."""

    MINMAX = "minmax"          # the largest |value| seen
    PERCENTILE = "percentile"  # the given percentile of |value| (ignores rare outliers)
    ENTROPY = "entropy"        # the threshold minimising the KL divergence of the histogram (TensorRT's classic)

    def to_ort(self) -> Any:
        from onnxruntime.quantization import CalibrationMethod as Ort

        return {CalibrationMethod.MINMAX: Ort.MinMax, CalibrationMethod.PERCENTILE: Ort.Percentile,
                CalibrationMethod.ENTROPY: Ort.Entropy}[self]

    @classmethod
    def parse(cls, value: "str | CalibrationMethod") -> "CalibrationMethod":
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            raise InputError(f"unknown calibration method {value!r}; choose one of "
                             f"{', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class Exclusions:
    """Nodes that stay float. Patterns are shell globs matched against the node name (``/decoder/up.1/...``-style
    names as exported) and against its module path (``decoder.up.1.block.0.conv1``, see :func:`module_path`)."""

    patterns: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()       # e.g. ("MatMul",): no MatMul is quantized
    first_last_conv: bool = True         # the first and the last Conv of each graph (pixels in, pixels/latents out)
    attention_matmuls: bool = True       # MatMuls producing a Softmax input or consuming its output

    def __post_init__(self) -> None:
        unknown = [op for op in self.op_types if op not in QUANTIZED_OP_TYPES]
        if unknown:
            raise InputError(f"excluded op types {unknown} are never quantized; only {', '.join(QUANTIZED_OP_TYPES)} "
                             "are")

    def select(self, model: onnx.ModelProto) -> dict[str, str]:
        """Node name -> reason, for the quantizable nodes of ``model`` these exclusions keep float."""
        nodes = quantizable_nodes(model)
        weights = {i.name for i in model.graph.initializer}
        reasons: dict[str, str] = {}
        if self.first_last_conv:
            convs = [n for n in nodes if n.op_type == "Conv"]
            for n, which in ((convs[:1], "first"), (convs[-1:], "last")):
                for node in n:
                    reasons[node.name] = f"{which} convolution"
        if self.attention_matmuls:
            producers = {o: n for n in model.graph.node for o in n.output}
            consumers: dict[str, list[onnx.NodeProto]] = {}
            for n in model.graph.node:
                for i in n.input:
                    consumers.setdefault(i, []).append(n)
            for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
                for node in _through_layout(producers, sm.input[0], upstream=True) + \
                        _through_layout(consumers, sm.output[0], upstream=False):
                    if node.op_type in ("MatMul", "Gemm") and not any(i in weights for i in node.input):
                        reasons.setdefault(node.name, "attention (Softmax neighbour)")
        for node in nodes:
            if node.op_type in self.op_types:
                reasons.setdefault(node.name, f"op type {node.op_type}")
                continue
            path = module_path(node, weights)
            for pattern in self.patterns:
                if fnmatch.fnmatchcase(node.name, pattern) or fnmatch.fnmatchcase(path, pattern):
                    reasons.setdefault(node.name, f"pattern {pattern}")
                    break
        return reasons

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Mul", "Div", "Cast", "Identity", "Add"}


def _through_layout(index: Mapping[str, Any], tensor: str, *, upstream: bool) -> list[onnx.NodeProto]:
    """The nodes reached from ``tensor`` through a few layout/scale ops (the scale Mul, reshapes) in one direction."""
    found: list[onnx.NodeProto] = []
    frontier, seen = [tensor], set()
    for _ in range(4):
        nxt = []
        for t in frontier:
            hits = index.get(t)
            hits = [hits] if isinstance(hits, onnx.NodeProto) else (hits or [])
            for node in hits:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                found.append(node)
                if node.op_type in _LAYOUT_OPS:
                    nxt.extend(node.input[:1] if upstream else node.output)
        frontier = nxt
    return found


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and n.domain in ("", "ai.onnx")]


_STATE_KEY = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+\.weight$")


def module_path(node: onnx.NodeProto, weights: Collection[str] = ()) -> str:
    """The PyTorch module a node comes from, dotted: from its weight's state-dict name when it has one
    (``decoder.up.1.block.0.conv1.weight`` -> ``decoder.up.1.block.0.conv1``; the TorchScript exporter drops the
    ``up.1`` of ModuleList items from node names), else from the node name (``/decoder/mid/attn_1/MatMul`` ->
    ``decoder.mid.attn_1``)."""
    for name in node.input[1:2]:
        if name in weights and _STATE_KEY.match(name):
            return name[: -len(".weight")]
    parts = [p for p in node.name.split("/") if p]
    if len(parts) > 1:
        parts = parts[:-1]  # the op's own name (Conv, MatMul_1)
    return ".".join(parts)


# ----- configuration ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeConfig:
    """How one graph is quantized. Checked on creation, before any calibration runs."""

    method: CalibrationMethod = CalibrationMethod.PERCENTILE  # generalised best to unseen clips (docs/int8.md)
    percentile: float = 99.999          # for CalibrationMethod.PERCENTILE
    exclusions: Exclusions = field(default_factory=Exclusions)
    quantizer: str = "auto"             # auto: modelopt when installed, else onnxruntime

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", CalibrationMethod.parse(self.method))
        if not 90.0 < self.percentile <= 100.0:
            raise InputError(f"percentile {self.percentile} must be in (90, 100]")
        if self.quantizer not in QUANTIZERS:
            raise InputError(f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        if self.quantizer == "modelopt" and self.method is CalibrationMethod.PERCENTILE:
            raise InputError("modelopt calibrates with 'minmax' (its 'max') or 'entropy', not percentile")

    def resolved_quantizer(self) -> str:
        from cvvae.extras import is_installed

        if self.quantizer == "auto":
            use = "modelopt" if is_installed("modelopt") and self.method is not CalibrationMethod.PERCENTILE \
                else "onnxruntime"
            return use
        return self.quantizer

    def calibrator_options(self) -> dict[str, Any]:
        """Options of ``onnxruntime.quantization.create_calibrator`` for the method."""
        if self.method is CalibrationMethod.ENTROPY:
            return {"symmetric": True, "num_bins": HISTOGRAM_BINS, "num_quantized_bins": 128}
        if self.method is CalibrationMethod.PERCENTILE:
            return {"symmetric": True, "num_bins": HISTOGRAM_BINS, "percentile": self.percentile}
        return {"symmetric": True}

    def ort_extra_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ActivationSymmetric": True,      # zero point 0 for activations
            "WeightSymmetric": True,          # zero point 0 for weights
            "QuantizeBias": False,            # float bias: TensorRT has no INT32 DequantizeLinear
            "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),  # Q/DQ on inputs only
            "DedicatedQDQPair": False,
        }
        return options

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method.value,
                "percentile": self.percentile if self.method is CalibrationMethod.PERCENTILE else None,
                "exclusions": self.exclusions.as_dict(), "quantizer": self.quantizer}


SCHEME = {
    "activations": "int8, symmetric (zero point 0), per tensor",
    "weights": "int8, symmetric (zero point 0), per output channel (Conv axis 0; MatMul (K, N) axis 1)",
    "bias": "float (not quantized)",
    "qdq_placement": "inputs of Conv, MatMul and Gemm only (outputs of those ops stay float)",
    "quantized_op_types": list(QUANTIZED_OP_TYPES),
    "other_ops": "float32, as in the fp32 graph",
}


# ----- ONNX Runtime -------------------------------------------------------------------------------------------
class FeedReader:
    """A ``CalibrationDataReader`` over a list of feeds (input name -> array)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


class _DropPreprocessNag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage() and "pre_process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's calibrators print progress to stdout and nag on the root logger; route them to our debug log."""
    buffer = io.StringIO()
    nag = _DropPreprocessNag()
    root = logging.getLogger()
    root.addFilter(nag)
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        root.removeFilter(nag)
        if buffer.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", buffer.getvalue().strip())


def prepare_graph(src: Path, dst: Path) -> None:
    """``quant_pre_process``: ONNX + symbolic shape inference and ORT's basic optimizations (constant folding)."""
    from onnxruntime.quantization import quant_pre_process

    with _quiet_ort():
        quant_pre_process(str(src), str(dst))


class GraphQuantizer:
    """Quantizes one fp32 graph as often as needed after calibrating it once (ranges cached as JSON)."""

    def __init__(self, component: str, fp32_path: Path, workdir: Path, config: QuantizeConfig) -> None:
        self.component = component
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepared = self.workdir / f"{component}.prepared.onnx"
        self.cache = self.workdir / f"{component}.ranges.json"
        prepare_graph(Path(fp32_path), self.prepared)
        self.model = onnx.load(str(self.prepared), load_external_data=False)
        self.base_exclusions = config.exclusions.select(self.model)
        self.calibrated = False
        self._modelopt_data: dict[str, np.ndarray] | None = None

    @property
    def candidates(self) -> list[str]:
        """Quantizable nodes not excluded by the configured exclusions, in graph order."""
        return [n.name for n in quantizable_nodes(self.model) if n.name not in self.base_exclusions]

    def candidate_inputs(self) -> set[str]:
        """Activation tensors read by the candidate nodes (the ones a calibration must cover)."""
        weights = {t.name for t in self.model.graph.initializer}
        wanted = set(self.candidates)
        return {name for n in self.model.graph.node if n.name in wanted for name in n.input
                if name and name not in weights}

    def calibrate(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Collect activation ranges of every quantizable node's inputs (one pass over ``feeds``)."""
        if not feeds:
            raise InputError(f"no calibration data for the {self.component}")
        try:
            from onnxruntime.quantization import create_calibrator, save_tensors_data
        except ImportError as e:  # calibration caches came with recent releases
            raise BackendUnavailableError("cvvae calibrate needs an onnxruntime whose quantization tools offer "
                                          "calibration caches (save_tensors_data, quantize_static("
                                          "calibration_cache_path=...), 1.27 or newer): "
                                          "pip install -U 'onnxruntime>=1.27'") from e
        # Our own pass rather than quantize_static's: quantize_static does not forward the histogram sizes, and
        # its Entropy default (128 bins, 128 quantized bins) can only return the full range (= MinMax). TensorRT's
        # entropy calibration uses 2048 bins and 128 quantized bins; so do we.
        self.cache.unlink(missing_ok=True)
        with _quiet_ort():
            calibrator = create_calibrator(
                self.prepared, [op for op in QUANTIZED_OP_TYPES if op not in self.config.exclusions.op_types],
                augmented_model_path=str(self.workdir / f"{self.component}.augmented.onnx"),
                calibrate_method=self.config.method.to_ort(), extra_options=self.config.calibrator_options())
            # Only the inputs of nodes that may be quantized need ranges. Excluded ones can be degenerate: the
            # Softmax of a temporal attention that attends almost uniformly gives ~1/3 everywhere, which numpy
            # cannot split into 2048 histogram bins ("Too many bins for data range").
            if getattr(calibrator, "tensors_to_calibrate", None) is not None:
                calibrator.tensors_to_calibrate &= self.candidate_inputs()
            try:
                for feed in feeds:  # one chunk at a time: the calibrator merges ranges/histograms across calls,
                    calibrator.collect_data(FeedReader([feed]))  # and holds one chunk's activations in memory
            except ValueError as e:
                if "bins" not in str(e):
                    raise
                raise ExportError(f"{self.component}: an activation's range is too narrow for a "
                                  f"{HISTOGRAM_BINS}-bin histogram ({e}); use --method minmax, or exclude "
                                  "the node that reads it (--exclude)") from e
            save_tensors_data(calibrator.compute_data(), self.cache)
        del calibrator
        if self.config.resolved_quantizer() == "modelopt":  # it takes one array per input, chunks on the batch axis
            self._modelopt_data = {n: np.concatenate([f[n] for f in feeds], axis=0) for n in feeds[0]}
        self.calibrated = True

    def quantize(self, out_path: Path, *, exclude: Collection[str] = (), only: Collection[str] | None = None,
                 final: bool = False) -> onnx.ModelProto:
        """The Q/DQ graph with ``exclude`` (plus the configured exclusions) kept float; ``only`` quantizes just those
        nodes. ``final`` allows the modelopt path; the search always uses ONNX Runtime."""
        if not self.calibrated:
            raise ExportError(f"the {self.component} has not been calibrated yet (call calibrate first)")
        if final and self.config.resolved_quantizer() == "modelopt":
            return self._quantize_modelopt(out_path, exclude=exclude)
        return self._quantize_ort(out_path, exclude=exclude, only=only)

    def _quantize_ort(self, out_path: Path, *, exclude: Collection[str],
                      only: Collection[str] | None = None) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        excluded = sorted(set(exclude) | set(self.base_exclusions))
        with _quiet_ort():
            quantize_static(
                str(self.prepared), str(out_path), None,  # ranges come from the cache written by calibrate()
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=[op for op in QUANTIZED_OP_TYPES if op not in self.config.exclusions.op_types],
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=sorted(only) if only is not None else None,
                nodes_to_exclude=excluded,
                calibrate_method=self.config.method.to_ort(),
                extra_options=self.config.ort_extra_options(),
                calibration_cache_path=str(self.cache),
            )
        model = onnx.load(str(out_path))
        quantized = {n for n in self._candidate_set if n not in excluded and (only is None or n in only)}
        rewired = keep_float_consumers_float(model, quantized)
        if rewired:
            log.debug("%s: %d float consumers of shared Q/DQ pairs rewired to the float tensor", self.component,
                      rewired)
        finalize(model, self.component, self.config.method.value)
        onnx.save_model(model, str(out_path))
        return model

    @property
    def _candidate_set(self) -> set[str]:
        ops = [op for op in QUANTIZED_OP_TYPES if op not in self.config.exclusions.op_types]
        return {n.name for n in quantizable_nodes(self.model) if n.op_type in ops}

    def _quantize_modelopt(self, out_path: Path, *, exclude: Collection[str]) -> onnx.ModelProto:
        """The final graph from nvidia-modelopt (optional; lazily imported). Uses the calibration feeds again."""
        from cvvae.extras import lazy_import

        modelopt_quantize = lazy_import("modelopt.onnx.quantization", "quantizer 'modelopt'").quantize
        if self._modelopt_data is None:
            raise ExportError("modelopt needs the calibration feeds: call calibrate() first")
        method = {CalibrationMethod.MINMAX: "max", CalibrationMethod.ENTROPY: "entropy"}[self.config.method]
        excluded = sorted(set(exclude) | set(self.base_exclusions))
        modelopt_quantize(str(self.prepared), quantize_mode="int8", calibration_data=self._modelopt_data,
                          calibration_method=method, calibration_eps=["cpu"],
                          op_types_to_quantize=[op for op in QUANTIZED_OP_TYPES
                                                if op not in self.config.exclusions.op_types],
                          nodes_to_exclude=excluded, output_path=str(out_path), high_precision_dtype="fp32")
        model = onnx.load(str(out_path))
        finalize(model, self.component, self.config.method.value)
        onnx.save_model(model, str(out_path))
        return model


def keep_float_consumers_float(model: onnx.ModelProto, quantized: Collection[str]) -> int:
    """Give every consumer of an activation's Q/DQ pair that is not itself quantized the float tensor back.

    ``quantize_static`` inserts one Q/DQ pair per tensor and rewires *all* its consumers to the DQ output (and with
    ``DedicatedQDQPair`` still all consumers of a tensor with a single quantized one), so the normalization and the
    residual Add next to a quantized Conv would read rounded values. TensorRT would execute exactly that; the scheme
    wants Q/DQ on the inputs of quantized Conv/MatMul/Gemm only. Returns how many inputs were rewired.
    """
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    source: dict[str, str] = {}  # DQ output -> the float tensor its Q reads
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                source[node.output[0]] = q.input[0]
    rewired = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name in quantized:
            continue
        for k, name in enumerate(node.input):
            if name in source:
                node.input[k] = source[name]
                rewired += 1
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in source
            and n.output[0] not in used]
    for n in dead:  # a pair whose every consumer went back to float
        model.graph.node.remove(n)
        q = producers[n.input[0]]
        if q in model.graph.node and not any(q.output[0] in m.input for m in model.graph.node):
            model.graph.node.remove(q)
    return rewired


def finalize(model: onnx.ModelProto, component: str, method: str) -> None:
    """Drop opset imports no node uses (ORT's optimizer adds several), label the graph as int8."""
    from cvvae.export.to_onnx import set_metadata

    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in used or (o.domain or "") == ""]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    set_metadata(model, component=component, precision="int8", calibration=method)


# ----- checks ---------------------------------------------------------------------------------------------------
@dataclass
class QdqSummary:
    """What a Q/DQ graph contains: counts, and which nodes run in INT8."""

    quantize_linear: int
    dequantize_linear: int
    weight_dequantize: int
    quantized_nodes: list[str]
    float_nodes: list[str]          # quantizable op types left float
    issues: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"QuantizeLinear": self.quantize_linear, "DequantizeLinear": self.dequantize_linear,
                "weight_DequantizeLinear": self.weight_dequantize, "quantized_nodes": len(self.quantized_nodes),
                "float_nodes": self.float_nodes, "issues": self.issues}


def _weight_axis(consumer: onnx.NodeProto, rank: int) -> int:
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 0 if consumer.op_type == "Conv" else rank - 1


def check_qdq(model: onnx.ModelProto) -> QdqSummary:
    """Walk every QuantizeLinear/DequantizeLinear and check the scheme of the module docstring."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producers = {o: n for n in model.graph.node for o in n.output}
    issues: list[str] = []
    counts = Counter(n.op_type for n in model.graph.node)
    weight_dq = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or node.input[2] not in inits:
            issues.append(f"{node.name}: no constant zero point (defaults to uint8)")
            continue
        zp = numpy_helper.to_array(inits[node.input[2]])
        if inits[node.input[2]].data_type != TensorProto.INT8 or np.any(zp != 0):
            issues.append(f"{node.name}: zero point must be int8 0, is {zp.dtype} {zp.ravel()[:4]}")
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        if scale is None:
            issues.append(f"{node.name}: scale is not a constant")
            continue
        if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
            issues.append(f"{node.name}: scale has non-positive or non-finite values")
        # a weight: an int8 initializer -> DQ, or (modelopt's other form) a float initializer -> Q -> DQ
        source = node.input[0] if node.input[0] in inits else None
        if source is None and node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            source = q.input[0] if q is not None and q.input[0] in inits else None
        if source is not None:
            weight_dq += node.op_type == "DequantizeLinear"
            w = inits[source]
            dq_outputs = [node.output[0]] if node.op_type == "DequantizeLinear" else \
                [d.output[0] for d in consumers.get(node.output[0], [])]  # a Q is checked through its DQ
            users = [(u, out) for out in dq_outputs for u in consumers.get(out, [])]
            if not users or any(u.op_type not in QUANTIZED_OP_TYPES or u.input[1] != out for u, out in users):
                issues.append(f"{node.name}: weight DQ must feed the weight input of Conv/MatMul/Gemm")
                continue
            axis_expected = _weight_axis(users[0][0], len(w.dims))
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            axis = axis % len(w.dims)
            if axis != axis_expected or scale.shape != (w.dims[axis_expected],):
                issues.append(f"{node.name}: weight scale must be per output channel (axis {axis_expected}, "
                              f"{w.dims[axis_expected]} values); has axis {axis}, shape {scale.shape}")
        else:
            if scale.size != 1:
                issues.append(f"{node.name}: activation scale must be per tensor, has {scale.size} values")
            if node.op_type == "DequantizeLinear":
                bad = [u for u in consumers.get(node.output[0], []) if u.op_type not in QUANTIZED_OP_TYPES]
                if bad:
                    issues.append(f"{node.name}: activation DQ feeds {bad[0].op_type} {bad[0].name}; Q/DQ belong on "
                                  "inputs of Conv/MatMul/Gemm only")
    quantized, floating = [], []
    for node in quantizable_nodes(model):
        src = [producers.get(i) for i in node.input[:2]]
        if all(s is not None and s.op_type == "DequantizeLinear" for s in src):
            quantized.append(node.name)
        else:
            floating.append(node.name)
    return QdqSummary(counts.get("QuantizeLinear", 0), counts.get("DequantizeLinear", 0), weight_dq, quantized,
                      floating, issues)


def copy_graph_files(src_dir: Path, dst_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        shutil.copy2(src_dir / name, dst_dir / name)


# ----- an INT8 export from an fp32 export ------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    """Everything ``cvvae calibrate`` decides. Checked on creation, before any video is read."""

    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    num_chunks: int = 8                    # calibration chunks
    holdout_chunks: int = 2                # further chunks for the sensitivity search (never calibrated on)
    chunk_frames: int | None = None        # None: the plan's chunk (encoder input chunk_frames + 1 frames)
    tile_size: int | None = None           # None: the plan's tile (px), at most max_tile_size
    max_tile_size: int = 256               # the releases' 576 px tiles x 17 frames need GBs per activation on a CPU
    frame_stride: int = 1
    resize_short_side: int | None = None
    seed: int = 0
    target_psnr_drop: float | None = 0.5   # dB; None: no search (only the configured exclusions)
    rank_groups: bool = True               # measure every group even when the all-INT8 model meets the target
    components: tuple[str, ...] = ("encoder", "decoder")
    threads: int | None = None             # ONNX Runtime intra-op threads (None: its default)

    def __post_init__(self) -> None:
        if self.num_chunks < 1:
            raise InputError(f"num_chunks must be >= 1, got {self.num_chunks}")
        if self.holdout_chunks < 0:
            raise InputError(f"holdout_chunks must be >= 0, got {self.holdout_chunks}")
        if self.target_psnr_drop is not None and self.target_psnr_drop < 0:
            raise InputError(f"target PSNR drop must be >= 0 dB, got {self.target_psnr_drop}")
        if self.target_psnr_drop is not None and self.holdout_chunks < 1:
            raise InputError("the sensitivity search needs held-out chunks: pass holdout_chunks >= 1 "
                             "(or no --target-psnr-drop)")
        unknown = [c for c in self.components if c not in ("encoder", "decoder")]
        if unknown or not self.components:
            raise InputError(f"components must be encoder and/or decoder, got {list(self.components)}")


def calibrate_export(export_dir: str | Path, clips: Sequence[str | Path], out_dir: str | Path,
                     config: CalibrationConfig | None = None, *, overwrite: bool = False,
                     on_progress: Any = None) -> Any:
    """Write ``out_dir``: a copy of the export at ``export_dir`` plus ``<component>.int8.onnx`` graphs, listed in
    its manifest with their calibration record. Returns the loaded :class:`~cvvae.export.manifest.ExportManifest`.

    Nothing is left behind on failure (the directory is written under a temporary name and renamed).
    """
    import hashlib
    import json
    import tempfile
    import time

    from cvvae.calibration import data as data_mod
    from cvvae.calibration.sensitivity import RoundTrip, encode_means, search
    from cvvae.export import contract
    from cvvae.export.manifest import GraphFile, add_graph_file, load_manifest, write_manifest
    from cvvae.export.verify import check_tensorrt_ready
    from cvvae.fsutil import atomic_path, check_writable_target

    config = config or CalibrationConfig()
    say = on_progress or (lambda msg: log.info("%s", msg))
    started = time.perf_counter()
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if export_dir.resolve() == out_dir.resolve():
        raise InputError("the INT8 export must go to a new directory (-o), not into the source export")
    check_writable_target(out_dir, overwrite=overwrite, what="INT8 export directory", kind="export")
    manifest = load_manifest(export_dir)
    for component in ("encoder", "decoder"):  # the round trip needs both fp32 graphs
        manifest.graph_path(component, "fp32")
    clip_paths = data_mod.find_clips(clips)
    settings = manifest.plan_settings()
    tile_size = config.tile_size
    if tile_size is None and settings.tile_size is not None and settings.tile_size > config.max_tile_size:
        tile_size = config.max_tile_size
        log.warning("calibrating on %d px crops instead of the plan's %d px tiles (pass --tile-size %d to use the "
                    "plan's size; it needs much more memory and time)", tile_size, settings.tile_size,
                    settings.tile_size)
    spec = data_mod.ChunkSpec.from_plan(settings, chunk_frames=config.chunk_frames, tile_size=tile_size,
                                        frame_stride=config.frame_stride, resize_short_side=config.resize_short_side)
    quantizer_name = config.quantize.resolved_quantizer()
    if quantizer_name == "modelopt":
        log.warning("nvidia-modelopt is installed: the final INT8 graphs come from modelopt (the sensitivity search "
                    "uses onnxruntime); pass quantizer='onnxruntime' to avoid it")

    say(f"sampling {config.num_chunks}+{config.holdout_chunks} chunks of {spec.frames}x{spec.height}x{spec.width} "
        f"from {len(clip_paths)} clip(s)")
    chunks = data_mod.sample_chunks(clip_paths, spec, config.num_chunks + config.holdout_chunks, seed=config.seed)
    calib, holdout = chunks[: config.num_chunks], chunks[config.num_chunks:]
    data_files = data_mod.describe_clips(clip_paths)

    with tempfile.TemporaryDirectory(prefix="cvvae.calib.") as scratch_name:
        scratch = Path(scratch_name)
        # fp32 encoder on every chunk: its latent means are the decoder's calibration data
        say("fp32 encoder on the calibration chunks (decoder calibration inputs)")
        enc_fp32, dec_fp32 = manifest.graph_path("encoder", "fp32"), manifest.graph_path("decoder", "fp32")
        latents = encode_means(enc_fp32, [c.pixels() for c in calib], threads=config.threads)
        feeds = {"encoder": [{contract.ENCODER_INPUT: c.pixels()} for c in calib],
                 "decoder": [{contract.DECODER_INPUT: z} for z in latents]}
        del latents
        quantizers: dict[str, GraphQuantizer] = {}
        for component in config.components:
            say(f"{component}: pre-processing and calibrating ({config.quantize.method.value}, {len(calib)} chunks)")
            q = GraphQuantizer(component, manifest.graph_path(component, "fp32"), scratch / component,
                               config.quantize)
            q.calibrate(feeds[component])
            quantizers[component] = q
        del feeds

        result = None
        if holdout:
            trip = RoundTrip(enc_fp32, dec_fp32, [c.pixels() for c in holdout], threads=config.threads)
            result = search(quantizers, trip, scratch / "search", target_drop_db=config.target_psnr_drop,
                            rank=config.rank_groups and config.target_psnr_drop is not None, say=say)

        src_files = sorted({f.path for e in manifest.components.values() for f in e.files.values()} |
                           {f.data_path for e in manifest.components.values() for f in e.files.values()
                            if f.data_path})
        manifest_sha = hashlib.sha256((export_dir / contract.MANIFEST_NAME).read_bytes()).hexdigest()
        with atomic_path(out_dir, overwrite=overwrite, directory=True, kind="export") as tmp:
            copy_graph_files(export_dir, tmp, src_files)
            for component, q in quantizers.items():
                name = contract.graph_filename(component, "int8")
                sens = result.excluded_nodes(component) if result is not None else {}
                model = q.quantize(tmp / name, exclude=set(sens), final=True)
                summary = check_qdq(model)
                if summary.issues:
                    raise ExportError(f"{name} breaks the INT8 scheme:\n  " + "\n  ".join(summary.issues[:20]))
                trt_issues = check_tensorrt_ready(model)
                if trt_issues:
                    raise ExportError(f"{name} is not TensorRT-ready:\n  " + "\n  ".join(trt_issues))
                record = {
                    **config.quantize.as_dict(),
                    "quantizer": _quantizer_version(quantizer_name),
                    "scheme": SCHEME,
                    "num_chunks": len(calib),
                    "holdout_chunks": len(holdout),
                    "chunk": spec.as_dict(),
                    "input_shape": [1, 3, spec.frames, spec.height, spec.width] if component == "encoder" else
                    list(spec.latent_shape(manifest.compression["latent_channels"])),
                    "inputs_from": "video chunks" if component == "encoder" else
                    "latent means of the fp32 encoder on the same chunks",
                    "seed": config.seed,
                    "data": [{**f.as_dict(),
                              "chunks_start_top_left": [c.where() for c in calib if str(c.clip) == f.path],
                              "holdout_start_top_left": [c.where() for c in holdout if str(c.clip) == f.path]}
                             for f in data_files],
                    "exclusions": {"config": config.quantize.exclusions.as_dict(),
                                   "nodes": dict(sorted(q.base_exclusions.items())),
                                   "sensitivity_nodes": dict(sorted(sens.items()))},
                    "sensitivity": result.as_dict(component) if result is not None else None,
                    "qdq": summary.as_dict(),
                    "source_export": {"path": str(export_dir.resolve()), "manifest_sha256": manifest_sha},
                    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": round(time.perf_counter() - started, 2),
                }
                verified = {"status": "measured", "reference": "onnxruntime-fp32", "runtime": "onnxruntime-cpu",
                            "holdout_round_trip": result.final.as_dict() if result is not None else None}
                graph = GraphFile.describe(tmp / name, precision="int8", external_data=False, verified=verified,
                                           fp16_rule=None, model=model)
                graph.calibration = record
                add_graph_file(manifest, component, "int8", graph)
                say(f"{component}: {name} with {len(summary.quantized_nodes)} INT8 nodes, "
                    f"{len(summary.float_nodes)} float")
            write_manifest(tmp, manifest)
            (tmp / "calibration.json").write_text(json.dumps(
                {"config": {**{k: v for k, v in config.__dict__.items() if k != "quantize"},
                            "quantize": config.quantize.as_dict()},
                 "sensitivity": result.as_dict() if result is not None else None,
                 "seconds": round(time.perf_counter() - started, 2)}, indent=2, default=str) + "\n")
    say(f"wrote {out_dir} in {time.perf_counter() - started:.1f} s")
    return load_manifest(out_dir)


def _quantizer_version(name: str) -> str:
    import importlib.metadata as md

    package = {"onnxruntime": "onnxruntime", "modelopt": "nvidia-modelopt"}[name]
    try:
        version = md.version(package)
    except md.PackageNotFoundError:
        version = "unknown"
    how = "quantize_static, QuantFormat.QDQ" if name == "onnxruntime" else "modelopt.onnx.quantization.quantize"
    return f"{name} {version} ({how})"
