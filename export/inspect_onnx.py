"""``cvvae inspect FILE``: what an ONNX graph takes and gives, its opset, precision and operator counts.

Reads the graph without its external weights (fast even for large files) and returns a :class:`GraphSummary`
(plain data; ``as_dict`` for ``--json``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from cvvae.errors import ExportError, InputError

_T = onnx.TensorProto
_DTYPE_NAMES = {_T.FLOAT: "float32", _T.FLOAT16: "float16", _T.BFLOAT16: "bfloat16", _T.DOUBLE: "float64",
                _T.INT64: "int64", _T.INT32: "int32", _T.INT8: "int8", _T.UINT8: "uint8", _T.BOOL: "bool"}
_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "int8",
              "uint8": "int8"}


def dtype_name(elem_type: int) -> str:
    return _DTYPE_NAMES.get(elem_type, onnx.TensorProto.DataType.Name(elem_type).lower())


@dataclass
class TensorInfo:
    name: str
    dtype: str
    dims: list[str | int | None]  # int: static; str: symbolic (dynamic); None: unknown

    @property
    def dynamic(self) -> list[str]:
        return [d for d in self.dims if not isinstance(d, int)]


@dataclass
class GraphSummary:
    path: str
    opset: dict[str, int]
    ir_version: int
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    precision: str                                   # dominant dtype of float weights: fp32, fp16, ...
    initializer_elements: dict[str, int]             # dtype -> element count
    num_parameters: int
    op_counts: dict[str, int]
    num_nodes: int
    external_data: bool
    size_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    t = vi.type.tensor_type
    dims: list[str | int | None] = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorInfo(vi.name, dtype_name(t.elem_type), dims)


def inspect_graph(path: str | Path) -> GraphSummary:
    """Summarise an ONNX file (weights are not loaded)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others for non-ONNX files
        raise ExportError(f"cannot read {path} as an ONNX model: {type(e).__name__}: {e}") from e
    g = model.graph
    elements: Counter = Counter()
    external = False
    for init in g.initializer:
        elements[dtype_name(init.data_type)] += math.prod(init.dims)
        external |= init.data_location == onnx.TensorProto.EXTERNAL
    floats = {k: v for k, v in elements.items() if k in ("float32", "float16", "bfloat16", "float64")}
    dominant = max(floats, key=floats.get) if floats else "none"
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in g.node)
    size = path.stat().st_size
    if external:
        for f in {e.value for i in g.initializer for e in i.external_data if e.key == "location"}:
            data = path.parent / f
            size += data.stat().st_size if data.exists() else 0
    return GraphSummary(
        path=str(path),
        opset={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        ir_version=model.ir_version,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=[_tensor_info(v) for v in g.input],
        outputs=[_tensor_info(v) for v in g.output],
        precision=_PRECISION.get(dominant, dominant),
        initializer_elements=dict(elements.most_common()),
        num_parameters=sum(v for k, v in elements.items() if k in floats),
        op_counts=dict(ops.most_common()),
        num_nodes=len(g.node),
        external_data=external,
        size_bytes=size,
        metadata={p.key: p.value for p in model.metadata_props},
    )


def _dims(t: TensorInfo) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in t.dims) + "]"


def format_summary(s: GraphSummary) -> str:
    """Human-readable summary (the CLI's default output)."""
    lines = [f"file       {s.path} ({s.size_bytes / 1e6:.1f} MB{', external data' if s.external_data else ''})",
             "opset      " + ", ".join(f"{d} {v}" for d, v in s.opset.items()) + f"  (IR {s.ir_version}, "
             f"{s.producer or 'unknown producer'})",
             f"precision  {s.precision}  (weights: " + ", ".join(f"{k} {v:,}" for k, v in
                                                               s.initializer_elements.items()) + ")"]
    for title, tensors in (("inputs", s.inputs), ("outputs", s.outputs)):
        lines.append(f"{title}")
        for t in tensors:
            dyn = ", ".join(str(d) for d in t.dynamic) or "none"
            lines.append(f"  {t.name:<10} {t.dtype:<8} {_dims(t):<48} dynamic: {dyn}")
    lines.append(f"nodes      {s.num_nodes}")
    for op, n in s.op_counts.items():
        lines.append(f"  {op:<24} {n}")
    if s.metadata:
        lines.append("metadata   " + ", ".join(f"{k}={v}" for k, v in sorted(s.metadata.items())))
    return "\n".join(lines)
