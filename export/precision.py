"""Lower-precision graphs: fp16 with fp32 islands chosen by a documented, tested rule.

TensorRT 10.12+/11 builds strongly typed networks: the precision of every layer is the dtype of its tensors in the
ONNX graph. So an fp16 engine needs an fp16 *graph*, with explicit Cast nodes around the layers that must stay fp32.

Approach: convert the cleaned fp32 graph (approach (b) of the issue) with our own pass rather than exporting a
half-precision torch model (approach (a): CPU torch lacks several fp16 kernels, and the islands would be frozen into
the model code) or onnxconverter-common (an extra dependency whose block lists are per op type only and which keeps
Resize in fp32 by default). The pass is driven by ONNX's operator schemas, so it knows which inputs follow the data
type (Conv weights, Pad values) and which must stay float32 (Resize scales).

The fp16 rule (:class:`Fp16Rule`); a node stays fp32 when

1. its op computes statistics or exponentials (``ALWAYS_FP32_OPS``): InstanceNormalization (the GroupNorm
   lowering: mean/variance over C/32*T*H*W values overflow or lose precision in fp16), LayerNormalization, Softmax,
   reductions, Exp/Log/Pow/Sqrt/Reciprocal;
2. it is a MatMul producing the input of a Softmax: the attention logits q.k over 512 channels (one head);
3. measurement shows a range problem: running the fp32 graph in ONNX Runtime on calibration clips, one of its float
   inputs or outputs reached ``max_abs`` (default 4096 = 2^12, 1/16 of the fp16 maximum 65504: headroom for
   content and sizes beyond the calibration clips) -- those tensors are kept fp32 end to end;
4. one of its weights lies outside the fp16 range (|w| > 65504) or would underflow entirely.

Everything else (Conv, MatMul of the projections, SiLU, Resize, Pad, Concat, reshapes) is fp16; Cast nodes are
inserted where an fp16 tensor meets an fp32 node. I/O of the fp16 graph is fp16 by default (``low_io``): that is what
TensorRT users feed for speed; the manifest records the I/O dtypes so the runtime casts. ONNX Runtime CPU runs these
graphs (it inserts casts around ops without fp16 CPU kernels).

bf16 is not offered: ONNX Conv accepts bfloat16 only from opset 22, beyond the 17-20 range that TensorRT parses well,
and ONNX Runtime's CPU provider has no bf16 Conv, so a bf16 graph could not be verified here.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cvvae.errors import ExportError

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_TINY = 6.0e-8  # smallest fp16 subnormal; a weight tensor entirely below it would become zeros


class Precision(str, Enum):
    """Precision of a graph file (the dtype of its compute tensors)."""

    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def onnx_type(self) -> int:
        return {Precision.FP32: TensorProto.FLOAT, Precision.FP16: TensorProto.FLOAT16}[self]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self is Precision.FP32 else np.float16)


_NOT_OFFERED = {
    "bf16": "bf16 is not offered: ONNX Conv takes bfloat16 only from opset 22 (TensorRT-friendly range is 17-20) "
            "and ONNX Runtime CPU has no bf16 Conv to verify it",
    "int8": "int8 graphs (QDQ) come from the calibration step, not from export",
}


def parse_precisions(text: str | Iterable[str]) -> tuple[Precision, ...]:
    """``"fp32,fp16"`` -> (Precision.FP32, Precision.FP16); unknown names fail with the list of choices."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for name in names:
        name = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(name, name)
        if name in _NOT_OFFERED:
            raise ExportError(_NOT_OFFERED[name])
        try:
            out.append(Precision(name))
        except ValueError:
            raise ExportError(f"unknown precision {name!r}; choose from "
                              + ", ".join(p.value for p in Precision)) from None
    if not out:
        raise ExportError("no precision given; choose from " + ", ".join(p.value for p in Precision))
    return tuple(dict.fromkeys(out))


ALWAYS_FP32_OPS = frozenset({
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd",
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
})


@dataclass(frozen=True)
class Fp16Rule:
    """Which nodes of an fp16 graph stay fp32 (see the module docstring for the reasoning)."""

    always_fp32_ops: frozenset[str] = ALWAYS_FP32_OPS
    attention_logits_fp32: bool = True
    max_abs: float = 4096.0
    low_io: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"always_fp32_ops": sorted(self.always_fp32_ops), "attention_logits_fp32": self.attention_logits_fp32,
                "max_abs": self.max_abs, "io_dtype": "float16" if self.low_io else "float32"}


@dataclass
class Fp32Selection:
    """The outcome of the rule for one graph: the fp32 nodes with their reasons, and the measured ranges."""

    rule: Fp16Rule
    fp32_nodes: dict[str, str] = field(default_factory=dict)  # node name -> reason
    node_ops: dict[str, str] = field(default_factory=dict)    # node name -> op type
    max_abs_seen: float = 0.0
    calibration_shapes: list[list[int]] = field(default_factory=list)

    def reasons(self) -> Counter:
        return Counter(r.split(":")[0] for r in self.fp32_nodes.values())

    def as_dict(self) -> dict[str, Any]:
        by_op = Counter(self.node_ops[n] for n in self.fp32_nodes)
        range_nodes = {n: r for n, r in self.fp32_nodes.items() if r.startswith("range")}
        return {
            "rule": self.rule.as_dict(),
            "fp32_nodes": len(self.fp32_nodes),
            "fp32_by_reason": dict(sorted(self.reasons().items())),
            "fp32_by_op": dict(sorted(by_op.items())),
            "range_nodes": dict(sorted(range_nodes.items())[:50]),
            "max_abs_seen": self.max_abs_seen,
            "calibration_shapes": self.calibration_shapes,
        }


# ----- measurement ----------------------------------------------------------------------------------------------
def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor: inputs, outputs, value_info (shape inference) and initializers."""
    types: dict[str, int] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def _ort_session(model: onnx.ModelProto, workdir: Path, *, optimize: bool):
    from cvvae.onnxrt import ort_session

    level = "all" if optimize else "disable"
    if model.ByteSize() < 1_900_000_000:
        return ort_session(model.SerializeToString(), threads=2, optimization=level)
    path = workdir / ".measure.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    onnx.load_external_data_for_model(model, str(workdir))
    return ort_session(path, threads=2, optimization=level)


def measure_ranges(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
                   workdir: Path) -> dict[str, float]:
    """Max |value| of every float tensor of the fp32 graph over the feeds (ONNX Runtime, no graph rewrites)."""
    types = tensor_types(model)
    graph_outputs = {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    extra = [n for n, t in types.items() if t == TensorProto.FLOAT and n not in graph_outputs and n not in inits
             and n not in {i.name for i in model.graph.input}]
    added = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra]
    model.graph.output.extend(added)
    try:
        session = _ort_session(model, workdir, optimize=False)
    finally:
        for _ in added:
            model.graph.output.pop()
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(None, dict(feed))):
            if value.size:
                m = float(np.max(np.abs(value)))
                ranges[name] = max(ranges.get(name, 0.0), m if math.isfinite(m) else math.inf)
        for name, value in feed.items():
            ranges[name] = max(ranges.get(name, 0.0), float(np.max(np.abs(value))))
    return ranges


def select_fp32_nodes(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], rule: Fp16Rule,
                      workdir: Path) -> Fp32Selection:
    """Apply :class:`Fp16Rule` to the fp32 ``model`` with ranges measured on ``feeds``."""
    ranges = measure_ranges(model, feeds, workdir) if feeds else {}
    return select_with_ranges(model, ranges, rule,
                              calibration_shapes=[list(v.shape) for f in feeds for v in f.values()])


def select_with_ranges(model: onnx.ModelProto, ranges: Mapping[str, float], rule: Fp16Rule, *,
                       calibration_shapes: list[list[int]] | None = None) -> Fp32Selection:
    """The rule on given ranges (separate from measuring, so tests can feed hand-made numbers)."""
    sel = Fp32Selection(rule=rule, calibration_shapes=calibration_shapes or [])
    sel.max_abs_seen = max((v for v in ranges.values() if math.isfinite(v)), default=0.0)
    types = tensor_types(model)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        sel.node_ops[node.name] = node.op_type
        float_io = [n for n in (*node.input, *node.output) if n and types.get(n) == TensorProto.FLOAT]
        if not float_io:
            continue
        reason = None
        if node.op_type in rule.always_fp32_ops:
            reason = f"op: {node.op_type} computes statistics or exponentials"
        elif (rule.attention_logits_fp32 and node.op_type == "MatMul"
              and any(c.op_type == "Softmax" for c in consumers.get(node.output[0], []))):
            reason = "attention: MatMul producing Softmax logits"
        else:
            big = [(n, ranges[n]) for n in float_io if n not in inits and ranges.get(n, 0.0) >= rule.max_abs]
            if big:
                name, value = max(big, key=lambda kv: kv[1])
                reason = f"range: |{name}| reached {value:.4g} >= {rule.max_abs:g}"
            else:
                for name in node.input:
                    if name in inits and inits[name].data_type == TensorProto.FLOAT and inits[name].dims:
                        w = numpy_helper.to_array(inits[name])
                        if w.size and (np.abs(w).max() > FP16_MAX or (np.abs(w).max() < FP16_TINY and w.any())):
                            reason = f"weights: {name} outside the fp16 range"
                            break
        if reason:
            sel.fp32_nodes[node.name] = reason
    return sel


# ----- conversion -----------------------------------------------------------------------------------------------
def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


class _Schemas:
    """Which inputs/outputs of an op follow the graph's float type (vs. fixed float32 like Resize's scales)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self._cache: dict[tuple[str, str], Any] = {}

    def _schema(self, node: onnx.NodeProto):
        key = (node.domain, node.op_type)
        if key not in self._cache:
            try:
                self._cache[key] = onnx.defs.get_schema(node.op_type, self.opset, node.domain or "")
            except onnx.defs.SchemaError:
                self._cache[key] = None
        return self._cache[key]

    def _convertible(self, node: onnx.NodeProto, params, index: int) -> bool:
        schema = self._schema(node)
        if schema is None or not params:
            return False
        param = params[min(index, len(params) - 1)]
        constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        allowed = constraints.get(param.type_str, [param.type_str])
        return "tensor(float16)" in allowed

    def input_follows(self, node: onnx.NodeProto, index: int) -> bool:
        schema = self._schema(node)
        return schema is not None and self._convertible(node, schema.inputs, index)

    def output_follows(self, node: onnx.NodeProto, index: int) -> bool:
        schema = self._schema(node)
        return schema is not None and self._convertible(node, schema.outputs, index)


def convert_precision(model: onnx.ModelProto, precision: Precision, fp32_nodes: Collection[str], *,
                      io_low: bool = True) -> onnx.ModelProto:
    """A copy of the fp32 ``model`` whose float tensors are ``precision`` except in ``fp32_nodes``.

    Initializers read by low-precision nodes are stored converted (a second fp32 copy only if an fp32 node reads the
    same one); Cast nodes join low and fp32 regions; graph I/O is ``precision`` when ``io_low``, else float32.
    """
    if precision is Precision.FP32:
        return model
    low = precision.onnx_type
    low_np = precision.numpy_dtype
    suffix = precision.value
    schemas = _Schemas(_opset(model))
    types = tensor_types(model)
    src = model.graph
    inits = {i.name: i for i in src.initializer}
    graph_inputs = {i.name for i in src.input}
    graph_outputs = [o.name for o in src.output]
    fp32_nodes = set(fp32_nodes)

    home: dict[str, int] = {}  # dtype each float tensor is produced in
    io_type = low if io_low else TensorProto.FLOAT
    for name in graph_inputs:
        if types.get(name) == TensorProto.FLOAT:
            home[name] = io_type

    new_nodes: list[onnx.NodeProto] = []
    # non-float initializers as they are; float ones in the dtype(s) their readers want (below)
    new_inits: dict[str, onnx.TensorProto] = {n: i for n, i in inits.items() if i.data_type != TensorProto.FLOAT}
    casts: dict[tuple[str, int], str] = {}
    pending_casts: dict[str, list[onnx.NodeProto]] = {}  # tensor -> casts to emit right after its producer

    def converted_init(name: str, dtype: int) -> str:
        if dtype == TensorProto.FLOAT:
            new_inits.setdefault(name, inits[name])
            return name
        new_name = f"{name}__{suffix}"
        if new_name not in new_inits:
            arr = numpy_helper.to_array(inits[name])
            with np.errstate(over="ignore"):
                new_inits[new_name] = numpy_helper.from_array(arr.astype(low_np), new_name)
        return new_name

    def cast_of(name: str, dtype: int, into: list[onnx.NodeProto]) -> str:
        key = (name, dtype)
        if key not in casts:
            out = f"{name}__to_{'fp32' if dtype == TensorProto.FLOAT else suffix}"
            casts[key] = out
            into.append(helper.make_node("Cast", [name], [out], to=dtype, name=f"Cast_{out}"))
        return casts[key]

    head: list[onnx.NodeProto] = []  # casts of graph inputs
    for node in src.node:
        is_low = node.name not in fp32_nodes
        n = onnx.NodeProto()
        n.CopyFrom(node)
        for k, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.FLOAT:
                continue
            want = low if is_low and schemas.input_follows(node, k) else TensorProto.FLOAT
            if name in inits:
                n.input[k] = converted_init(name, want)
            elif home.get(name, TensorProto.FLOAT) != want:
                # casts of graph inputs go first; others right after their producer (emitted below)
                into = head if name in graph_inputs else pending_casts.setdefault(name, [])
                n.input[k] = cast_of(name, want, into)
        for k, name in enumerate(node.output):
            if name and types.get(name) == TensorProto.FLOAT:
                home[name] = low if is_low and schemas.output_follows(node, k) else TensorProto.FLOAT
        if is_low:
            _lower_attributes(n, low, low_np)
            if n.op_type == "Cast":
                for a in n.attribute:
                    if a.name == "to" and a.i == TensorProto.FLOAT:
                        a.i = low
                        home[n.output[0]] = low
        new_nodes.append(n)

    # emit casts right after their producers (topological order)
    ordered: list[onnx.NodeProto] = list(head)
    for n in new_nodes:
        ordered.append(n)
        for out in n.output:
            ordered.extend(pending_casts.pop(out, []))
    assert not pending_casts, f"casts without a producer: {sorted(pending_casts)}"

    # graph outputs in the I/O dtype
    out_infos = []
    for name in graph_outputs:
        produced = home.get(name, TensorProto.FLOAT)
        if types.get(name) == TensorProto.FLOAT and produced != io_type:
            inner = f"{name}__{'fp32' if produced == TensorProto.FLOAT else suffix}"
            for n in ordered:
                n.output[:] = [inner if o == name else o for o in n.output]
                n.input[:] = [inner if i == name else i for i in n.input]
            ordered.append(helper.make_node("Cast", [inner], [name], to=io_type, name=f"Cast_{name}_output"))
        out_infos.append(name)

    out = onnx.ModelProto()
    out.CopyFrom(_without_graph_body(model))
    g = out.graph
    g.node.extend(ordered)
    g.initializer.extend(new_inits.values())
    for vi in model.graph.input:
        nv = g.input.add()
        nv.CopyFrom(vi)
        if types.get(vi.name) == TensorProto.FLOAT:
            nv.type.tensor_type.elem_type = io_type
    for vi in model.graph.output:
        nv = g.output.add()
        nv.CopyFrom(vi)
        if types.get(vi.name) == TensorProto.FLOAT:
            nv.type.tensor_type.elem_type = io_type
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    return out


def _without_graph_body(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with an empty graph (name, docs, opsets and metadata kept), without copying weights."""
    shell = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name == "graph":
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(shell, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(shell, fd.name).CopyFrom(value)
        else:
            setattr(shell, fd.name, value)
    shell.graph.name = model.graph.name
    shell.graph.doc_string = model.graph.doc_string
    return shell


def _lower_attributes(node: onnx.NodeProto, low: int, low_np: np.dtype) -> None:
    """Float tensor attributes (Constant/ConstantOfShape values) of a low-precision node."""
    if node.op_type not in ("Constant", "ConstantOfShape"):
        return
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(a.t).astype(low_np)
            a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))


def graph_precision(model: onnx.ModelProto) -> dict[str, Any]:
    """Element counts of the float initializers by dtype, and the dominant one ("fp32", "fp16", ...)."""
    counts: Counter = Counter()
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_NAMES:
            counts[_FLOAT_NAMES[init.data_type]] += math.prod(init.dims)
    dominant = counts.most_common(1)[0][0] if counts else "none"
    return {"dominant": dominant, "initializer_elements": dict(counts)}


_FLOAT_NAMES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16",
                TensorProto.DOUBLE: "fp64"}
