"""The dataset plan: :class:`EncoderSpec` (what each encoder loads and which latents it keeps) and
:class:`DatasetPlan` (manifest rows, probes, clips and shards, rebuilt from ``plan.json``), with the settings and the
fingerprint that tie an output folder to one manifest and one set of options, so a rerun sees exactly the same shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cvvae.errors import DatasetError

from .clips import Clip, ClipPolicy, ShardSpec, make_clips, make_shards
from .common import FORMAT, utc_now
from .manifest import ManifestRow

LATENT_MODES = ("moments", "sample")


@dataclass(frozen=True)
class EncoderSpec:
    """What each encoder loads, as :func:`cvvae.runtime.cli.load_runtime` does, plus the kind of latents kept."""

    model: str | None = None
    backend: str = "torch"
    device: str = "cpu"              # "auto": cuda when the machine/cluster has GPUs, else cpu
    precision: str = "fp32"
    batch_tiles: bool = False
    preset: str | None = None
    plan_overrides: Mapping[str, Any] = field(default_factory=dict)
    latents: str = "moments"         # moments: mean + logvar; sample: one draw per clip, its seed recorded
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latents not in LATENT_MODES:
            raise DatasetError(f"latents must be one of {', '.join(LATENT_MODES)}, not {self.latents!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """What changes the latents (the device does not, beyond rounding; batch_tiles is exact)."""
        fields = {"model": self.model, "preset": self.preset, "backend": self.backend, "precision": self.precision,
                  "plan_overrides": dict(self.plan_overrides), "latents": self.latents}
        if self.latents == "sample":
            fields["seed"] = self.seed
        return fields

    def load(self) -> Any:
        from cvvae.runtime.api import VideoVAE

        extra = {"preset": self.preset} if self.preset else {}
        return VideoVAE.load(self.model, backend=self.backend, device=self.device, precision=self.precision,
                             batch_tiles=self.batch_tiles, plan_overrides=dict(self.plan_overrides), **extra)


@dataclass
class DatasetPlan:
    fingerprint: str
    settings: dict[str, Any]
    rows: list[ManifestRow]
    probes: dict[int, dict[str, Any]]
    clips: list[Clip]
    shards: list[ShardSpec]
    skipped: list[dict[str, Any]]   # rows that gave no clips: probe failure, frame range, too short

    @property
    def clips_per_shard(self) -> int:
        return int(self.settings["clips_per_shard"])

    def shard_of(self, clip_index: int) -> ShardSpec:
        return self.shards[clip_index // self.clips_per_shard]

    @classmethod
    def build(cls, rows: list[ManifestRow], probes: Mapping[int, Mapping[str, Any]],
              settings: dict[str, Any]) -> "DatasetPlan":
        policy = ClipPolicy(**{**settings["policy"], "buckets": tuple(map(tuple, settings["policy"]["buckets"]))})
        clips, skipped = make_clips(rows, probes, policy)
        shards = make_shards(len(clips), settings["clips_per_shard"])
        return cls(plan_fingerprint(rows, settings), settings, rows, {k: dict(v) for k, v in probes.items()},
                   clips, shards, skipped)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows], "probes": {str(k): v for k, v in self.probes.items()},
                "created_at": utc_now()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "DatasetPlan":
        rows = [ManifestRow(**r) for r in doc["rows"]]
        return cls.build(rows, {int(k): v for k, v in doc["probes"].items()}, doc["settings"])


def plan_settings(policy: ClipPolicy, clips_per_shard: int, encoder: EncoderSpec) -> dict[str, Any]:
    policy_doc = asdict(policy)
    policy_doc["buckets"] = [list(b) for b in policy.buckets]
    return {"policy": policy_doc, "clips_per_shard": clips_per_shard, "encoder": encoder.fingerprint_fields()}


def plan_fingerprint(rows: Sequence[ManifestRow], settings: Mapping[str, Any]) -> str:
    doc = {"settings": settings, "rows": [asdict(r) for r in rows]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def plan_difference(plan: DatasetPlan, rows: Sequence[ManifestRow], settings: Mapping[str, Any]) -> str:
    changed = sorted(k for k in set(plan.settings) | set(settings) if plan.settings.get(k) != settings.get(k))
    if changed:
        return "settings differ: " + ", ".join(f"{k} was {plan.settings.get(k)} now {settings.get(k)}" for k in changed)
    if len(plan.rows) != len(rows):
        return f"the manifest had {len(plan.rows)} rows, now {len(rows)}"
    first = next(i for i, (a, b) in enumerate(zip(plan.rows, rows)) if a != b)
    return f"manifest row {first} was {plan.rows[first].path}, now {rows[first].path}"
