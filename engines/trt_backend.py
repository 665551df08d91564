"""The ``tensorrt`` runtime backend: engines of an engine directory behind the :class:`cvvae.backend.Backend`
interface (``encoder(video) -> moments``, ``decoder(latent) -> video``, float32 arrays of the caller's family). What
it shares with the ONNX Runtime backend (config, plan, identity, the component calls) is
:class:`cvvae.backend.GraphFileBackend`.

* Loading refuses stale or foreign engines (:mod:`cvvae.engines.sidecar`, :mod:`cvvae.engines.engine_check`):
  another TensorRT version, GPU or compute capability than the sidecar records, a graph whose sha256 no longer
  matches the export, a plan file whose sha256 is not the recorded one, or I/O tensors and profiles that differ from
  the sidecar and the export. An engine built with the printed trtexec command is checked at its first load and its
  sha256 recorded then (docs/engines.md, "Engines built with trtexec").
* One execution context per engine; the optimization profile is chosen per call (the smallest profile containing the
  chunk/tile shape, :func:`cvvae.engines.profile.choose_profile`) and switched only when it changes.
* Device buffers are CUDA arrays of torch where it is installed, else CuPy (:class:`cvvae.cuda_device.CudaDevice`;
  ``set_tensor_address(name, pointer)``). The work is enqueued (``execute_async_v3``) on the engine's own CUDA
  stream, which waits for the library's current stream and makes it wait in turn, so results are ordered with the
  caller's work without a host sync (TensorRT warns about, and synchronizes around, the legacy default stream). A
  CUDA input is used in place (zero copy) when it already has the engine's dtype and is contiguous; other device
  arrays (DLPack, ``__cuda_array_interface__``) are viewed, host arrays copied in.
* Inputs are cast to the engine's I/O dtype (fp16 graphs take fp16); outputs are returned as float32 in the input's
  family and on its device (a numpy tile comes back as numpy, a CUDA tile stays on the GPU).

TensorRT is imported only when a backend is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvvae import arrays
from cvvae.backend import GraphFileBackend
from cvvae.cuda_device import CudaDevice
from cvvae.errors import BackendUnavailableError, InputError
from cvvae.export.contract import DECODER_OUTPUT, ENCODER, ENCODER_OUTPUTS
from cvvae.engines.engine_check import OpenedEngine, expected_io, open_engine
from cvvae.engines.profile import Profile, choose_profile
from cvvae.engines.sidecar import (EngineDirManifest, EngineEnvironment, current_environment, load_engine_dir,
                                   rebuild_command)

log = logging.getLogger(__name__)

# engine I/O dtypes (cvvae.engines.engine_check.TRT_DTYPES names) the device buffers can hold
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")


@dataclass
class TrtEngine:
    """One deserialized engine with its execution context, profiles and I/O tensors."""

    path: Path
    engine: Any
    context: Any
    profiles: list[Profile]
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, str]                 # tensor name -> dtype name ("float16", ...)
    dims: dict[str, list[Any]]             # manifest dims per tensor (axis names), for error messages
    device: CudaDevice
    stream: Any = None                     # the CUDA stream the engine runs on (TensorRT dislikes the default one)
    active_profile: int | None = None
    tolerated: list[str] = field(default_factory=list)

    @classmethod
    def from_opened(cls, opened: OpenedEngine, path: Path, device: CudaDevice) -> "TrtEngine":
        """Wrap an engine that passed :func:`cvvae.engines.engine_check.open_engine` (I/O and profiles checked)."""
        io = opened.io
        dtypes = {}
        for n, t in io.tensors.items():
            if t["dtype"] not in SUPPORTED_DTYPES:
                raise BackendUnavailableError(f"{path}: tensor {n!r} has dtype {t['dtype']}, which is not supported")
            dtypes[n] = t["dtype"]
        engine = opened.engine
        with device.guard():
            context = engine.create_execution_context()
        profiles = [Profile.from_dict(p) for p in opened.sidecar.profiles]
        dims = {n: list(t.get("dims", [])) for n, t in opened.sidecar.io.items()}
        stream = device.new_stream()
        return cls(path, engine, context, profiles, io.inputs, io.outputs, dtypes, dims, device, stream,
                   tolerated=opened.tolerated)

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run on ``feeds`` (name -> array); outputs as float32 arrays like the first input (family and device)."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InputError(f"{self.path.name} needs input(s) {', '.join(missing)}; got {', '.join(feeds)}")
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        index = choose_profile(self.profiles, shapes, engine=self.path.name, axis_names=self.dims)
        home = next(iter(feeds.values()))
        cuda = self.device
        current = cuda.current_stream()
        with cuda.guard():
            if index != self.active_profile:
                if not self.context.set_optimization_profile_async(index, cuda.pointer(self.stream)):
                    raise BackendUnavailableError(f"{self.path.name}: TensorRT refused optimization profile {index}")
                self.active_profile = index
            keep = []  # device inputs stay referenced until the work is enqueued
            # buffers are made on the library's current stream; the engine's stream waits for them, and the current
            # stream waits for the engine, so everything after this call (frees included) is ordered after it
            for n in self.inputs:
                x = cuda.put(feeds[n], self.dtypes[n])
                keep.append(x)
                if not self.context.set_input_shape(n, tuple(x.shape)):
                    raise InputError(f"{self.path.name}: TensorRT rejected shape {tuple(x.shape)} for {n!r}")
                self.context.set_tensor_address(n, arrays.data_pointer(x))
            outputs = {}
            for n in self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise InputError(f"{self.path.name}: output {n!r} shape {shape} is not determined by the inputs")
                y = cuda.empty(shape, self.dtypes[n])
                self.context.set_tensor_address(n, arrays.data_pointer(y))
                outputs[n] = y
            cuda.wait(self.stream, current)
            if not self.context.execute_async_v3(cuda.pointer(self.stream)):
                raise BackendUnavailableError(f"{self.path.name}: TensorRT failed to enqueue the inference")
            cuda.wait(current, self.stream)
            xp = cuda.namespace
            return {n: arrays.like(xp.astype(y, xp.float32), home) for n, y in outputs.items()}


@dataclass
class TensorRTBackend(GraphFileBackend):
    """Encoder and decoder engines of one precision from an engine directory (``cvvae build-engines``)."""

    engine_dir: Path
    manifest: EngineDirManifest
    encoder_engine: TrtEngine | None
    decoder_engine: TrtEngine | None
    precision: str
    environment: EngineEnvironment
    runtime: Any = field(default=None, repr=False)   # the trt.Runtime must outlive its engines
    name: str = "tensorrt"
    part_kind = "engine"

    @classmethod
    def load(cls, engine_dir: str | Path, *, device: str = "cuda", precision: str = "fp16",
             components: tuple[str, ...] = ("encoder", "decoder")) -> "TensorRTBackend":
        from cvvae.extras import lazy_import

        trt = lazy_import("tensorrt", "the tensorrt backend")  # first: without TensorRT nothing else matters
        engine_dir = Path(engine_dir)
        manifest = load_engine_dir(engine_dir)
        for component in components:
            manifest.engine_path(component, precision)  # raises, listing the engines there are
        kind, _, index = str(device).partition(":")
        if kind != "cuda":
            raise InputError(f"the tensorrt backend runs on cuda[:N], not {device!r}")
        env = current_environment(int(index or 0))
        cuda = CudaDevice.open(int(index or 0))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines = cls.load_parts(components, lambda c: load_checked(trt, runtime, manifest, c, precision, env, cuda))
        return cls(engine_dir, manifest, engines["encoder"], engines["decoder"], precision, env, runtime)

    def export_manifest(self) -> Any:
        return self.manifest.export_manifest()

    def run(self, component: str, x: Any) -> list[Any]:
        """One engine on one tile; its outputs by the export contract's names (the load checked them)."""
        engine = self.part(component)
        out = engine({engine.inputs[0]: x})
        return [out[n] for n in (ENCODER_OUTPUTS if component == ENCODER else (DECODER_OUTPUT,))]


def load_checked(trt: Any, runtime: Any, manifest: EngineDirManifest, component: str, precision: str,
                 env: EngineEnvironment, device: CudaDevice) -> TrtEngine:
    """Load one engine after checking it against its sidecar, the running TensorRT/GPU and the export
    (:func:`cvvae.engines.engine_check.open_engine`; a trtexec engine's first load records its sha256)."""
    path = manifest.engine_path(component, precision)
    hint = rebuild_command(manifest.export.get("dir"), manifest.directory, precision)
    if not path.exists():
        raise BackendUnavailableError(f"{path} is listed in {manifest.directory}/manifest.json but missing; {hint}")

    def deserialize(data: bytes) -> Any:
        with device.guard():
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
