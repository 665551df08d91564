"""Build strongly typed TensorRT engines from an export directory, or print the equivalent ``trtexec`` lines.

One :class:`EngineBuilder` per engine holds everything that decides the engine in one place: the ONNX graph (its
precision variant and sha256), the optimization profiles, the timing cache and the :class:`BuildOptions`. It can

* ``trtexec_command()``: the equivalent ``trtexec`` line (pure; works without TensorRT);
* ``build()``: parse, add the profiles, build with the TensorRT Python API (imported lazily, here only).

Precision lives in the graph (TensorRT 10.12+ deprecates the FP16/INT8 builder flags; TensorRT 11 is always strongly
typed): ``--precision fp16`` picks ``encoder.fp16.onnx`` from the export and the network is created STRONGLY_TYPED.

:func:`build_engines` builds every component into an engine directory: ``<component>.<precision>.plan``, its JSON
sidecar, a timing cache and the directory's ``manifest.json``; engines that are current are kept, engines built from
something else are refused unless ``rebuild=True``.

Memory estimate (:func:`estimate_memory`, printed before each build, at the largest shape of all profiles)::

    total ~ weights + I/O + activations
    weights      = the ONNX file size (the engine holds the same weights, in the graph's dtypes)
    I/O          = input and output tensors at max shape, in the engine's I/O dtypes
    activations  = 3 x the largest feature map + the mid-block attention score matrix
                   (a resnet block holds its input for the residual, a normalized copy and the conv output at once;
                   TensorRT reuses every other buffer; the spatial attention scores are B*T*(h*w)^2 unless fused)

Feature maps are walked level by level from the model config (channels x frames x height x width per resolution
level, in the compute dtype: 2 bytes for fp16/bf16/int8 graphs, 4 for fp32). It is an estimate, not a measurement:
the convolution workspace (``--workspace-mb``) comes on top, and TensorRT may fuse or split layers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cvvae.errors import EngineBuildError
from cvvae.fsutil import atomic_path, sha256_file
from cvvae.engines.engine_check import expected_io
from cvvae.integrity import member_path
from cvvae.engines.profile import Profile, ProfileSpec, coverage_warnings, default_spec, resolve_profiles
from cvvae.engines.sidecar import (EngineDirManifest, EngineEnvironment, EngineSidecar, Mismatch,
                                   StaleEngineError, cvvae_version, engine_filename, is_engine_dir, load_engine_dir,
                                   now_utc, rebuild_command, sidecar_path, stale_message, stale_reasons)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

DEFAULT_TIMING_CACHE = "timing.timing_cache"
COMPUTE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 2}   # int8 graphs keep fp16 between their Q/DQ pairs
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}


# ----- options --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    """Builder settings besides profiles and precision (those belong to each :class:`EngineBuilder`)."""

    workspace_mb: int | None = None   # WORKSPACE pool limit in MiB; None: TensorRT's default (the device's memory)
    opt_level: int = 3                # builder_optimization_level 0-5 (TensorRT's default 3; 5 tries the most tactics)
    timing_cache: Path | None = None  # None: <engine dir>/timing.timing_cache
    tf32: bool = False                # let fp32 convolutions/matmuls use TF32 (faster, ~1e-3 relative error)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise EngineBuildError(f"opt_level={self.opt_level} must be 0-5 (TensorRT's builder_optimization_level)")
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise EngineBuildError(f"workspace_mb={self.workspace_mb} must be a positive number of MiB")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timing_cache"] = None if self.timing_cache is None else str(self.timing_cache)
        return d


# ----- memory estimate ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes an engine needs at one shape (see the module docstring for the rule)."""

    shape: dict[str, list[int]]
    weights_bytes: int
    io_bytes: int
    feature_map_bytes: int        # the largest one
    feature_map: str              # where it is: "level 0: 32ch x 17f x 64x64"
    attention_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.io_bytes + self.activation_bytes

    def describe(self) -> str:
        mib = 1 << 20
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in self.shape.items())
        return (f"~{self.total_bytes / mib:,.0f} MiB at max shape {shapes}: weights {self.weights_bytes / mib:,.1f} "
                f"+ I/O {self.io_bytes / mib:,.1f} + activations {self.activation_bytes / mib:,.1f} MiB "
                f"(3 x largest map {self.feature_map_bytes / mib:,.1f} MiB at {self.feature_map}, attention "
                f"{self.attention_bytes / mib:,.1f} MiB); conv workspace comes on top")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _feature_maps(cfg: Any, component: str, shape: Sequence[int]) -> tuple[list[tuple[str, int]], int]:
    """(description, elements) of each resolution level's largest map, and the attention score elements."""
    w = cfg.widths
    n = len(w)
    maps: list[tuple[str, int]] = []
    b = shape[0]
    if component == "encoder":
        sizes = cfg.encoder_level_sizes(*shape[2:])
        for i, (t, h, wd) in enumerate(sizes):
            c = max(w[i - 1] if i else w[0], w[i])
            maps.append((f"level {i}: {c}ch x {t}f x {h}x{wd}", b * c * t * h * wd))
    else:
        sizes = cfg.decoder_level_sizes(*shape[2:])
        for k, i in enumerate(reversed(range(n))):
            t, h, wd = sizes[k]
            c = max(w[min(i + 1, n - 1)], w[i])
            maps.append((f"level {i}: {c}ch x {t}f x {h}x{wd}", b * c * t * h * wd))
            if i > 0:
                t, h, wd = sizes[k + 1]
                maps.append((f"upsample {i}: {w[i]}ch x {t}f x {h}x{wd}", b * w[i] * t * h * wd))
    # mid-block spatial attention at the lowest resolution: one head, (h*w)^2 scores per frame
    low_t, low_h, low_w = sizes[-1] if component == "encoder" else sizes[0]
    return maps, b * low_t * (low_h * low_w) ** 2


def _output_shapes(cfg: Any, component: str, shape: Sequence[int], outputs: Sequence[Any]) -> dict[str, list[int]]:
    out = cfg.encoded_shape(shape) if component == "encoder" else cfg.decoded_shape(shape)
    return {o.name: list(out) for o in outputs}


def estimate_memory(manifest: Any, component: str, precision: str, profiles: Sequence[Profile]) -> MemoryEstimate:
    """Estimate of the memory one engine needs at the largest max shape of ``profiles`` (rule: module docstring)."""
    cfg = manifest.model_config()
    entry = manifest.component(component)
    graph = manifest.graph_file(component, precision)
    (name,) = entry.input_names  # both components have one input
    shape = max((p[name].max for p in profiles), key=math.prod)
    io_dtypes = graph.io_dtypes
    shapes = {name: list(shape), **_output_shapes(cfg, component, shape, entry.outputs)}
    io_bytes = sum(math.prod(s) * DTYPE_BYTES.get(io_dtypes.get(n, "float32"), 4) for n, s in shapes.items())
    maps, attention = _feature_maps(cfg, component, shape)
    where, largest = max(maps, key=lambda m: m[1])
    per = COMPUTE_BYTES.get(precision, 4)
    return MemoryEstimate(shape={name: list(shape)}, weights_bytes=graph.size_bytes, io_bytes=io_bytes,
                          feature_map_bytes=largest * per, feature_map=where, attention_bytes=attention * per,
                          activation_bytes=3 * largest * per + attention * per)


def network_flags(trt: Any) -> int:
    """``create_network`` flags of a strongly typed network, from the enum: STRONGLY_TYPED is bit 1 in TensorRT 10
    and bit 0 in TensorRT 11 (where it is deprecated, networks being always strongly typed), so never a literal."""
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


# ----- one engine -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineBuilder:
    """Everything that decides one engine: graph, precision, profiles, timing cache and options."""

    component: str
    precision: str
    onnx_path: Path
    onnx_sha256: str
    engine_path: Path
    profiles: tuple[Profile, ...]
    options: BuildOptions
    timing_cache: Path
    io: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> {mode, dtype, dims}
    memory: MemoryEstimate | None = None

    @property
    def input_names(self) -> list[str]:
        return [n for n, t in self.io.items() if t["mode"] == "input"]

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(self.engine_path)

    @property
    def manifest_entry(self) -> dict[str, str]:
        """This engine's entry in the engine directory's manifest.json."""
        return {"file": self.engine_path.name, "sidecar": self.sidecar_path.name}

    # ----- trtexec ---------------------------------------------------------------------------------------------------
    def trtexec_command(self) -> list[str]:
        """The equivalent ``trtexec`` invocation (one --minShapes/--optShapes/--maxShapes group per profile)."""
        cmd = ["trtexec", f"--onnx={self.onnx_path}", f"--saveEngine={self.engine_path}", "--stronglyTyped"]
        if not self.options.tf32:
            cmd.append("--noTF32")
        for p in self.profiles:
            for key, attr in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
                cmd.append(f"{key}=" + ",".join(f"{n}:{'x'.join(map(str, getattr(st, attr)))}" for n, st in p.items()))
        cmd.append(f"--builderOptimizationLevel={self.options.opt_level}")
        if self.options.workspace_mb is not None:
            cmd.append(f"--memPoolSize=workspace:{self.options.workspace_mb}M")
        cmd += [f"--timingCacheFile={self.timing_cache}", "--skipInference"]
        return cmd

    def trtexec_line(self) -> str:
        return shlex.join(self.trtexec_command())

    # ----- the TensorRT Python API ------------------------------------------------------------------------------------
    def build(self, cache_bytes: bytes | None = None) -> tuple[bytes, bytes]:
        """Parse the ONNX graph, add the profiles and build; returns (serialized engine, updated timing cache)."""
        from cvvae.extras import lazy_import

        trt = lazy_import("tensorrt", "building TensorRT engines")
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT could not parse {self.onnx_path}:\n  {errors}")
        config = builder.create_builder_config()
        config.builder_optimization_level = self.options.opt_level
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:  # on by default in TensorRT; fp32 graphs stay fp32 unless asked
            (config.set_flag if self.options.tf32 else config.clear_flag)(tf32)
        if self.options.workspace_mb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.options.workspace_mb << 20)
        for profile in self.profiles:
            config.add_optimization_profile(profile.to_trt(builder, network))
        cache = config.create_timing_cache(cache_bytes or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT failed to build {self.engine_path.name} from {self.onnx_path} "
                                   "(its errors are in the log above); a smaller max profile or a larger "
                                   "--workspace-mb may help")
        return bytes(serialized), bytes(config.get_timing_cache().serialize())

    def sidecar(self, environment: EngineEnvironment, *, engine_sha256: str, size_bytes: int, seconds: float,
                export_dir: Path, export_manifest_sha256: str, timing_cache_loaded: bool) -> EngineSidecar:
        """The sidecar of an engine :meth:`build` made."""
        return self._sidecar(
            engine={"file": self.engine_path.name, "sha256": engine_sha256, "size_bytes": size_bytes},
            build={"builder": "tensorrt-python", "strongly_typed": True, **self.options.as_dict(),
                   "timing_cache": str(self.timing_cache), "timing_cache_loaded": timing_cache_loaded,
                   "seconds": round(seconds, 2)},
            environment=environment.as_dict(), export_dir=export_dir, export_manifest_sha256=export_manifest_sha256)

    def trtexec_sidecar(self, *, export_dir: Path, export_manifest_sha256: str) -> EngineSidecar:
        """The sidecar of the engine :meth:`trtexec_command` will make: its sha256 and environment stay empty until
        the first load checks the engine and records them (:mod:`cvvae.engines.engine_check`)."""
        return self._sidecar(
            engine={"file": self.engine_path.name, "sha256": None, "size_bytes": None},
            build={"builder": "trtexec", "command": self.trtexec_command(), "cwd": os.getcwd(),
                   "strongly_typed": True, **self.options.as_dict(), "timing_cache": str(self.timing_cache)},
            environment={}, export_dir=export_dir, export_manifest_sha256=export_manifest_sha256)

    def _sidecar(self, *, engine: dict[str, Any], build: dict[str, Any], environment: dict[str, Any],
                 export_dir: Path, export_manifest_sha256: str) -> EngineSidecar:
        return EngineSidecar(
            component=self.component, precision=self.precision, engine=engine,
            onnx={"file": self.onnx_path.name, "sha256": self.onnx_sha256, "export_dir": str(export_dir),
                  "export_manifest_sha256": export_manifest_sha256},
            io=self.io, profiles=[p.as_dict() for p in self.profiles], build=build, environment=environment,
            cvvae_version=cvvae_version(), memory_estimate=self.memory.as_dict() if self.memory else {},
            created_utc=now_utc())

    def request_differences(self, sidecar: dict[str, Any]) -> list[Mismatch]:
        """Differences between this build request and what the existing engine was built with."""
        out = []
        built = sidecar.get("profiles")
        wanted = [p.as_dict() for p in self.profiles]
        if built != wanted:
            out.append(Mismatch("profiles", _profiles_text(built or []), _profiles_text(wanted)))
        b = sidecar.get("build", {})
        for key in ("opt_level", "workspace_mb", "tf32"):
            if b.get(key) != getattr(self.options, key):
                out.append(Mismatch(f"build option {key}", b.get(key), getattr(self.options, key)))
        return out


def _profiles_text(profiles: list[dict[str, Any]]) -> str:
    parts = []
    for p in profiles:
        shapes = "; ".join(f"{n} {'x'.join(map(str, s['min']))}..{'x'.join(map(str, s['max']))}"
                           for n, s in p.get("shapes", {}).items())
        parts.append(f"{p.get('name')}: {shapes}")
    return " | ".join(parts)


# ----- planning all engines of an export ------------------------------------------------------------------------------
def plan_engines(export_dir: str | Path, out_dir: str | Path, precision: str, *, spec: ProfileSpec | None = None,
                 options: BuildOptions | None = None, components: Sequence[str] | None = None) -> list[EngineBuilder]:
    """One :class:`EngineBuilder` per component; every argument is checked here, before anything is built."""
    from cvvae.export.manifest import load_manifest

    manifest = load_manifest(export_dir)
    options = options or BuildOptions()
    out_dir = Path(out_dir)
    components = list(components or manifest.components)
    spec = spec or default_spec(manifest, components=components)
    timing_cache = options.timing_cache or out_dir / DEFAULT_TIMING_CACHE
    builders = []
    for component in components:
        entry = manifest.component(component)
        available = manifest.precisions(component)
        if precision not in available:
            raise EngineBuildError(f"export {export_dir} has no {precision} {component} graph (it has "
                                   f"{', '.join(available)}); pick one of those, or add it to the export (--precisions "
                                   f"{precision}, or INT8 calibration for int8)")
        graph = manifest.graph_file(component, precision)
        profiles = tuple(resolve_profiles(spec.for_component(component), entry.inputs, component=component))
        for warning in coverage_warnings(component, profiles, manifest):
            log.warning("%s", warning)
        io = expected_io(manifest, component, precision)
        builders.append(EngineBuilder(
            component=component, precision=precision, onnx_path=manifest.graph_path(component, precision),
            onnx_sha256=graph.sha256, engine_path=out_dir / engine_filename(component, precision),
            profiles=profiles, options=options, timing_cache=Path(timing_cache), io=io,
            memory=estimate_memory(manifest, component, precision, profiles)))
    return builders


# ----- building them --------------------------------------------------------------------------------------------------
@dataclass
class EngineResult:
    component: str
    precision: str
    engine: Path
    status: str           # "built" | "current"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "engine": str(self.engine)}


def build_engines(export_dir: str | Path, out_dir: str | Path, precision: str, *, spec: ProfileSpec | None = None,
                  options: BuildOptions | None = None, components: Sequence[str] | None = None,
                  rebuild: bool = False, on_progress: Progress | None = None,
                  environment: EngineEnvironment | None = None) -> list[EngineResult]:
    """Build (or keep, when current) the engines of an export into ``out_dir``; see the module docstring."""
    from cvvae.engines.sidecar import current_environment

    say = on_progress or (lambda msg: log.info("%s", msg))
    export_dir, out_dir = Path(export_dir).resolve(), Path(out_dir)
    builders = plan_engines(export_dir, out_dir, precision, spec=spec, options=options, components=components)
    env = environment or current_environment()
    export_sha = sha256_file(export_dir / "manifest.json")
    dir_manifest = engine_dir_manifest(export_dir, out_dir, export_sha, rebuild=rebuild)
    hint = rebuild_command(export_dir, out_dir, precision)
    results = []
    for b in builders:
        if b.engine_path.exists() and not rebuild:
            reasons = _existing_differences(b, env)
            if not reasons:
                say(f"{b.engine_path.name}: current (built for {env.gpu_name}, TensorRT {env.tensorrt_version}); kept")
                results.append(EngineResult(b.component, precision, b.engine_path, "current"))
                dir_manifest.engines.setdefault(b.component, {})[precision] = b.manifest_entry
                continue
            raise StaleEngineError(stale_message(str(b.engine_path), reasons, hint).replace(
                "Rebuild it:", "To replace it, pass --rebuild:"))
        say(f"{b.engine_path.name}: memory estimate {b.memory.describe()}" if b.memory else b.engine_path.name)
        results.append(_build_one(b, env, export_dir, export_sha, say))
        dir_manifest.engines.setdefault(b.component, {})[precision] = b.manifest_entry
        dir_manifest.write(out_dir)
    dir_manifest.write(out_dir)
    return results


def _existing_differences(b: EngineBuilder, env: EngineEnvironment) -> list[Mismatch]:
    from cvvae.engines.trtexec import is_pending

    try:
        sidecar = EngineSidecar.read(b.sidecar_path).to_dict()
    except StaleEngineError as e:
        return [Mismatch("sidecar", str(e).splitlines()[0], "a readable sidecar")]
    if is_pending(EngineSidecar.from_dict(sidecar)):
        return [Mismatch("engine", "a trtexec build whose first load has not checked and recorded it yet",
                         "an engine built here")]
    reasons = stale_reasons(sidecar, env.as_dict(), onnx_sha256=b.onnx_sha256,
                            engine_sha256=sha256_file(b.engine_path))
    return [r for r in reasons if r.refuse] + b.request_differences(sidecar)


def engine_dir_manifest(export_dir: Path, out_dir: Path, export_sha: str, *, rebuild: bool) -> EngineDirManifest:
    """The engine directory's manifest, refusing to mix engines of two different exports unless rebuilding."""
    model = json.loads((export_dir / "manifest.json").read_text())
    fresh = EngineDirManifest(export={"dir": str(export_dir), "manifest_sha256": export_sha}, model=model,
                              directory=out_dir)
    if not out_dir.exists():
        return fresh
    if not is_engine_dir(out_dir):
        if any(out_dir.iterdir()):
            raise EngineBuildError(f"{out_dir} exists and is not an engine directory; choose an empty or new --out")
        return fresh
    old = load_engine_dir(out_dir)
    if old.export.get("manifest_sha256") == export_sha:
        fresh.engines = old.engines
        return fresh
    if not rebuild:
        raise StaleEngineError(
            f"{out_dir} holds engines built from another export ({old.export.get('dir')}, manifest sha256 "
            f"{str(old.export.get('manifest_sha256'))[:12]}...), not {export_dir} ({export_sha[:12]}...); pass "
            "--rebuild to replace them, or choose another --out")
    for component, by_precision in old.engines.items():  # engines of the old export would be stale: remove them
        for entry in by_precision.values():
            for name in (entry["file"], entry["sidecar"]):  # never a file outside out_dir (a tampered manifest)
                member_path(out_dir, name, listed_in=out_dir / "manifest.json",
                            fix="remove the engine directory yourself").unlink(missing_ok=True)
    return fresh


def _build_one(b: EngineBuilder, env: EngineEnvironment, export_dir: Path, export_sha: str,
               say: Progress) -> EngineResult:
    cache_bytes, notes = _read_timing_cache(b.timing_cache, env)
    say(f"{b.engine_path.name}: building from {b.onnx_path.name} with {len(b.profiles)} profile(s), "
        f"opt level {b.options.opt_level}, timing cache {b.timing_cache}")
    started = time.perf_counter()
    engine_bytes, cache_out = b.build(cache_bytes)
    seconds = time.perf_counter() - started
    b.engine_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(b.engine_path, overwrite=True) as tmp:
        tmp.write_bytes(engine_bytes)
    _write_timing_cache(b.timing_cache, cache_out, env)
    sidecar = b.sidecar(env, engine_sha256=sha256_file(b.engine_path), size_bytes=len(engine_bytes), seconds=seconds,
                        export_dir=export_dir, export_manifest_sha256=export_sha,
                        timing_cache_loaded=cache_bytes is not None)
    sidecar.write(b.sidecar_path)
    say(f"{b.engine_path.name}: built in {seconds:.1f} s ({len(engine_bytes) / 1e6:.1f} MB)")
    return EngineResult(b.component, b.precision, b.engine_path, "built", round(seconds, 2), notes)


def _read_timing_cache(path: Path, env: EngineEnvironment) -> tuple[bytes | None, list[str]]:
    """The cache's bytes when it was made in this environment; caches of another GPU give slower engines."""
    if not path.exists():
        return None, []
    meta_path = path.with_name(path.name + ".json")
    made_for = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if made_for != env.as_dict():
        note = f"timing cache {path} was made for {made_for or 'an unknown environment'}; starting a fresh one"
        log.warning("%s", note)
        return None, [note]
    return path.read_bytes(), []


def _write_timing_cache(path: Path, data: bytes, env: EngineEnvironment) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_bytes(data)
    meta = path.with_name(path.name + ".json")
    with atomic_path(meta, overwrite=True) as tmp:
        tmp.write_text(json.dumps(env.as_dict(), indent=2) + "\n")
