"""The ``tensorrt`` runtime backend: engines of an engine directory behind the :class:`cvvae.runtime.backends.Backend`
interface (``encoder(video) -> moments``, ``decoder(latent) -> video``, float32 torch tensors).

* Loading refuses stale or foreign engines (:mod:`cvvae.engines.sidecar`): a plan file whose sha256 is not the one its
  sidecar records (checked first, cached while the file is unchanged: :mod:`cvvae.integrity`), another TensorRT
  version, GPU or compute capability than the sidecar records, or a graph whose sha256 no longer matches the export.
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
from cvvae.engines.profile import Profile, choose_profile
from cvvae.engines.sidecar import (EngineDirManifest, EngineEnvironment, EngineSidecar, check_current,
                                   current_environment, load_engine_dir, rebuild_command)
from cvvae.integrity import check_sha256, file_sha256

log = logging.getLogger(__name__)

# TensorRT DataType name -> torch dtype (looked up by name, so this module imports without tensorrt)
TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}


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
    def load(cls, trt: Any, runtime: Any, path: Path, sidecar: EngineSidecar, device: torch.device) -> "TrtEngine":
        with torch.cuda.device(device):
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendUnavailableError(f"TensorRT could not deserialize {path}; rebuild it")
            context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        dtypes = {}
        for n in names:
            dt = engine.get_tensor_dtype(n)
            key = getattr(dt, "name", str(dt).split(".")[-1])
            if key not in TRT_TO_TORCH:
                raise BackendUnavailableError(f"{path}: tensor {n!r} has TensorRT dtype {key}, which torch lacks")
            dtypes[n] = TRT_TO_TORCH[key]
        profiles = [Profile.from_dict(p) for p in sidecar.profiles]
        if len(profiles) != engine.num_optimization_profiles:
            raise BackendUnavailableError(f"{path} has {engine.num_optimization_profiles} optimization profiles but "
                                          f"its sidecar lists {len(profiles)}; rebuild it")
        for k, p in enumerate(profiles):  # the sidecar must describe the engine it sits beside
            for n in inputs:
                got = tuple(tuple(int(v) for v in s) for s in engine.get_tensor_profile_shape(n, k))
                if got != (p[n].min, p[n].opt, p[n].max):
                    raise BackendUnavailableError(f"{path}: profile {k} of input {n!r} is {got} in the engine but "
                                                  f"{(p[n].min, p[n].opt, p[n].max)} in the sidecar; rebuild it")
        dims = {n: list(t.get("dims", [])) for n, t in sidecar.io.items()}
        stream = torch.cuda.Stream(device=device)
        return cls(path, engine, context, profiles, inputs, outputs, dtypes, dims, device, stream)

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
    """Load one engine after checking its sidecar against the running TensorRT/GPU and the export's graph."""
    path = manifest.engine_path(component, precision)
    hint = rebuild_command(manifest.export.get("dir"), manifest.directory, precision)
    if not path.exists():
        raise BackendUnavailableError(f"{path} is listed in {manifest.directory}/manifest.json but missing; {hint}")
    sidecar_file = path.with_name(path.name + ".json")
    sidecar = EngineSidecar.read(sidecar_file)
    # the plan file must be the one the sidecar describes before anything else is believed or deserialized
    check_sha256(path, sidecar.engine.get("sha256"), recorded_in=sidecar_file, fix=hint)
    tolerated = check_current(sidecar.to_dict(), env.as_dict(), engine=str(path), rebuild_hint=hint,
                              onnx_sha256=manifest.expected_onnx_sha256(component, precision),
                              engine_sha256=file_sha256(path))
    for mismatch in tolerated:
        log.warning("%s: %s (loaded anyway)", path.name, mismatch)
    engine = TrtEngine.load(trt, runtime, path, sidecar, device)
    engine.tolerated = [str(m) for m in tolerated]
    return engine


def load_tensorrt_backend(path: str | Path, **kwargs: Any) -> TensorRTBackend:
    """What ``BACKENDS["tensorrt"]`` calls (registered lazily in :mod:`cvvae.runtime.backends`)."""
    if path is None:
        raise InputError("the tensorrt backend needs an engine directory (build one with `cvvae build-engines`)")
    return TensorRTBackend.load(path, **kwargs)
