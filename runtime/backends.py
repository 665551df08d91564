"""Inference backends behind one small interface (:class:`cvvae.backend.Backend`; spec section 6 executed by
cvvae.tiling): PyTorch, ONNX Runtime, and the registry that also names the TensorRT engines (:mod:`cvvae.engines`).

A backend runs the two components on one tile: ``encoder(video) -> moments`` (mean and logvar concatenated on the
channel axis, raw, before the logvar clamp) and ``decoder(latent) -> video``, as float32 arrays of the family it was
given (numpy in, numpy out; torch or CuPy on a GPU in, the same out; see :mod:`cvvae.arrays`). Padding,
chunking, tiling and blending are the scheduler's job, so every backend runs the same plan. Optional packages (torch,
onnxruntime-gpu, tensorrt, CuPy) are imported lazily; asking for a missing one says what to install.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import arrays
from ..arrays import Array
from ..backend import GraphFileBackend
from ..config import ModelConfig
from ..errors import BackendUnavailableError, ExportError, InputError
from ..extras import INSTALL_HINTS, is_installed, lazy_import, require
from ..onnxrt import ORT_DTYPES, ort_session
from ..plan import PlanSettings

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "OnnxRuntimeBackend", "TorchBackend", "available_backends", "default_backend"]

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a precision name (imports torch: torch backend only)."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[precision])


def default_backend() -> str:
    """``torch`` where PyTorch is installed, else ``onnxruntime`` (the torch-free base install)."""
    return "torch" if is_installed("torch") else "onnxruntime"


@dataclass
class TorchBackend:
    """The PyTorch reference model (CPU or CUDA; fp32, fp16 or bf16)."""

    model: Any
    precision: str = "fp32"
    name: str = "torch"

    @classmethod
    def load(cls, path: str | Path | None, *, device: str = "cpu", precision: str = "fp32",
             preset: str | None = None) -> "TorchBackend":
        require("torch", "the torch backend")
        from ..loading import load_model

        if precision not in TORCH_DTYPE_NAMES:
            raise InputError(f"torch backend precision must be one of {sorted(TORCH_DTYPE_NAMES)}, not {precision!r}")
        model = load_model(path, preset=preset, device=device, dtype=torch_dtype(precision))
        return cls(model, precision)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def identity(self) -> dict[str, Any]:
        from ..latent_io import model_identity

        return model_identity(self.model)

    @property
    def plan_settings(self) -> PlanSettings:
        return PlanSettings.from_config(self.config)

    @property
    def device(self) -> Any:
        return self.model.device

    def _run(self, module: Any, x: Array) -> Array:
        import torch

        t = x if arrays.is_torch_array(x) else torch.from_dlpack(arrays.contiguous(x)) if arrays.on_cuda(x) \
            else torch.from_numpy(arrays.to_numpy(x))
        with torch.no_grad():
            y = module(t.to(self.model.device, self.model.dtype)).float()
        return arrays.like(y, x)

    def encoder(self, video: Array) -> Array:
        return self._run(self.model.encoder, video)

    def decoder(self, latent: Array) -> Array:
        return self._run(self.model.decoder, latent)


ORT_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class OrtComponent:
    """One ONNX graph in an InferenceSession.

    Host arrays run through ``session.run`` on numpy (zero-copy for numpy and CPU torch tensors). On the CUDA and
    TensorRT providers, device arrays (torch, CuPy, any ``__cuda_array_interface__``/DLPack array) are bound in place
    with IOBinding, and the outputs are allocated in the caller's array family on the same device and bound too, so
    nothing crosses to the host. ``output_shapes`` gives each output's shape for an input shape.
    """

    def __init__(self, path: Path, providers: list[Any], threads: int | None = None,
                 output_shapes: Callable[[tuple[int, ...]], list[tuple[int, ...]]] | None = None,
                 cpu_mem_arena: bool = True) -> None:
        self.path = Path(path)
        try:
            self.session = ort_session(path, threads=threads, providers=providers, arena=cpu_mem_arena,
                                       log_severity=2, feature="the onnxruntime backend")
        except BackendUnavailableError:
            raise
        except Exception as e:  # onnxruntime's errors derive from Exception only (InvalidProtobuf, Fail, ...)
            raise ExportError(f"cannot load ONNX graph {path}: {_first_line(e)}; the file is damaged or not an "
                              "ONNX model: re-export into a fresh directory (cvvae export)") from e
        self.inputs = self.session.get_inputs()
        self.outputs = [o.name for o in self.session.get_outputs()]
        if len(self.inputs) != 1 or self.inputs[0].type not in ORT_DTYPES:
            found = ", ".join(f"{i.name}: {i.type}" for i in self.inputs) or "none"
            raise ExportError(f"ONNX graph {path} takes ({found}); a CV-VAE component takes one float tensor")
        self.output_dtypes = [ORT_DTYPES[o.type] for o in self.session.get_outputs()]
        self.input_dtype = ORT_DTYPES[self.inputs[0].type]
        self.output_shapes = output_shapes
        self.on_cuda = self.session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    def check_contract(self, component: str, channels: int) -> None:
        """Refuse a graph that is not this component of this model (e.g. encoder and decoder files swapped)."""
        from ..export import contract

        want_in, want_out = ((contract.ENCODER_INPUT, contract.ENCODER_OUTPUTS) if component == contract.ENCODER
                             else (contract.DECODER_INPUT, (contract.DECODER_OUTPUT,)))
        got_in, got_out = self.inputs[0].name, tuple(self.outputs)
        shape = self.inputs[0].shape
        if got_in != want_in or got_out != tuple(want_out):
            raise ExportError(
                f"{self.path} is not the {component} graph: it maps {got_in!r} -> {', '.join(got_out)}, the "
                f"{component} maps {want_in!r} -> {', '.join(want_out)}; were graph files swapped or copied from "
                "elsewhere? Re-export into a fresh directory")
        if len(shape) != 5 or shape[1] != channels:
            raise ExportError(
                f"{self.path} takes {want_in!r} of shape {shape}, but this model's {component} takes (B, {channels}, "
                "T, H, W); the graph belongs to another model: re-export into a fresh directory")

    def __call__(self, x: Array) -> list[Array]:
        if self.on_cuda and arrays.on_cuda(x):
            return self._run_bound(x)
        feed = np.ascontiguousarray(arrays.to_numpy(x, self.input_dtype))
        try:
            results = self.session.run(self.outputs, {self.inputs[0].name: feed})
        except BackendUnavailableError:
            raise
        except Exception as e:  # onnxruntime's errors derive from Exception only
            raise ExportError(f"ONNX Runtime failed running {self.path.name} on an input of shape "
                              f"{tuple(feed.shape)}: {_first_line(e)}") from e
        return [arrays.like(r.astype(np.float32, copy=False), x) for r in results]

    def _run_bound(self, x: Array) -> list[Array]:
        """Device input bound in place; outputs allocated like ``x`` on its device and bound (no host copies)."""
        if self.output_shapes is None:
            raise InputError("device arrays need the output shapes of this graph; load it through a backend")
        xp = arrays.namespace(x)
        index = arrays.cuda_device_index(x)
        x = arrays.contiguous(xp.astype(x, getattr(xp, np.dtype(self.input_dtype).name), copy=False))
        binding = self.session.io_binding()
        binding.bind_input(self.inputs[0].name, "cuda", index, self.input_dtype, tuple(x.shape),
                           arrays.data_pointer(x))
        outputs = []
        for name, dtype, shape in zip(self.outputs, self.output_dtypes, self.output_shapes(tuple(x.shape))):
            y = xp.empty(shape, dtype=getattr(xp, np.dtype(dtype).name), device=arrays.array_device(x))
            binding.bind_output(name, "cuda", index, dtype, shape, arrays.data_pointer(y))
            outputs.append(y)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return [xp.astype(y, xp.float32, copy=False) for y in outputs]


@dataclass
class OnnxRuntimeBackend(GraphFileBackend):
    """Exported ONNX graphs (see cvvae.export) in ONNX Runtime: CPU, or CUDA / TensorRT providers of onnxruntime-gpu."""

    export_dir: Path
    manifest: Any
    encoder_graph: OrtComponent | None
    decoder_graph: OrtComponent | None
    precision: str
    name: str = "onnxruntime"

    @classmethod
    def load(cls, export_dir: str | Path, *, device: str = "cpu", precision: str = "fp32",
             components: tuple[str, ...] = ("encoder", "decoder"), threads: int | None = None,
             providers: list[Any] | None = None, stream: Any = None,
             cpu_mem_arena: bool = True) -> "OnnxRuntimeBackend":
        """Sessions for the graphs of ``export_dir``; ``stream`` (CUDA/TensorRT providers) is the caller's CUDA stream
        (a raw ``cudaStream_t`` int, or a torch/CuPy stream) that ONNX Runtime then computes on."""
        from ..export.manifest import load_manifest

        ort = lazy_import("onnxruntime", "the onnxruntime backend")
        export_dir = Path(export_dir)
        manifest = load_manifest(export_dir)
        providers = providers or ort_providers(ort, device, stream=stream)
        cfg = manifest.model_config()
        shapes = {"encoder": lambda s: [cfg.encoded_shape(s)] * 2, "decoder": lambda s: [cfg.decoded_shape(s)]}

        def load_graph(component: str) -> OrtComponent:
            available = manifest.precisions(component)
            if precision not in available:
                raise InputError(
                    f"{export_dir} has no {precision} {component} graph (it has: {', '.join(available) or 'none'}); "
                    f"export it with `cvvae export --precisions {precision}`"
                )
            graph = OrtComponent(manifest.graph_path(component, precision), providers, threads,
                                 output_shapes=shapes[component], cpu_mem_arena=cpu_mem_arena)
            graph.check_contract(component, cfg.in_channels if component == "encoder" else cfg.latent_channels)
            return graph

        graphs = cls.load_parts(components, load_graph)
        return cls(export_dir, manifest, graphs["encoder"], graphs["decoder"], precision)

    def export_manifest(self) -> Any:
        return self.manifest


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's can span many)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def stream_pointer(stream: Any) -> int:
    """The ``cudaStream_t`` of a torch stream (``cuda_stream``), a CuPy stream (``ptr``) or a raw int."""
    for attr in ("cuda_stream", "ptr", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


def ort_providers(ort: Any, device: str, *, stream: Any = None) -> list[Any]:
    """Execution providers for a device string: cpu, cuda[:N], tensorrt[:N]; ``stream`` sets user_compute_stream."""
    kind, _, index = device.partition(":")
    available = ort.get_available_providers()
    wanted = {"cpu": [], "cuda": ["CUDAExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}.get(kind)
    if wanted is None:
        raise InputError(f"device {device!r} is not one of cpu, cuda[:N], tensorrt[:N] for the onnxruntime backend")
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendUnavailableError(
            f"ONNX Runtime here offers {', '.join(available)}; {', '.join(missing)} needs onnxruntime-gpu "
            "(uninstall onnxruntime first: the two must not be installed together)"
        )
    options: dict[str, Any] = {"device_id": int(index or 0)}
    if stream is not None:
        if kind == "cpu":
            raise InputError("a CUDA stream was given, but the device is cpu; pass device='cuda' or no stream")
        options["user_compute_stream"] = str(stream_pointer(stream))  # ONNX Runtime docs: the pointer as a string
    return [(p, options) for p in wanted] + ["CPUExecutionProvider"]


def load_tensorrt(path: str | Path, **kwargs: Any) -> Any:
    """TensorRT engines (cvvae.engines), imported only when asked for."""
    from ..engines.trt_backend import load_tensorrt_backend

    return load_tensorrt_backend(path, **kwargs)


BACKENDS: dict[str, Callable[..., Any]] = {"torch": TorchBackend.load, "onnxruntime": OnnxRuntimeBackend.load,
                                           "tensorrt": load_tensorrt}


def available_backends() -> dict[str, str]:
    """Backend name -> 'ok' or the reason it is unavailable (for `cvvae doctor`)."""
    status = {"torch": "ok" if is_installed("torch") else INSTALL_HINTS["torch"]}
    status["onnxruntime"] = "ok" if is_installed("onnxruntime") else INSTALL_HINTS["onnxruntime"]
    if is_installed("tensorrt"):
        status["tensorrt"] = "ok" if cuda_device_count() else "tensorrt is installed but no CUDA GPU is visible"
    else:
        status["tensorrt"] = INSTALL_HINTS["tensorrt"]
    return status


def cuda_device_count() -> int:
    """Visible CUDA GPUs, asked of torch or CuPy, whichever is installed (0 when neither is)."""
    if is_installed("torch"):
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if is_installed("cupy"):
        import cupy

        try:
            return int(cupy.cuda.runtime.getDeviceCount())
        except Exception:  # noqa: BLE001 - CuPy raises its own CUDARuntimeError when no driver is present
            return 0
    return 0

