"""Memory estimates: refuse a model or a chunk/tile plan that cannot fit, before allocating it (spec sections 1, 6).

A config within the bounds of :mod:`cvvae.config` can still describe a model larger than the machine, and a frame size
can ask the executor for more than there is. Rather than let the allocator fail after minutes (or the kernel kill the
process), the loader and the runtime compare an estimate with the memory available now and refuse with both figures.

* :func:`parameter_count` is exact: the model built on PyTorch's meta device (shapes only, no storage).
* :func:`plan_memory` is the peak of encoding, decoding or either under a :class:`~cvvae.plan.VideoPlan`: the one
  estimate of a job's memory, :func:`cvvae.plan.estimate_memory` (calibrated against measured peak RSS), taken for the
  direction that needs more.
* :func:`available_memory` is ``MemAvailable`` (Linux ``/proc/meminfo``), lowered to the cgroup's remaining limit
  inside a container; None where neither can be read (then nothing is refused).

The budget of a job (issue 16): :func:`parse_bytes` reads ``--max-memory`` and :func:`default_budget` gives its
default; :func:`cvvae.plan.fit_plan` picks the plan that fits it (with :func:`cvvae.plan.estimate_memory`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import InputError, ResourceError
from .plan import MemoryEstimate as PlanEstimate
from .plan import VideoPlan, estimate_memory

BYTES_FP32 = 4
# What loading needs besides the weights: the checkpoint's tensors are read before they are copied into the model.
LOAD_COPIES = 2
HEADROOM = 256 << 20  # the interpreter, torch's own buffers, the reader


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as `free -h` and the docs use)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_remaining(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping, or None when it cannot be told."""
    figures = [v for v in (_meminfo_available(), _cgroup_remaining()) if v is not None]
    if not figures and hasattr(os, "sysconf"):
        try:
            figures.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(figures) if figures else None


def parameter_count(config: ModelConfig) -> int:
    """Exact parameter count of the model ``config`` describes, built on the meta device (allocates nothing)."""
    import torch

    from .model import CVVAE

    with torch.device("meta"):
        model = CVVAE(config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimated peak in bytes, with the parts it is made of (for messages and `cvvae info`)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        inner = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items())
        return f"{format_bytes(self.total)} ({inner})"

    def as_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total, **{f"{k.replace(' ', '_')}_bytes": v for k, v in self.parts.items()}}


def model_memory(config: ModelConfig, *, bytes_per_param: int = BYTES_FP32, copies: int = LOAD_COPIES
                 ) -> tuple[int, MemoryEstimate]:
    """(parameter count, memory to load it): ``copies`` x the weights plus a fixed headroom."""
    count = parameter_count(config)
    return count, MemoryEstimate({"weights": copies * count * bytes_per_param, "headroom": HEADROOM})


def check_fits(estimate: MemoryEstimate, what: str, advice: str) -> None:
    """Refuse ``estimate`` when it exceeds the memory available now (no check where that is unknown)."""
    available = available_memory()
    if available is not None and estimate.total > available:
        raise ResourceError(f"{what} needs about {estimate.describe()}, but only {format_bytes(available)} of "
                            f"memory is available; {advice}")


def check_model_fits(config: ModelConfig, *, bytes_per_param: int = BYTES_FP32) -> int:
    """Refuse a model too large for this machine before building it; returns its parameter count."""
    count, estimate = model_memory(config, bytes_per_param=bytes_per_param)
    check_fits(estimate, f"a model of {count:,} parameters (widths {list(config.widths)}, "
                         f"{config.layers_per_block} resnets per level)",
               "check the widths/ch, ch_mult and num_res_blocks in its config.json")
    return count


def plan_memory(plan: VideoPlan, config: ModelConfig, *, batch: int = 1, batch_tiles: bool = False,
                direction: str = "both", sliced: bool = False) -> PlanEstimate:
    """Peak memory of encoding (``"encode"``), decoding (``"decode"``) or either (``"both"``, the larger), from the
    one estimate (:func:`cvvae.plan.estimate_memory`; ``sliced`` for the torch backend's frame-sliced layers)."""
    directions = ("encode", "decode") if direction == "both" else (direction,)
    return max((estimate_memory(config, plan, d, batch=batch, batch_tiles=batch_tiles, sliced=sliced)
                for d in directions), key=lambda e: e.total)


def check_plan_fits(plan: VideoPlan, config: ModelConfig, *, batch: int = 1, batch_tiles: bool = False,
                    direction: str = "both", sliced: bool = False) -> PlanEstimate:
    """Refuse a plan whose working set exceeds the memory available now; returns the estimate."""
    estimate = plan_memory(plan, config, batch=batch, batch_tiles=batch_tiles, direction=direction, sliced=sliced)
    tiling = ("" if plan.settings.tile_size is None
              else f" in {plan.settings.tile_size} px tiles" + (" (batched)" if batch_tiles else ""))
    check_fits(estimate,
               f"{direction if direction != 'both' else 'encoding and decoding'} {batch} x {plan.num_frames} frames "
               f"of {plan.height}x{plan.width}{tiling}",
               "choose a smaller --size, a smaller --tile-size or --chunk-frames, or a machine with more memory")
    return estimate


UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEFAULT_FRACTION = 0.9  # of the memory available: leave room for the page cache and the rest of the system


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"1.5G"``, ``"512M"``, ``"8GiB"``, ``"1000000"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"memory size {text!r} is not a positive size such as 8G, 1.5G or 512M")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def default_budget() -> int | None:
    """The budget when ``--max-memory`` is not given: 90 % of the memory available now (None if unknown)."""
    available = available_memory()
    return None if available is None else int(available * DEFAULT_FRACTION)
