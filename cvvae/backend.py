"""The backend interface the executor runs (spec 6, :mod:`cvvae.tiling`) and the base of the graph-file backends.

A backend runs the two components on one tile: ``encoder(video) -> moments`` (mean and logvar concatenated on the
channel axis, raw, before the logvar clamp) and ``decoder(latent) -> video``, as float32 arrays of the family it was
given (:mod:`cvvae.arrays`). The PyTorch backend lives in :mod:`cvvae.runtime.backends`; the backends that run the
files of an export (ONNX Runtime sessions there, TensorRT engines in :mod:`cvvae.engines.trt_backend`) share
:class:`GraphFileBackend`: model config, plan settings and identity from the export's manifest, and the encoder and
decoder calls over one runner per component. It sits in the bottom layer so that the engines (below the runtime)
and the runtime both build on it without importing each other's modules (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, Sequence

from . import arrays
from .arrays import Array
from .config import ModelConfig
from .errors import InputError
from .plan import PlanSettings

COMPONENTS = ("encoder", "decoder")


class Backend(Protocol):
    """What the scheduler needs from a backend."""

    name: str
    precision: str
    config: ModelConfig
    plan_settings: PlanSettings
    identity: dict[str, Any]

    def encoder(self, video: Array) -> Array: ...

    def decoder(self, latent: Array) -> Array: ...


class GraphFileBackend:
    """Base of the backends that run an export's graph files, one loaded part (session, engine) per component.

    Subclasses give :meth:`export_manifest` and keep their parts in ``encoder_<part_kind>`` / ``decoder_<part_kind>``
    attributes (None: not loaded); :meth:`run` calls a part, which returns the outputs in the export contract's order
    (encoder: mean, logvar; decoder: video) - subclasses whose parts are called differently override it.
    """

    name: str
    precision: str
    part_kind: ClassVar[str] = "graph"

    def export_manifest(self) -> Any:
        """The export's manifest (:class:`cvvae.export.manifest.ExportManifest`) the parts were made from."""
        raise NotImplementedError

    @staticmethod
    def load_parts(components: Sequence[str], load: Callable[[str], Any]) -> dict[str, Any]:
        """``load(component)`` for each asked-for component, None for the others."""
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown or not components:
            raise InputError(f"components {list(components)}: expected one or both of {', '.join(COMPONENTS)}")
        return {c: load(c) if c in components else None for c in COMPONENTS}

    @property
    def config(self) -> ModelConfig:
        return self.export_manifest().model_config()

    @property
    def plan_settings(self) -> PlanSettings:
        return self.export_manifest().plan_settings()

    @property
    def identity(self) -> dict[str, Any]:
        from .latent_io import identity

        manifest = self.export_manifest()
        return identity(manifest.model_config(), manifest.checkpoint.get("sha256"), manifest.checkpoint.get("source"))

    def part(self, component: str) -> Any:
        """The loaded part of ``component``, or an InputError saying how to load it."""
        part = getattr(self, f"{component}_{self.part_kind}")
        if part is None:
            raise InputError(f"the {component} {self.part_kind} was not loaded; pass components including "
                             f"{component!r}")
        return part

    def run(self, component: str, x: Array) -> list[Array]:
        """``component`` on one tile: its outputs in the export contract's order."""
        return self.part(component)(x)

    def encoder(self, video: Array) -> Array:
        mean, logvar = self.run("encoder", video)
        return arrays.namespace(mean).concat([mean, logvar], axis=1)

    def decoder(self, latent: Array) -> Array:
        return self.run("decoder", latent)[0]
