"""Executors that run the probe and the decode/encode pipeline: :class:`LocalExecutor` (this process, decoding the
next clip on a thread) and :class:`RayExecutor` (Ray Data: decode tasks and an encoder actor pool sized by
:func:`size_pool`, results streamed back to the driver). Ray is imported only by :func:`import_ray`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cvvae.extras import lazy_import

from .clips import Clip, probe_record
from cvvae.errors import DatasetError
from .plan import EncoderSpec
from .workers import ClipEncoder, decode_clip

log = logging.getLogger(__name__)

RAY_INSTEAD = "encode in this process with --executor local"


@dataclass(frozen=True)
class PoolSizing:
    """Encoder actors and what each one reserves, and what one decode task reserves."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float
    torch_threads: int
    device: str


def size_pool(cpus: float, gpus: float, *, device: str = "auto", encoders: int | None = None) -> PoolSizing:
    """Size the encoder pool from the cluster's resources, always leaving CPUs for the decode tasks.

    GPU encoders: one actor per GPU (1 GPU, up to 1 CPU each). CPU encoders: ``CPUs - 1`` actors of 1 CPU (at
    least one actor; fractional below 2 CPUs). Reserving every CPU for actors would leave none for the decode
    tasks and the pipeline would stall (seen on 2-CPU machines).
    """
    if cpus <= 0:
        raise DatasetError(f"the Ray cluster has no CPUs ({cpus}); decode tasks need at least one")
    if encoders is not None and encoders < 1:
        raise DatasetError(f"encoders must be >= 1, got {encoders}")
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus >= 1)
    if use_gpu:
        if gpus < 1:
            raise DatasetError(f"--device {device} asks for GPU encoders but the cluster has {gpus} GPUs; "
                               "pass --device cpu")
        actors = encoders or int(gpus)
        if actors > gpus:
            raise DatasetError(f"{actors} GPU encoders need {actors} GPUs; the cluster has {gpus}")
        actor_cpus = min(1.0, max(0.1, (cpus - 1) / actors))
        return PoolSizing(actors, actor_cpus, 1.0, 1.0, 1, "cuda" if device == "auto" else device)
    spare = 1.0 if cpus >= 2 else cpus / 2
    actors = encoders or max(1, int(cpus - spare))
    actor_cpus = (cpus - spare) / actors if encoders else min(1.0, cpus - spare)
    return PoolSizing(actors, actor_cpus, 0.0, min(1.0, spare), max(1, int(actor_cpus)),
                      "cpu" if device == "auto" else device)


def import_ray() -> Any:
    """Ray with its data library (``ray[data]``), or the install line and the local alternative."""
    ray = lazy_import("ray", "the ray executor", instead=RAY_INSTEAD)
    lazy_import("ray.data", "the ray executor", instead=RAY_INSTEAD)  # ray without the [data] extra lacks it
    return ray


class LocalExecutor:
    """Everything in this process: the next clip is decoded on a thread while this one encodes."""

    name = "local"

    def __init__(self, spec: EncoderSpec) -> None:
        if spec.device == "auto":
            import torch

            spec = replace(spec, device="cuda" if torch.cuda.is_available() else "cpu")
        self.spec = spec
        self.actors, self.device = 1, spec.device

    def probe(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [probe_record(r) for r in records]

    def encode(self, clips: list[Clip]) -> Iterator[dict[str, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        if not clips:
            return
        encoder = ClipEncoder(self.spec)
        with ThreadPoolExecutor(1, thread_name_prefix="cvvae-decode") as pool:
            futures = [pool.submit(decode_clip, {"clip": c.to_json()}) for c in clips[:2]]
            for i in range(len(clips)):
                row = futures[i].result()
                if i + 2 < len(clips):
                    futures.append(pool.submit(decode_clip, {"clip": clips[i + 2].to_json()}))
                futures[i] = None  # type: ignore[call-overload]  (free the frames)
                yield encoder(row)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None          # None: a local instance sized to this machine (or RAY_ADDRESS if set)
    runtime_env: Mapping[str, Any] | None = None
    encoders: int | None = None         # actors; default from the cluster's resources (size_pool)
    num_cpus: int | None = None         # CPUs of a local instance (default: all of this machine)


class RayExecutor:
    """Ray Data: probe and decode in CPU tasks, encode in an actor pool, results streamed back to this driver."""

    name = "ray"

    def __init__(self, spec: EncoderSpec, options: RayOptions) -> None:
        self.ray = import_ray()
        self.owns_ray = not self.ray.is_initialized()
        if self.owns_ray:
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if options.runtime_env:
                kwargs["runtime_env"] = dict(options.runtime_env)
            if options.address is None and options.num_cpus is not None:
                kwargs["num_cpus"] = options.num_cpus
            self.ray.init(address=options.address, **kwargs)
        context = self.ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI draws one progress bar for the whole job
        resources = self.ray.cluster_resources()
        self.sizing = size_pool(resources.get("CPU", 0.0), resources.get("GPU", 0.0), device=spec.device,
                                encoders=options.encoders)
        self.spec = replace(spec, device=self.sizing.device)
        self.actors, self.device = self.sizing.actors, self.sizing.device
        log.info("ray: %s; %s", resources, self.sizing)

    def probe(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ds = self.ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 1024)))
        return sorted(ds.map(probe_record, num_cpus=self.sizing.decode_cpus).take_all(), key=lambda r: r["row"])

    def encode(self, clips: list[Clip]) -> Iterator[dict[str, Any]]:
        if not clips:
            return
        s = self.sizing
        ds = self.ray.data.from_items([{"clip": c.to_json()} for c in clips],
                                      override_num_blocks=max(1, min(len(clips), 4096)))
        # Declaring the decode task's memory is honest accounting, and it also keeps Ray Data from fusing the
        # decode into the encoder actors (it fuses only maps with equal resource requests), which would decode on
        # the actors' CPUs, in series with encoding.
        ds = ds.map(decode_clip, num_cpus=s.decode_cpus, memory=_decode_memory(clips))
        ds = ds.map(ClipEncoder, fn_constructor_kwargs={"spec": self.spec, "threads": s.torch_threads},
                    compute=self.ray.data.ActorPoolStrategy(size=s.actors), num_cpus=s.actor_cpus,
                    num_gpus=s.actor_gpus or None)
        yield from ds.iter_rows()

    def close(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()


def _decode_memory(clips: Sequence[Clip]) -> int:
    """Bytes one decode task may hold: worker baseline, ~16 decoded source frames (YUV 4:2:0), the clip twice."""
    source = max(c.source_height * c.source_width for c in clips) * 3 // 2
    clip = max(c.num_frames * c.height * c.width * 3 for c in clips)
    return 384 * 2**20 + 16 * source + 2 * clip
