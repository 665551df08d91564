"""Dataset encoding: a manifest of videos -> fixed-length clips -> resumable shards of latents.

One pipeline, two executors (``local``: in this process; ``ray``: Ray Data on a local instance or a cluster):

1. :func:`read_manifest` turns INPUTS (a directory, a glob, a text list of paths, a CSV/TSV/Parquet/JSONL
   manifest) into :class:`ManifestRow` s: path, optional frame range ``[start, end)``, other columns passed through.
2. Every row's video is probed once (Ray tasks, or here). :class:`ClipPolicy` cuts clips (1+4k frames, stride,
   step, at most N per video, resized/cropped to a size bucket); clips are sorted by (path, start, row) and grouped
   into shards of ``clips_per_shard`` with ids ``000000, 000001, ...``. The rows, probe results and settings are
   kept in ``plan.json`` under a fingerprint, so a rerun sees exactly the same shards without probing again.
3. Clips of the shards not yet complete are decoded (:func:`decode_clip`: CPU tasks under Ray) and encoded by
   :class:`ClipEncoder` (one :class:`~cvvae.runtime.api.VideoVAE` each: an actor pool under Ray). The
   :class:`ShardWriter` on the driver writes each shard atomically once all its clips are in, appends it to
   ``journal.jsonl`` (fsync'd) and refreshes ``index.json`` and ``errors.jsonl`` every few seconds.

Output folder::

    plan.json        format, fingerprint, settings (clip policy, shard size, encoder), manifest rows + probes
    index.json       model identity, totals, every shard (status, file, sha256, bytes, clips, frames, errors), runs
    journal.jsonl    one line per committed shard: what a killed run leaves for the next one
    errors.jsonl     every video or clip that was skipped, with the stage and the reason
    shards/shard-000000.safetensors
                     tensors "{pos:04d}/mean" + "{pos:04d}/logvar" (or "{pos:04d}/sample") per clip, float32,
                     (1, z, 1+(T-1)//4, H/8, W/8); metadata "cvvae_shard" = JSON header with the clip records

A rerun skips every shard whose journal/index entry matches its file (size and sha256), so a killed job loses at most
the shards in flight. Videos that cannot be probed or decoded are recorded and skipped; clips that fail to *encode*
(e.g. out of memory) leave their shard uncommitted, so the next run retries it.

Modules, one job each: :mod:`.manifest` (INPUTS -> rows), :mod:`.clips` (clip policy, clips, shards, probing),
:mod:`.plan` (encoder spec, plan and fingerprint), :mod:`.workers` (decode and encode functions run by the workers),
:mod:`.store` (the output folder, the shard writer, reading shards back) and :mod:`.executors` (local and Ray); this
package holds the entry points and re-exports the public names.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cvvae.errors import DatasetError

from .clips import Clip, ClipPolicy, ShardSpec, make_clips, make_shards, probe_record
from .common import FORMAT, HW, utc_now
from .executors import RAY_INSTEAD, LocalExecutor, PoolSizing, RayExecutor, RayOptions, import_ray, size_pool
from .manifest import RESERVED_COLUMNS, VIDEO_SUFFIXES, ManifestRow, read_manifest
from .plan import LATENT_MODES, DatasetPlan, EncoderSpec, plan_difference, plan_fingerprint, plan_settings
from .store import (INDEX_FLUSH_S, KILL_AFTER_ENV, SHARD_FORMAT, SHARD_HEADER_KEY, ClipLatents, DatasetDir,
                    DatasetState, RunReport, ShardWriter, iter_clips, load_shard)
from .workers import EMPTY_FRAMES, EMPTY_LATENT, ClipEncoder, clip_seed, decode_clip

__all__ = [
    "EMPTY_FRAMES", "EMPTY_LATENT", "FORMAT", "HW", "INDEX_FLUSH_S", "KILL_AFTER_ENV", "LATENT_MODES", "RAY_INSTEAD",
    "RESERVED_COLUMNS", "SHARD_FORMAT", "SHARD_HEADER_KEY", "VIDEO_SUFFIXES", "Clip", "ClipEncoder", "ClipLatents",
    "ClipPolicy", "DatasetDir", "DatasetError", "DatasetPlan", "DatasetState", "EncoderSpec", "LocalExecutor",
    "ManifestRow", "PoolSizing", "ProgressFn", "RayExecutor", "RayOptions", "RunReport", "ShardSpec", "ShardWriter",
    "clip_seed", "dataset_stats", "decode_clip", "decode_dataset", "encode_dataset", "import_ray", "iter_clips",
    "load_shard", "make_clips", "make_shards", "plan_fingerprint", "plan_settings", "probe_record", "read_manifest",
    "size_pool",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]  # (clip frames done, total clip frames)


def encode_dataset(inputs: str | Path | Sequence[str | Path], out_dir: str | Path, *, policy: ClipPolicy,
                   encoder: EncoderSpec, clips_per_shard: int = 64, executor: str = "ray",
                   ray: RayOptions | None = None, verify: str = "sha256", max_encode_errors: int = 16,
                   on_progress: ProgressFn | None = None) -> RunReport:
    """Encode every clip of the manifest into shards under ``out_dir``, resuming what an earlier run left."""
    if executor not in ("local", "ray"):
        raise DatasetError(f"executor must be 'local' or 'ray', not {executor!r}")
    if verify not in ("sha256", "size"):
        raise DatasetError(f"verify must be 'sha256' or 'size', not {verify!r}")
    settings = plan_settings(policy, clips_per_shard, encoder)
    make_shards(0, clips_per_shard)  # checks clips_per_shard before anything expensive
    rows = read_manifest(inputs)
    out = DatasetDir(out_dir)
    t0 = time.perf_counter()
    with out.locked():
        out.remove_temporaries()
        plan = out.load_plan()
        if plan is not None and plan.fingerprint != plan_fingerprint(rows, settings):
            raise DatasetError(f"{out.root} holds a dataset planned from another manifest or other settings "
                               f"({plan_difference(plan, rows, settings)}); use a new output folder, or rerun "
                               "with the original INPUTS and options")
        ex = LocalExecutor(encoder) if executor == "local" else RayExecutor(encoder, ray or RayOptions())
        try:
            if plan is None:
                records = ex.probe([{"row": r.row, "path": r.path} for r in rows])
                plan = DatasetPlan.build(rows, {r["row"]: json.loads(r["probe"]) for r in records}, settings)
                out.save_plan(plan)
            state = out.load_state(plan, verify=verify)
            for run in state.runs:  # a run that never finished was killed
                if run.get("status") == "running":
                    run["status"] = "interrupted"
            report = RunReport(ex.name, ex.actors, ex.device, shards_total=len(plan.shards),
                               shards_skipped=len(state.entries), videos_skipped=len(plan.skipped))
            state.runs.append(report.as_dict())
            todo = [s for s in plan.shards if s.shard_id not in state.entries]
            clips = [plan.clips[i] for s in todo for i in s.clips]
            total = sum(c.num_frames for c in clips)
            report.plan_s = time.perf_counter() - t0
            writer = ShardWriter(out, plan, state, report, max_encode_errors=max_encode_errors)
            writer.flush(force=True)
            out.compact_journal()  # index.json now holds every verified entry; a torn last line goes with it
            done = 0
            try:
                for result in ex.encode(clips):
                    writer.add(result)
                    done += json.loads(result["clip"])["num_frames"]
                    if on_progress:
                        on_progress(done, total)
                report.status = "failed" if report.shards_failed else "finished"
            except BaseException:
                report.status = "failed"
                raise
            finally:
                report.encode_wall_s = time.perf_counter() - writer.started
                state.runs[-1] = {**report.as_dict(), "finished_at": utc_now()}
                writer.flush(force=True)
            out.compact_journal()
        finally:
            ex.close()
    log.info("encode-dataset %s: %s", out.root, report.as_dict())
    return report


def decode_dataset(out_dir: str | Path, dest: str | Path, vae: Any, *, shards: Iterable[str] | None = None,
                   limit: int | None = None, fmt: str = "mp4", crf: int = 18, overwrite: bool = False,
                   on_clip: Callable[[Path, int], None] | None = None) -> list[Path]:
    """Decode clips back to ``dest/shard-ID/POS-CLIPID.mp4`` (or PNG folders), for evaluation."""
    from cvvae.video_io import VideoWriter, tensor_to_frames

    if fmt not in ("mp4", "png"):
        raise DatasetError(f"format must be 'mp4' or 'png', not {fmt!r}")
    if not DatasetDir(out_dir).index_path.exists():
        raise DatasetError(f"{out_dir} has no index.json: not an encode-dataset output folder")
    written: list[Path] = []
    for item in iter_clips(out_dir, shards):
        if limit is not None and len(written) >= limit:
            break
        rec = item.record
        name = f"{rec['position']:04d}-{rec['clip_id']}" + (".mp4" if fmt == "mp4" else "")
        target = Path(dest) / f"shard-{rec['shard']}" / name
        frames = 0
        with VideoWriter(target, rec["fps"] or 30.0, crf=crf, overwrite=overwrite) as writer:
            for pixels in vae.decode_stream(item.latents):
                writer.write(tensor_to_frames(pixels[0]))
                frames += pixels.shape[2]
        written.append(target)
        if on_clip:
            on_clip(target, frames)
    return written


def dataset_stats(out_dir: str | Path) -> dict[str, Any]:
    """Counts, frames, bytes, throughput of each run and errors by kind, from index.json and the journal."""
    out = DatasetDir(out_dir)
    plan = out.load_plan()
    if plan is None:
        raise DatasetError(f"{out.root} has no plan.json: not an encode-dataset output folder")
    state = out.load_state(plan, verify="size")
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()] if out.errors_path.exists() else []
    by_kind: dict[str, int] = {}
    for e in errors:
        by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
    done = list(state.entries.values())
    return {
        "folder": str(out.root),
        "model": state.model,
        "latents": plan.settings["encoder"]["latents"],
        "videos": len(plan.rows),
        "videos_skipped": len(plan.skipped),
        "shards": {"total": len(plan.shards), "complete": len(done), "pending": len(plan.shards) - len(done)},
        "clips": {"planned": len(plan.clips), "encoded": sum(e["encoded"] for e in done),
                  "errors": sum(len(e["errors"]) for e in done)},
        "frames": {"planned": sum(c.num_frames for c in plan.clips), "encoded": sum(e["frames"] for e in done)},
        "bytes": sum(e["bytes"] for e in done),
        "errors_by_kind": by_kind,
        "runs": [{k: r.get(k) for k in ("started_at", "status", "executor", "encoders", "device", "shards_written",
                                         "clips_encoded", "frames_encoded", "encode_wall_s", "frames_per_s",
                                         "clips_per_s")} for r in state.runs],
    }
