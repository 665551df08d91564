"""What an engine was built from and for: the JSON sidecar of each engine, the engine directory's manifest, and
the staleness check that refuses engines built for another TensorRT, GPU or graph.

TensorRT has no key/value metadata inside a plan file, so every ``<component>.<precision>.plan`` has a sidecar
``<component>.<precision>.plan.json`` (:class:`EngineSidecar`, schema :data:`SIDECAR_FORMAT`). The checks are pure
functions of plain dicts (:func:`stale_reasons`), so they are tested on machines without a GPU by passing fake
environments; :func:`current_environment` is the only part that asks TensorRT and CUDA.

An engine directory has its own ``manifest.json`` (:class:`EngineDirManifest`, format :data:`ENGINE_DIR_FORMAT`):
where the export came from, a full copy of the export's manifest (model config, plan settings, tensor contract,
checkpoint), and the engines it holds. So the runtime reads config and plan settings without the export directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cvvae.errors import CVVAEError, EngineDirError, StaleEngineError
from cvvae.fsutil import atomic_path
from cvvae.integrity import member_path

SIDECAR_FORMAT = "cvvae-engine/1"
ENGINE_DIR_FORMAT = "cvvae-engines/1"
MANIFEST_NAME = "manifest.json"
ENGINE_SUFFIX = ".plan"


def engine_filename(component: str, precision: str) -> str:
    """``encoder.fp16.plan`` (the precision names the ONNX variant the engine was built from)."""
    return f"{component}.{precision}{ENGINE_SUFFIX}"


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


# ----- environment ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine is tied to. ``compute_capability`` is "major.minor" (e.g. "9.0")."""

    tensorrt_version: str
    cuda_version: str | None
    gpu_name: str
    compute_capability: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        """A short name for caches made in this environment (timing caches differ per GPU and TensorRT)."""
        return f"trt{self.tensorrt_version}-sm{self.compute_capability.replace('.', '')}"


def current_environment(device: int = 0) -> EngineEnvironment:
    """The running TensorRT version, CUDA runtime version and GPU (asked of torch where installed, else CuPy); needs
    tensorrt and a CUDA device."""
    from cvvae.cuda_device import CudaDevice
    from cvvae.extras import lazy_import

    trt = lazy_import("tensorrt", "building or loading TensorRT engines")
    cuda = CudaDevice.open(device)
    if not cuda.available():
        from cvvae.errors import BackendUnavailableError

        raise BackendUnavailableError(f"TensorRT engines need a CUDA GPU, and {cuda.lib} sees no cuda:{device}")
    cuda_version, gpu_name, capability = cuda.describe()
    return EngineEnvironment(tensorrt_version=str(trt.__version__), cuda_version=cuda_version, gpu_name=gpu_name,
                             compute_capability=capability)


# ----- the sidecar ----------------------------------------------------------------------------------------------------
@dataclass
class EngineSidecar:
    """``<engine>.json``: everything the engine was built from and for.

    ``profiles``: ``Profile.as_dict()`` per profile, in engine order. ``io``: tensor name -> {mode, dtype, dims} with
    the manifest's dims (axis names for dynamic axes). ``build``: the :class:`cvvae.engines.build.BuildOptions` used,
    plus the builder and the time it took. ``environment``: :class:`EngineEnvironment` at build time.
    """

    component: str
    precision: str
    engine: dict[str, Any]          # file, sha256, size_bytes
    onnx: dict[str, Any]            # file, sha256, export_dir, export_manifest_sha256
    io: dict[str, dict[str, Any]]
    profiles: list[dict[str, Any]]
    build: dict[str, Any]
    environment: dict[str, Any]
    cvvae_version: str
    memory_estimate: dict[str, Any] = field(default_factory=dict)
    created_utc: str = ""
    format: str = SIDECAR_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineSidecar":
        if d.get("format") != SIDECAR_FORMAT:
            raise StaleEngineError(f"sidecar format {d.get('format')!r} is not {SIDECAR_FORMAT!r}; rebuild the engine")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> "EngineSidecar":
        path = Path(path)
        if not path.exists():
            raise StaleEngineError(f"{path.name[:-5]} has no sidecar {path.name}, so nothing says what it was built "
                                   "for; rebuild it with `cvvae build-engines ... --rebuild`")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise StaleEngineError(f"cannot read sidecar {path}: {e}; rebuild the engine") from e


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def cvvae_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("cvvae-deploy")
    except md.PackageNotFoundError:
        return "unknown"


# ----- staleness: pure functions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    """One way in which an engine does not fit: ``what`` (a label), the value at build time and now."""

    what: str
    built: Any
    now: Any
    refuse: bool = True     # False: recorded and logged, the engine still loads

    def __str__(self) -> str:
        return f"{self.what}: built with {self.built!r}, now {self.now!r}"


# (label, key in the environment dicts, whether a difference refuses the engine)
ENVIRONMENT_FIELDS = (
    ("TensorRT version", "tensorrt_version", True),
    ("GPU", "gpu_name", True),
    ("compute capability", "compute_capability", True),
    # TensorRT's version fixes the CUDA major it runs on; a different minor runtime does not invalidate a plan.
    ("CUDA version", "cuda_version", False),
)


def stale_reasons(sidecar: Mapping[str, Any], environment: Mapping[str, Any], *,
                  onnx_sha256: str | None = None, engine_sha256: str | None = None) -> list[Mismatch]:
    """Every difference between what the engine was built for (``sidecar`` dict) and what is running now.

    ``environment``: :meth:`EngineEnvironment.as_dict` of the running machine. ``onnx_sha256``: the sha256 of the graph
    the engine should come from now (the export's manifest); ``engine_sha256``: of the plan file on disk.
    """
    reasons: list[Mismatch] = []
    built_env = sidecar.get("environment", {})
    for label, key, refuse in ENVIRONMENT_FIELDS:
        if built_env.get(key) != environment.get(key):
            reasons.append(Mismatch(label, built_env.get(key), environment.get(key), refuse))
    if onnx_sha256 is not None and sidecar.get("onnx", {}).get("sha256") != onnx_sha256:
        reasons.append(Mismatch("ONNX sha256", sidecar.get("onnx", {}).get("sha256"), onnx_sha256))
    if engine_sha256 is not None and sidecar.get("engine", {}).get("sha256") != engine_sha256:
        when = ("since its first load recorded it" if sidecar.get("build", {}).get("builder") == "trtexec"
                else "after the build")
        reasons.append(Mismatch(f"engine file sha256 (plan file replaced {when})",
                                sidecar.get("engine", {}).get("sha256"), engine_sha256))
    return reasons


def stale_message(engine: str, reasons: list[Mismatch], rebuild_hint: str) -> str:
    refusing = [r for r in reasons if r.refuse]
    lines = [f"engine {engine} was built for something else and is refused:"]
    lines += [f"  {r}" for r in refusing]
    lines += [f"  (also {r}; not a reason to refuse)" for r in reasons if not r.refuse]
    lines.append(f"Rebuild it: {rebuild_hint}")
    return "\n".join(lines)


def check_current(sidecar: Mapping[str, Any], environment: Mapping[str, Any], *, engine: str, rebuild_hint: str,
                  onnx_sha256: str | None = None, engine_sha256: str | None = None) -> list[Mismatch]:
    """Raise :class:`StaleEngineError` when any refusing mismatch exists; return the tolerated ones."""
    reasons = stale_reasons(sidecar, environment, onnx_sha256=onnx_sha256, engine_sha256=engine_sha256)
    if any(r.refuse for r in reasons):
        raise StaleEngineError(stale_message(engine, reasons, rebuild_hint))
    return reasons


def rebuild_command(export_dir: str | Path | None, engine_dir: str | Path, precision: str) -> str:
    export = export_dir if export_dir else "EXPORT_DIR"
    return f"cvvae build-engines --export {export} --out {engine_dir} --precision {precision} --rebuild"


# ----- the engine directory's manifest --------------------------------------------------------------------------------
@dataclass
class EngineDirManifest:
    """``manifest.json`` of an engine directory.

    ``export``: {"dir": absolute path of the export, "manifest_sha256": sha256 of its manifest.json at build time};
    ``model``: the export's manifest.json, verbatim; ``engines``: component -> precision -> {"file", "sidecar"}.
    """

    export: dict[str, Any]
    model: dict[str, Any]
    engines: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    format: str = ENGINE_DIR_FORMAT
    updated_utc: str = ""
    directory: Path | None = field(default=None, compare=False, repr=False)

    # ----- the model side, through the export manifest API -------------------------------------------------------
    def export_manifest(self) -> Any:
        """The copied export manifest as an :class:`~cvvae.export.manifest.ExportManifest` (directory: the export's,
        when it still exists)."""
        from cvvae.export.manifest import ExportManifest

        export_dir = Path(self.export.get("dir", ""))
        return ExportManifest.from_dict(self.model, directory=export_dir if export_dir.is_dir() else None)

    def expected_onnx_sha256(self, component: str, precision: str) -> str | None:
        """The sha256 the engine's graph should have now: from the export's current manifest when the export is still
        there (a re-export makes the engine stale), else from the copy taken at build time."""
        from cvvae.export.manifest import load_manifest

        export_dir = Path(self.export.get("dir", ""))
        source = self.model
        if (export_dir / MANIFEST_NAME).is_file():
            try:
                source = load_manifest(export_dir).to_dict()
            except CVVAEError:
                source = self.model
        entry = source.get("components", {}).get(component, {}).get("files", {}).get(precision)
        return entry.get("sha256") if entry else None

    @property
    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint the export was made from: {"source", "sha256", "config_source"}."""
        return dict(self.model.get("checkpoint", {}))

    def engine_path(self, component: str, precision: str) -> Path:
        entry = self.engines.get(component, {}).get(precision)
        if entry is None:
            have = [f"{c}.{p}" for c, ps in self.engines.items() for p in ps]
            raise EngineDirError(f"{self.directory} has no {precision} {component} engine (it has: "
                                 f"{', '.join(have) or 'none'}); build it with "
                                 f"{rebuild_command(self.export.get('dir'), self.directory, precision)}")
        directory = self.directory or Path(".")
        return member_path(directory, entry.get("file"), listed_in=directory / MANIFEST_NAME,
                           fix=f"rebuild it: {rebuild_command(self.export.get('dir'), directory, precision)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("directory")
        return d

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        self.updated_utc = now_utc()
        with atomic_path(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_engine_dir(directory: str | Path) -> EngineDirManifest:
    """Read an engine directory's manifest; raise :class:`EngineDirError` with the fix when it is not one."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise EngineDirError(f"{directory} has no {MANIFEST_NAME}: not an engine directory (build one with "
                             "`cvvae build-engines --export EXPORT_DIR --out DIR`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineDirError(f"cannot read {path}: {e}") from e
    if data.get("format") != ENGINE_DIR_FORMAT:
        hint = (" (that is an export directory: build engines from it with `cvvae build-engines --export "
                f"{directory} --out ENGINE_DIR`)") if str(data.get("format", "")).startswith("cvvae-export") else ""
        raise EngineDirError(f"{path} has format {data.get('format')!r}, not {ENGINE_DIR_FORMAT!r}{hint}")
    try:
        return EngineDirManifest(export=data["export"], model=data["model"], engines=data.get("engines", {}),
                                 updated_utc=data.get("updated_utc", ""), directory=directory)
    except KeyError as e:
        raise EngineDirError(f"{path} lacks {e}; rebuild the engine directory") from e


def is_engine_dir(directory: str | Path) -> bool:
    path = Path(directory) / MANIFEST_NAME
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == ENGINE_DIR_FORMAT
    except (OSError, json.JSONDecodeError):
        return False
