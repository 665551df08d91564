"""The one place ONNX Runtime sessions are made (runtime backend, export verification, the fp16 rule's range
measurement, INT8 sensitivity search, the bench's GEMM peak): spec "Runtime backends" and "Export verification".

Every caller needs a few of the same options; spelling them out here keeps them consistent (threads, log level,
the CPU memory arena, graph optimisation) and keeps ``onnxruntime`` an optional import with an install hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError
from .extras import lazy_import

# ONNX Runtime's type strings of the float tensors a CV-VAE graph takes or returns
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
CPU = ("CPUExecutionProvider",)


def ort_session(model: str | Path | bytes, *, threads: int | None = None, providers: Sequence[Any] = CPU,
                arena: bool = True, optimization: str = "all", log_severity: int = 3,
                feature: str = "ONNX Runtime") -> Any:
    """An ``onnxruntime.InferenceSession`` of a graph file or of serialized graph bytes (graphs under 2 GB).

    ``threads``: intra-op threads (None: ONNX Runtime's default, one per core). ``providers``: names or
    ``(name, options)`` pairs, in order of preference. ``arena``: ONNX Runtime's CPU memory arena, which keeps every
    size it ever served (8.2 GiB peak on the README job vs 2.4 GiB without, issue 16); the runtime turns it off under
    a memory budget, where glibc's raised thresholds (:mod:`cvvae.allocator`) keep the reuse instead.
    ``optimization``: one of :data:`OPTIMIZATION_LEVELS` ("disable" runs the graph as written, e.g. to read every
    intermediate tensor). ``log_severity``: 0 verbose ... 3 errors only, 4 fatal.
    """
    ort = lazy_import("onnxruntime", feature)
    if optimization not in OPTIMIZATION_LEVELS:
        raise InputError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = log_severity
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=list(providers))


__all__ = ["CPU", "ORT_DTYPES", "OPTIMIZATION_LEVELS", "ort_session"]
