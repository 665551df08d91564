"""The ``tensorrt`` runtime backend: engines of an engine directory behind the :class:`cvvae.runtime.backends.Backend`
interface (``encoder(video) -> moments``, ``decoder(latent) -> video``, float32 torch tensors).

* Loading refuses stale or foreign engines (:mod:`cvvae.engines.sidecar`, :mod:`cvvae.engines.engine_check`):
  another TensorRT version, GPU or compute capability than the sidecar records, a graph whose sha256 no longer
  matches the export, a plan file whose sha256 is not the recorded one, or I/O tensors and profiles that differ from
  the sidecar and the export. An engine built with the printed trtexec command is checked at its first load and its
  sha256 recorded then (docs/engines.md, "Engines built with trtexec").
* One execution context per engine; the optimization profile is chosen per call (the smallest profile containing the
  chunk/tile shape, :func:`cvvae.engines.profile.choose_profile`) and switched only when it changes.
* Device buffers are torch CUDA tensors (``set_tensor_address(name, tensor.data_ptr())``). The work is enqueued
  (``execute_async_v3``) on the engine's own torch CUDA stream, which waits for torch's current stream and makes it
  wait in turn, so results are ordered with the surrounding torch code without a host sync (TensorRT warns about,
  and synchronizes around, the legacy default stream). A CUDA input is used in place (zero copy) when it already
  has the engine's dtype and is contiguous.
* Inputs are cast to the engine's I/O dtype (fp16 graphs take fp16); outputs are returned as float32, on the input's
  device (a CPU tile comes back on the CPU, a CUDA tile stays on the GPU).

TensorRT is imported only when a backend is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cvvae.config import ModelConfig
from cvvae.errors import BackendUnavailableError, InputError
from cvvae.plan import PlanSettings
from cvvae.engines.engine_check import OpenedEngine, expected_io, open_engine
from cvvae.engines.profile import Profile, choose_profile
from cvvae.engines.sidecar import (EngineDirManifest, EngineEnvironment, current_environment, load_engine_dir,
                                   rebuild_command)

log = logging.getLogger(__name__)

# engine I/O dtype (cvvae.engines.engine_check.TRT_DTYPES names) -> torch dtype
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
                "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


@dataclass
class TrtEngine:
    """One deserialized engine with its execution context, profiles and I/O tensors."""

    path: Path
    engine: Any
    context: Any
    profiles: list[Profile]
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, torch.dtype]
    dims: dict[str, list[Any]]             # manifest dims per tensor (axis names), for error messages
    device: torch.device
    stream: Any = None                     # torch.cuda.Stream the engine runs on (TensorRT dislikes the default one)
    active_profile: int | None = None
    tolerated: list[str] = field(default_factory=list)

    @classmethod
    def from_opened(cls, opened: OpenedEngine, path: Path, device: torch.device) -> "TrtEngine":
        """Wrap an engine that passed :func:`cvvae.engines.engine_check.open_engine` (I/O and profiles checked)."""
        io = opened.io
        dtypes = {}
        for n, t in io.tensors.items():
            if t["dtype"] not in TORCH_DTYPES:
                raise BackendUnavailableError(f"{path}: tensor {n!r} has dtype {t['dtype']}, which torch lacks")
            dtypes[n] = TORCH_DTYPES[t["dtype"]]
        engine = opened.engine
        with torch.cuda.device(device):
            context = engine.create_execution_context()
        profiles = [Profile.from_dict(p) for p in opened.sidecar.profiles]
        dims = {n: list(t.get("dims", [])) for n, t in opened.sidecar.io.items()}
        stream = torch.cuda.Stream(device=device)
        return cls(path, engine, context, profiles, io.inputs, io.outputs, dtypes, dims, device, stream,
                   tolerated=opened.tolerated)

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on ``feeds`` (name -> tensor); outputs as float32 on the device of the first input."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name} needs input(s) {', '.join(missing)}; got {', '.join(feeds)}")
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        index = choose_profile(self.profiles, shapes, engine=self.path.name, axis_names=self.dims)
        home = next(iter(feeds.values())).device
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device):
            if index != self.active_profile:
                if not self.context.set_optimization_profile_async(index, self.stream.cuda_stream):
                    raise BackendUnavailableError(f"{self.path.name}: TensorRT refused optimization profile {index}")
                self.active_profile = index
            keep = []  # device inputs stay referenced until the work is enqueued
            # buffers are made on torch's current stream; the engine's stream waits for them, and torch's current
            # stream waits for the engine, so everything after this call (frees included) is ordered after it
            for n in self.inputs:
                x = feeds[n].to(self.device, self.dtypes[n], non_blocking=True).contiguous()
                keep.append(x)
                if not self.context.set_input_shape(n, tuple(x.shape)):
                    raise InputError(f"{self.path.name}: TensorRT rejected shape {tuple(x.shape)} for {n!r}")
                self.context.set_tensor_address(n, x.data_ptr())
            outputs = {}
            for n in self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise InputError(f"{self.path.name}: output {n!r} shape {shape} is not determined by the inputs")
                y = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
                self.context.set_tensor_address(n, y.data_ptr())
                outputs[n] = y
            self.stream.wait_stream(current)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendUnavailableError(f"{self.path.name}: TensorRT failed to enqueue the inference")
            current.wait_stream(self.stream)
        return {n: y.to(home, torch.float32) for n, y in outputs.items()}


@dataclass
class TensorRTBackend:
    """Encoder and decoder engines of one precision from an engine directory (``cvvae build-engines``)."""

    engine_dir: Path
    manifest: EngineDirManifest
    encoder_engine: TrtEngine | None
    decoder_engine: TrtEngine | None
    precision: str
    environment: EngineEnvironment
    runtime: Any = field(default=None, repr=False)   # the trt.Runtime must outlive its engines
    name: str = "tensorrt"

    @classmethod
    def load(cls, engine_dir: str | Path, *, device: str = "cuda", precision: str = "fp16",
             components: tuple[str, ...] = ("encoder", "decoder")) -> "TensorRTBackend":
        from cvvae.runtime.backends import lazy_import

        trt = lazy_import("tensorrt", "the tensorrt backend")  # first: without TensorRT nothing else matters
        engine_dir = Path(engine_dir)
        manifest = load_engine_dir(engine_dir)
        for component in components:
            manifest.engine_path(component, precision)  # raises, listing the engines there are
        kind, _, index = str(device).partition(":")
        if kind != "cuda":
            raise InputError(f"the tensorrt backend runs on cuda[:N], not {device!r}")
        env = current_environment(int(index or 0))
        torch_device = torch.device("cuda", int(index or 0))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines: dict[str, TrtEngine | None] = {}
        for component in ("encoder", "decoder"):
            if component not in components:
                engines[component] = None
                continue
            engines[component] = load_checked(trt, runtime, manifest, component, precision, env, torch_device)
        return cls(engine_dir, manifest, engines["encoder"], engines["decoder"], precision, env, runtime)

    @property
    def config(self) -> ModelConfig:
        return self.manifest.export_manifest().model_config()

    @property
    def plan_settings(self) -> PlanSettings:
        return self.manifest.export_manifest().plan_settings()

    @property
    def identity(self) -> dict[str, Any]:
        from cvvae.latent_io import identity

        checkpoint = self.manifest.checkpoint
        return identity(self.config, checkpoint.get("sha256"), checkpoint.get("source"))

    def _engine(self, component: str) -> TrtEngine:
        engine = getattr(self, f"{component}_engine")
        if engine is None:
            raise InputError(f"the {component} engine was not loaded; pass components including {component!r}")
        return engine

    def encoder(self, video: torch.Tensor) -> torch.Tensor:
        engine = self._engine("encoder")
        out = engine({engine.inputs[0]: video})
        return torch.cat([out["mean"], out["logvar"]], dim=1)

    def decoder(self, latent: torch.Tensor) -> torch.Tensor:
        engine = self._engine("decoder")
        return engine({engine.inputs[0]: latent})[engine.outputs[0]]


def load_checked(trt: Any, runtime: Any, manifest: EngineDirManifest, component: str, precision: str,
                 env: EngineEnvironment, device: torch.device) -> TrtEngine:
    """Load one engine after checking it against its sidecar, the running TensorRT/GPU and the export
    (:func:`cvvae.engines.engine_check.open_engine`; a trtexec engine's first load records its sha256)."""
    path = manifest.engine_path(component, precision)
    hint = rebuild_command(manifest.export.get("dir"), manifest.directory, precision)
    if not path.exists():
        raise BackendUnavailableError(f"{path} is listed in {manifest.directory}/manifest.json but missing; {hint}")

    def deserialize(data: bytes) -> Any:
        with torch.cuda.device(device):
            return runtime.deserialize_cuda_engine(data)

    opened = open_engine(path, trt=trt, deserialize=deserialize, environment=env,
                         expected_onnx_sha256=manifest.expected_onnx_sha256(component, precision),
                         export_io=expected_io(manifest.export_manifest(), component, precision), rebuild_hint=hint)
    for mismatch in opened.tolerated:
        log.warning("%s: %s (loaded anyway)", path.name, mismatch)
    return TrtEngine.from_opened(opened, path, device)


def load_tensorrt_backend(path: str | Path, **kwargs: Any) -> TensorRTBackend:
    """What ``BACKENDS["tensorrt"]`` calls (registered lazily in :mod:`cvvae.runtime.backends`)."""
    if path is None:
        raise InputError("the tensorrt backend needs an engine directory (build one with `cvvae build-engines`)")
    return TensorRTBackend.load(path, **kwargs)
