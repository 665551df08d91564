"""Inference backends behind one small interface (runtime issue, spec section 6 executed by cvvae.tiling).

A backend runs the two components on one tile: ``encoder(video) -> moments`` (mean and logvar concatenated on the
channel axis, raw, before the logvar clamp) and ``decoder(latent) -> video``, as float32 torch tensors on the CPU or
the backend's device. Padding, chunking, tiling and blending are the scheduler's job, so every backend runs the same
plan. Optional packages (onnxruntime-gpu, tensorrt) are imported lazily; asking for a missing one says what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import BackendUnavailableError, ExportError, InputError
from ..plan import PlanSettings

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT providers) - never both",
    "tensorrt": "install TensorRT 10/11 for Python (pip install tensorrt from NVIDIA's index) on a CUDA machine",
}


def lazy_import(module: str, feature: str) -> Any:
    """Import an optional package, or raise a BackendUnavailableError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = INSTALL_HINTS.get(module.split(".")[0], f"pip install {module}")
        raise BackendUnavailableError(f"{feature} needs the '{module}' package, which is not installed: {hint}") from e


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Backend(Protocol):
    """What the scheduler needs from a backend."""

    name: str
    precision: str
    config: ModelConfig
    plan_settings: PlanSettings
    identity: dict[str, Any]

    def encoder(self, video: torch.Tensor) -> torch.Tensor: ...

    def decoder(self, latent: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TorchBackend:
    """The PyTorch reference model (CPU or CUDA; fp32, fp16 or bf16)."""

    model: Any
    precision: str = "fp32"
    name: str = "torch"

    @classmethod
    def load(cls, path: str | Path | None, *, device: str = "cpu", precision: str = "fp32",
             preset: str | None = None) -> "TorchBackend":
        from ..loading import load_model

        if precision not in TORCH_DTYPES:
            raise InputError(f"torch backend precision must be one of {sorted(TORCH_DTYPES)}, not {precision!r}")
        model = load_model(path, preset=preset, device=device, dtype=TORCH_DTYPES[precision])
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
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encoder(self, video: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(video.to(self.model.device, self.model.dtype)).float()

    @torch.no_grad()
    def decoder(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(latent.to(self.model.device, self.model.dtype)).float()


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OrtComponent:
    """One ONNX graph in an InferenceSession; numpy in and out on CPU, IO binding with torch tensors on CUDA."""

    def __init__(self, path: Path, providers: list[Any], threads: int | None = None) -> None:
        ort = lazy_import("onnxruntime", "the onnxruntime backend")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime's errors derive from Exception only (InvalidProtobuf, Fail, ...)
            raise ExportError(f"cannot load ONNX graph {path}: {_first_line(e)}; the file is damaged or not an "
                              "ONNX model: re-export into a fresh directory (cvvae export)") from e
        self.inputs = self.session.get_inputs()
        self.outputs = [o.name for o in self.session.get_outputs()]
        if len(self.inputs) != 1 or self.inputs[0].type not in ORT_DTYPES:
            found = ", ".join(f"{i.name}: {i.type}" for i in self.inputs) or "none"
            raise ExportError(f"ONNX graph {path} takes ({found}); a CV-VAE component takes one float tensor")
        self.input_dtype = ORT_DTYPES[self.inputs[0].type]
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

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.on_cuda and x.is_cuda:
            return self._run_bound(x)
        array = np.ascontiguousarray(x.detach().cpu().numpy().astype(self.input_dtype, copy=False))
        try:
            results = self.session.run(self.outputs, {self.inputs[0].name: array})
        except Exception as e:  # onnxruntime's errors derive from Exception only
            raise ExportError(f"ONNX Runtime failed running {self.path.name} on an input of shape "
                              f"{tuple(array.shape)}: {_first_line(e)}") from e
        return [torch.from_numpy(r).float() for r in results]

    def _run_bound(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Zero-copy input from a CUDA torch tensor; outputs stay on the device and come back through DLPack."""
        x = x.to(torch.float16 if self.input_dtype == np.float16 else torch.float32).contiguous()
        binding = self.session.io_binding()
        binding.bind_input(self.inputs[0].name, "cuda", x.device.index or 0, self.input_dtype, tuple(x.shape),
                           x.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, "cuda", x.device.index or 0)
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(v.to_dlpack()).float() for v in binding.get_outputs()]


@dataclass
class OnnxRuntimeBackend:
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
             providers: list[Any] | None = None) -> "OnnxRuntimeBackend":
        from ..export.manifest import load_manifest

        ort = lazy_import("onnxruntime", "the onnxruntime backend")
        export_dir = Path(export_dir)
        manifest = load_manifest(export_dir)
        providers = providers or ort_providers(ort, device)
        graphs = {}
        for component in ("encoder", "decoder"):
            if component not in components:
                graphs[component] = None
                continue
            available = manifest.precisions(component)
            if precision not in available:
                raise InputError(
                    f"{export_dir} has no {precision} {component} graph (it has: {', '.join(available) or 'none'}); "
                    f"export it with `cvvae export --precisions {precision}`"
                )
            graphs[component] = OrtComponent(manifest.graph_path(component, precision), providers, threads)
            config = manifest.model_config()
            graphs[component].check_contract(
                component, config.in_channels if component == "encoder" else config.latent_channels)
        return cls(export_dir, manifest, graphs["encoder"], graphs["decoder"], precision)

    @property
    def config(self) -> ModelConfig:
        return self.manifest.model_config()

    @property
    def plan_settings(self) -> PlanSettings:
        return self.manifest.plan_settings()

    @property
    def identity(self) -> dict[str, Any]:
        from ..latent_io import identity

        return identity(self.config, self.manifest.checkpoint.get("sha256"), self.manifest.checkpoint.get("source"))

    def _graph(self, component: str) -> OrtComponent:
        graph = getattr(self, f"{component}_graph")
        if graph is None:
            raise InputError(f"the {component} graph was not loaded; pass components including {component!r}")
        return graph

    def encoder(self, video: torch.Tensor) -> torch.Tensor:
        mean, logvar = self._graph("encoder")(video)
        return torch.cat([mean, logvar], dim=1)

    def decoder(self, latent: torch.Tensor) -> torch.Tensor:
        return self._graph("decoder")(latent)[0]


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's can span many)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def ort_providers(ort: Any, device: str) -> list[Any]:
    """Execution providers for a device string: cpu, cuda[:N], tensorrt[:N]."""
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
    options = {"device_id": int(index or 0)}
    return [(p, options) for p in wanted] + ["CPUExecutionProvider"]


def load_tensorrt(path: str | Path, **kwargs: Any) -> Any:
    """TensorRT engines (cvvae.engines), imported only when asked for."""
    from ..engines.trt_backend import load_tensorrt_backend

    return load_tensorrt_backend(path, **kwargs)


BACKENDS: dict[str, Callable[..., Any]] = {"torch": TorchBackend.load, "onnxruntime": OnnxRuntimeBackend.load,
                                           "tensorrt": load_tensorrt}


def available_backends() -> dict[str, str]:
    """Backend name -> 'ok' or the reason it is unavailable (for `cvvae doctor`)."""
    status = {"torch": "ok"}
    status["onnxruntime"] = "ok" if is_installed("onnxruntime") else INSTALL_HINTS["onnxruntime"]
    if is_installed("tensorrt"):
        status["tensorrt"] = "ok" if torch.cuda.is_available() else "tensorrt is installed but no CUDA GPU is visible"
    else:
        status["tensorrt"] = INSTALL_HINTS["tensorrt"]
    return status

