"""manifest.json of an export directory: everything the runtime needs besides the graphs.

``load_manifest(dir)`` -> :class:`ExportManifest`; the runtime calls ``m.model_config()``, ``m.plan_settings()``,
``m.graph_path("encoder", "fp32")`` and ``m.precisions("encoder")``. A missing, unreadable or foreign manifest raises
:class:`cvvae.errors.ExportError` naming the file and the fix; a graph whose sha256 differs from the manifest's, or a
file name leading outside the export folder, raises :class:`cvvae.errors.IntegrityError` (issue 13 item 1).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvvae.config import ModelConfig
from cvvae.errors import ConfigError, ExportError, PlanError
from cvvae.export import contract
from cvvae.export.contract import ComponentSpec
from cvvae.fsutil import atomic_path, sha256_file
from cvvae.integrity import check_member_name, check_sha256, member_path
from cvvae.plan import PlanSettings

if TYPE_CHECKING:  # onnx is needed to write a manifest, not to read one (the torch-free runtime reads them)
    import onnx

REEXPORT_HINT = "re-export it into a fresh folder (`cvvae export --model CKPT --out DIR`)"
# onnx.TensorProto element types (FLOAT, FLOAT16, BFLOAT16, DOUBLE) -> numpy dtype names
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


@dataclass
class TensorEntry:
    """A graph input or output: name and dims (ints for static axes, contract names for dynamic ones)."""

    name: str
    dims: list[str | int]

    @property
    def dynamic_dims(self) -> list[str]:
        return [d for d in self.dims if isinstance(d, str)]


@dataclass
class GraphFile:
    """One graph file of a component in one precision."""

    path: str                      # relative to the export directory
    sha256: str
    precision: str                 # "fp32" | "fp16" | "int8"
    external_data: bool
    io_dtypes: dict[str, str]      # tensor name -> "float32" | "float16": what to feed and what comes back
    size_bytes: int
    data_path: str | None = None   # the external weights file, when external_data
    data_sha256: str | None = None
    verified: dict[str, Any] = field(default_factory=dict)
    fp16_rule: dict[str, Any] | None = None   # which nodes stayed fp32 and why (lower precisions only)
    op_counts: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # int8 only: method, data, exclusions, sensitivity (cvvae.calibration)

    @classmethod
    def describe(cls, path: Path, *, precision: str, external_data: bool, verified: dict[str, Any],
                 fp16_rule: dict[str, Any] | None, model: onnx.ModelProto) -> "GraphFile":
        io = {vi.name: _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
              for vi in (*model.graph.input, *model.graph.output)}
        ops: dict[str, int] = {}
        for node in model.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        data = path.parent / (path.name + contract.EXTERNAL_DATA_SUFFIX) if external_data else None
        return cls(path=path.name, sha256=sha256_file(path), precision=precision, external_data=external_data,
                   io_dtypes=io, size_bytes=path.stat().st_size + (data.stat().st_size if data else 0),
                   data_path=data.name if data else None, data_sha256=sha256_file(data) if data else None,
                   verified=verified, fp16_rule=fp16_rule, op_counts=dict(sorted(ops.items())))


@dataclass
class ComponentEntry(contract.NamedIO):
    """Contract of one component (names, dims) and its graph files by precision."""

    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    files: dict[str, GraphFile]

    @classmethod
    def from_spec(cls, spec: ComponentSpec, cfg: ModelConfig, files: dict[str, GraphFile]) -> "ComponentEntry":
        channels = {"pixels": cfg.in_channels if spec.name == contract.ENCODER else cfg.out_channels,
                    "latent": cfg.latent_channels}
        return cls(inputs=[TensorEntry(t.name, t.dims(channels[t.kind])) for t in spec.inputs],
                   outputs=[TensorEntry(t.name, t.dims(channels[t.kind])) for t in spec.outputs],
                   files=files)


@dataclass
class ExportManifest:
    """The parsed manifest.json; ``directory`` is where it was loaded from (not stored)."""

    format: str
    variant: str
    config: dict[str, Any]              # official config.json (ModelConfig.to_official_dict())
    config_summary: dict[str, Any]      # ModelConfig.summary()
    scaling_factor: float | None
    shift_factor: float | None
    compression: dict[str, int]         # time, space, latent_channels
    frame_rules: dict[str, Any]
    plan: dict[str, Any]                # PlanSettings.as_dict()
    logvar_clamp: list[float]
    components: dict[str, ComponentEntry]
    opset: int
    exporter: str
    checkpoint: dict[str, Any]          # source, sha256 (None for random weights), config_source
    tool_versions: dict[str, str]
    created_utc: str = ""
    export_seconds: float | None = None
    directory: Path | None = field(default=None, compare=False, repr=False)

    # ----- what the runtime calls ---------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig.from_dict(self.config)
        except ConfigError as e:
            raise ExportError(f"manifest {self._where()} holds an invalid model config: {e}") from e

    def plan_settings(self, **overrides: Any) -> PlanSettings:
        try:
            return PlanSettings(**{**self.plan, **overrides})
        except (PlanError, TypeError) as e:
            raise ExportError(f"manifest {self._where()} holds invalid plan settings {self.plan}: {e}") from e

    def precisions(self, component: str) -> list[str]:
        return list(self.component(component).files)

    def component(self, component: str) -> ComponentEntry:
        if component not in self.components:
            raise ExportError(f"export {self._where()} has no {component!r} graph; it has "
                              f"{', '.join(self.components) or 'none'} (re-export with --components)")
        return self.components[component]

    def graph_file(self, component: str, precision: str = "fp32") -> GraphFile:
        files = self.component(component).files
        if precision not in files:
            raise ExportError(f"export {self._where()} has no {precision} {component}; available: "
                              f"{', '.join(files)} (re-export with --precisions)")
        return files[precision]

    def graph_path(self, component: str, precision: str = "fp32", *, verify: bool = True,
                   fix: str = REEXPORT_HINT) -> Path:
        """The graph's path, inside the export folder; with ``verify`` (the default) only after its sha256, and its
        external data's, matched the manifest (:mod:`cvvae.integrity`, cached while the files are unchanged).
        ``fix``: what the error tells the user to do."""
        directory = self.directory or Path(".")
        f = self.graph_file(component, precision)
        where = directory / contract.MANIFEST_NAME
        path = member_path(directory, f.path, listed_in=where, fix=fix)
        if not path.exists():
            raise ExportError(f"{path} listed in the manifest is missing; {fix}")
        if verify:
            check_sha256(path, f.sha256, recorded_in=where, fix=fix)
            if f.external_data or f.data_path:
                data = member_path(directory, f.data_path, listed_in=where, fix=fix)
                if not data.exists():
                    raise ExportError(f"{data} (external weights of {path.name}) is missing; {fix}")
                check_sha256(data, f.data_sha256, recorded_in=where, fix=fix)
        return path

    def io_dtypes(self, component: str, precision: str = "fp32") -> dict[str, str]:
        return dict(self.graph_file(component, precision).io_dtypes)

    def check_files(self, *, fix: str = REEXPORT_HINT) -> None:
        """Verify every graph file (and its external data) against the manifest; raise naming the first that differs."""
        for name, entry in self.components.items():
            for precision in entry.files:
                self.graph_path(name, precision, fix=fix)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("directory")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path | None = None) -> "ExportManifest":
        comps = {}
        for name, c in d["components"].items():
            comps[name] = ComponentEntry(
                inputs=[TensorEntry(**t) for t in c["inputs"]],
                outputs=[TensorEntry(**t) for t in c["outputs"]],
                files={p: GraphFile(**f) for p, f in c["files"].items()},
            )
        fields = {k: v for k, v in d.items() if k != "components" and k in cls.__dataclass_fields__}
        return cls(**fields, components=comps, directory=directory)

    def _where(self) -> str:
        return str(self.directory) if self.directory else "(in memory)"


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    import numpy
    import onnx
    import onnxruntime
    import torch

    try:
        cvvae_version = md.version("cvvae-deploy")
    except md.PackageNotFoundError:
        cvvae_version = "unknown"
    return {"cvvae": cvvae_version, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def build_manifest(model, components: dict[str, ComponentEntry], *, opset: int, exporter: str,
                   seconds: float | None = None) -> ExportManifest:
    """The manifest of an export of ``model`` (a :class:`cvvae.model.CVVAE`)."""
    cfg: ModelConfig = model.config
    info = model.checkpoint_info
    rules = dict(contract.FRAME_RULES)
    rules.update(time_compress=cfg.time_compress, spatial_compress=cfg.spatial_compress,
                 pad_size_to_multiple_of=cfg.spatial_compress)
    return ExportManifest(
        format=contract.FORMAT,
        variant=cfg.variant,
        config=cfg.to_official_dict(),
        config_summary=cfg.summary(),
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        compression={"time": cfg.time_compress, "space": cfg.spatial_compress,
                     "latent_channels": cfg.latent_channels},
        frame_rules=rules,
        plan=PlanSettings.from_config(cfg).as_dict(),
        logvar_clamp=list(contract.LOGVAR_CLAMP),
        components=components,
        opset=opset,
        exporter=exporter,
        checkpoint={"source": info.source if info else None, "sha256": info.sha256 if info else None,
                    "config_source": info.config_source if info else None},
        tool_versions=tool_versions(),
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        export_seconds=None if seconds is None else round(seconds, 2),
    )


def add_graph_file(manifest: ExportManifest, component: str, precision: str, graph: GraphFile) -> None:
    """Register (or replace) the ``precision`` file of ``component``, e.g. an int8 graph made after export."""
    entry = manifest.component(component)
    if graph.precision != precision:
        raise ExportError(f"graph {graph.path} is {graph.precision}, not {precision}")
    entry.files[precision] = graph


def write_manifest(directory: str | Path, manifest: ExportManifest, *, overwrite: bool = True) -> Path:
    """Write ``directory/manifest.json`` atomically."""
    path = Path(directory) / contract.MANIFEST_NAME
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in manifest.json")


_REQUIRED = ("format", "variant", "config", "plan", "components", "logvar_clamp", "opset")


def load_manifest(directory: str | Path) -> ExportManifest:
    """Read ``directory/manifest.json`` (or a manifest.json path); raise ExportError with the fix if it is bad."""
    directory = Path(directory)
    path = directory if directory.name == contract.MANIFEST_NAME and directory.is_file() \
        else directory / contract.MANIFEST_NAME
    if not path.exists():
        what = "does not exist" if not path.parent.exists() else f"has no {contract.MANIFEST_NAME}"
        raise ExportError(f"{path.parent} {what}: not a CV-VAE export directory "
                          "(create one with `cvvae export --model CKPT --out DIR`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}; re-export the directory") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds a {type(data).__name__}, not a manifest object")
    if data.get("format") != contract.FORMAT:
        raise ExportError(f"{path} has format {data.get('format')!r}; this toolkit reads {contract.FORMAT!r} "
                          "(re-export with this version)")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}; re-export the directory")
    try:
        manifest = ExportManifest.from_dict(data, directory=path.parent)
    except (KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{path} is not a valid {contract.FORMAT} manifest: {type(e).__name__}: {e}") from e
    for entry in manifest.components.values():  # every file it names must lie inside the export folder
        for f in entry.files.values():
            check_member_name(f.path, listed_in=path, fix=REEXPORT_HINT)
            if f.data_path is not None:
                check_member_name(f.data_path, listed_in=path, fix=REEXPORT_HINT)
    return manifest
