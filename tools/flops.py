"""FLOPs of an encode or decode, counted once from the model for every tile/chunk shape of the plan.

``torch.utils.flop_counter.FlopCounterMode`` runs a copy of the model on the *meta* device (shapes only, no
arithmetic, no weights allocated), so counting the full-size model costs well under a second per distinct shape. It
counts convolutions, matmuls and attention exactly (2 FLOPs per multiply-add) and ignores elementwise work
(normalisation, SiLU, blending), the usual convention for achieved-GFLOP/s figures.

A plan makes one component call per (temporal chunk, spatial tile); :func:`tile_calls` lists their input shapes and
:func:`plan_flops` sums the per-shape counts over them. Tile batching (``batch_tiles``) only regroups the same calls,
and FLOPs are linear in the batch, so the sum is the same.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from cvvae.config import ModelConfig
from cvvae.errors import InputError
from cvvae.model import CVVAE
from cvvae.plan import VideoPlan

log = logging.getLogger(__name__)

Component = Literal["encoder", "decoder"]
COMPONENTS: tuple[Component, ...] = ("encoder", "decoder")
Shape = tuple[int, int, int, int, int]


def tile_calls(plan: VideoPlan, component: Component, *, channels: int, batch: int = 1) -> list[Shape]:
    """Input shape (B, C, t, h, w) of every component call the plan makes, in execution order.

    Encoder inputs are pixels (``channels`` = the model's in_channels; tiles in pixels), decoder inputs are latents
    (``channels`` = latent_channels; tiles in latent cells).
    """
    _check_component(component)
    chunks = plan.encode_chunks if component == "encoder" else plan.decode_chunks
    scale = plan.settings.spatial_compress if component == "encoder" else 1
    return [(batch, channels, chunk.length, rows * scale, cols * scale)
            for chunk in chunks for rows in plan.rows.sizes for cols in plan.cols.sizes]


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")


def module_flops(module: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of ``module`` (already on the meta device) on an input of ``shape``.

    Counted on the forward as written (autograd on: what is exported and what every backend runs), so all targets
    are measured against the same work; torch's fp32 inference does fewer multiply-adds in the decoder's upsampling
    convs (:mod:`cvvae.subpixel`), which shows as a higher rate."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        module(torch.empty(shape, device="meta"))
    return int(counter.get_total_flops())


class FlopCounter:
    """Counts FLOPs of one architecture's components per input shape, on a meta-device copy (cached per shape)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        with torch.device("meta"):
            self._model = CVVAE(config).eval()
        self._cache: dict[tuple[str, Shape], int] = {}

    def channels(self, component: Component) -> int:
        return self.config.in_channels if component == "encoder" else self.config.latent_channels

    def component(self, component: Component, shape: Shape) -> int:
        """FLOPs of one call of ``component`` on an input of ``shape`` (B, C, t, h, w)."""
        _check_component(component)
        key = (component, tuple(shape))
        if key not in self._cache:
            self._cache[key] = module_flops(getattr(self._model, component), shape)
        return self._cache[key]

    def module(self, component: Component) -> torch.nn.Module:
        """The meta-device encoder or decoder (for running a plan's executor on shapes only)."""
        _check_component(component)
        return getattr(self._model, component)

    def plan(self, plan: VideoPlan, component: Component, batch: int = 1) -> "PlanFlops":
        """FLOPs of every call the plan makes, grouped by input shape."""
        counts = Counter(tile_calls(plan, component, channels=self.channels(component), batch=batch))
        per_shape = {shape: (n, self.component(component, shape)) for shape, n in counts.items()}
        return PlanFlops(component, sum(n * f for n, f in per_shape.values()), per_shape)


@dataclass(frozen=True)
class PlanFlops:
    """Total FLOPs of one component over a plan, and the (call count, FLOPs per call) of each input shape."""

    component: str
    total: int
    per_shape: dict[Shape, tuple[int, int]] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(n for n, _ in self.per_shape.values())


def plan_flops(config: ModelConfig, plan: VideoPlan, component: Component, batch: int = 1) -> int:
    """Total FLOPs of ``component`` over every chunk and tile of ``plan`` (convenience over :class:`FlopCounter`)."""
    return FlopCounter(config).plan(plan, component, batch).total
