"""The output folder: :class:`DatasetDir` (lock, plan.json, index.json, journal.jsonl, errors.jsonl and the
verification of committed shards), :class:`DatasetState` and :class:`RunReport`, the :class:`ShardWriter` that
commits each shard atomically once all its clips are in, and :func:`load_shard` / :func:`iter_clips` that read the
shards back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvvae.errors import DatasetError
from cvvae.fsutil import TEMP_TAG, atomic_path, remove_tree, sha256_file

from .clips import Clip, ShardSpec
from .common import FORMAT, utc_now
from .plan import DatasetPlan

log = logging.getLogger(__name__)

SHARD_FORMAT = "cvvae-dataset-shard/1"
SHARD_HEADER_KEY = "cvvae_shard"  # the one safetensors metadata entry: JSON of format, shard, model, clips, ...
KILL_AFTER_ENV = "CVVAE_DATASET_KILL_AFTER_SHARDS"  # fault injection: SIGKILL this process after N commits
INDEX_FLUSH_S = 5.0


@dataclass
class DatasetState:
    """What is on disk: committed shards (verified), the model that made them, earlier runs."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # shard -> encode errors (retried)


class DatasetDir:
    """The output folder (layout in the docstring of cvvae.runtime.dataset); one run at a time holds its lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.plan_path = self.root / "plan.json"
        self.index_path = self.root / "index.json"
        self.journal_path = self.root / "journal.jsonl"
        self.errors_path = self.root / "errors.jsonl"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise DatasetError(f"another run is writing {self.root} (lock held by pid {f.read().strip()}); "
                                   "wait for it or stop it") from None
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed run left (call with the lock held: no writer is running)."""
        # fsutil's .NAME.cvvae-tmp-PID-HEX names; of earlier versions, .NAME.tmp-HEX and the .tmpXXXXXX that
        # safetensors' save_file made for a shard (both folders are this dataset's alone, and locked)
        stale = [p for d in (self.root, self.root / "shards") if d.is_dir()
                 for pattern in (f".*{TEMP_TAG}*", ".*.tmp-*", ".tmp??????") for p in d.glob(pattern)]
        for path in stale:
            remove_tree(path)
        if stale:
            log.info("removed %d temporary files of an interrupted run", len(stale))
        return stale

    # ----- plan
    def load_plan(self) -> DatasetPlan | None:
        if not self.plan_path.exists():
            return None
        doc = json.loads(self.plan_path.read_text())
        if doc.get("format") != FORMAT:
            raise DatasetError(f"{self.plan_path} is {doc.get('format')!r}, not {FORMAT}; use another folder")
        return DatasetPlan.from_json(doc)

    def save_plan(self, plan: DatasetPlan) -> None:
        with atomic_path(self.plan_path) as tmp:
            tmp.write_text(json.dumps(plan.to_json(), indent=1) + "\n")

    # ----- committed shards
    def load_state(self, plan: DatasetPlan, *, verify: str = "sha256") -> DatasetState:
        """Entries of index.json, overridden by journal.jsonl; only those whose file still checks out are kept."""
        state = DatasetState()
        raw: dict[str, dict[str, Any]] = {}
        if self.index_path.exists():
            doc = json.loads(self.index_path.read_text())
            state.model, state.runs = doc.get("model"), doc.get("runs", [])
            raw.update({s["shard"]: s for s in doc.get("shards", []) if s.get("status") == "complete"})
        for entry in self._journal():
            raw[entry["shard"]] = entry
        known = {s.shard_id for s in plan.shards}
        for shard_id, entry in sorted(raw.items()):
            problem = self._check(entry, plan, verify) if shard_id in known else "not in the plan"
            if problem:
                log.warning("shard %s will be encoded again: %s", shard_id, problem)
                continue
            state.entries[shard_id] = entry
            state.model = state.model or entry.get("model")
        return state

    def _journal(self) -> Iterator[dict[str, Any]]:
        if not self.journal_path.exists():
            return
        for n, line in enumerate(self.journal_path.read_text().splitlines(), 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # the line a killed run was writing
                log.warning("%s line %d is incomplete; ignoring it", self.journal_path, n)

    def _check(self, entry: Mapping[str, Any], plan: DatasetPlan, verify: str) -> str | None:
        if entry.get("fingerprint") != plan.fingerprint:
            return "it belongs to another plan"
        path = self.root / entry["file"]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the index says {entry['bytes']}"
        if verify == "sha256" and sha256_file(path) != entry["sha256"]:
            return f"{path} does not match its sha256 in the index"
        return None

    def append_journal(self, entry: Mapping[str, Any]) -> None:
        with open(self.journal_path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_index(self, plan: DatasetPlan, state: DatasetState) -> None:
        """Rewrite index.json and errors.jsonl (atomically) from the plan and the committed shards."""
        shards, errors = [], list(plan.skipped)
        for spec in plan.shards:
            entry = state.entries.get(spec.shard_id)
            if entry is not None:
                shards.append({**entry, "status": "complete"})
                errors.extend(entry["errors"])
            elif spec.shard_id in state.failed:
                shards.append({"shard": spec.shard_id, "file": spec.file, "status": "failed", "clips": len(spec.clips),
                               "errors": state.failed[spec.shard_id]})
                errors.extend(state.failed[spec.shard_id])
            else:
                shards.append({"shard": spec.shard_id, "file": spec.file, "status": "pending",
                               "clips": len(spec.clips)})
        done = list(state.entries.values())
        doc = {
            "format": FORMAT, "fingerprint": plan.fingerprint, "updated_at": utc_now(), "model": state.model,
            "settings": plan.settings,
            "totals": {"shards": len(plan.shards), "shards_complete": len(done), "clips_planned": len(plan.clips),
                       "clips_encoded": sum(e["encoded"] for e in done),
                       "frames_encoded": sum(e["frames"] for e in done), "bytes": sum(e["bytes"] for e in done),
                       "clip_errors": sum(len(e["errors"]) for e in done), "videos_skipped": len(plan.skipped)},
            "shards": shards, "runs": state.runs,
        }
        with atomic_path(self.index_path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
        with atomic_path(self.errors_path, overwrite=True) as tmp:
            tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))

    def compact_journal(self) -> None:
        """After index.json holds every entry, the journal can start again (a crash here only leaves duplicates)."""
        if self.journal_path.exists():
            with atomic_path(self.journal_path, overwrite=True) as tmp:
                tmp.write_text("")


@dataclass
class RunReport:
    """What one ``encode_dataset`` run did; throughput counts the clip frames encoded in this run."""

    executor: str
    encoders: int
    device: str
    shards_total: int = 0
    shards_skipped: int = 0      # already complete (verified) before this run
    shards_written: int = 0
    shards_failed: int = 0       # clips that failed to encode: retried by the next run
    clips_encoded: int = 0
    frames_encoded: int = 0
    clip_errors: int = 0         # clips skipped because their video could not be decoded
    videos_skipped: int = 0      # rows that gave no clips (unreadable, frame range, too short)
    plan_s: float = 0.0          # manifest, probing, verifying earlier shards
    encode_wall_s: float = 0.0   # from the first clip sent to the last shard written (actor start-up included)
    decode_s: float = 0.0        # summed over workers
    encode_s: float = 0.0        # summed over encoders
    decode_processes: list[int] = field(default_factory=list)  # pids that decoded / encoded clips
    encode_processes: list[int] = field(default_factory=list)
    started_at: str = field(default_factory=utc_now)
    status: str = "running"

    @property
    def frames_per_s(self) -> float:
        return self.frames_encoded / self.encode_wall_s if self.encode_wall_s else 0.0

    @property
    def clips_per_s(self) -> float:
        return self.clips_encoded / self.encode_wall_s if self.encode_wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "frames_per_s": round(self.frames_per_s, 3), "clips_per_s": round(self.clips_per_s, 3)}


class ShardWriter:
    """Collects encoded clips (in any order) and commits each shard when all its clips are in.

    The only writer of the output folder: shard file (atomic rename), then a journal line (fsync), then, at most
    every ``INDEX_FLUSH_S`` seconds, index.json and errors.jsonl.
    """

    def __init__(self, out: DatasetDir, plan: DatasetPlan, state: DatasetState, report: RunReport, *,
                 max_encode_errors: int) -> None:
        self.out, self.plan, self.state, self.report = out, plan, state, report
        self.max_encode_errors = max_encode_errors
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}
        self.encode_errors = 0
        self.last_flush = 0.0
        self.started = time.perf_counter()
        kill = os.environ.get(KILL_AFTER_ENV)
        self.kill_after = int(kill) if kill else None

    def add(self, result: dict[str, Any]) -> None:
        clip = Clip.from_json(result["clip"])
        spec = self.plan.shard_of(clip.index)
        for pids, pid in ((self.report.decode_processes, result["decode_pid"]),
                          (self.report.encode_processes, result["encode_pid"])):
            if pid not in pids:
                pids.append(int(pid))
        got = self.pending.setdefault(spec.shard_id, {})
        got[clip.index] = result
        if result["stage"] == "encode":
            self.encode_errors += 1
            if self.encode_errors > self.max_encode_errors:
                self.flush(force=True)
                raise DatasetError(f"{self.encode_errors} clips failed to encode (last: {clip.path} frames "
                                   f"{clip.start}..{clip.end - 1}: {result['error']}); stopping. Fix the cause "
                                   "and rerun: finished shards are kept")
        if len(got) == len(spec.clips):
            self._commit(spec, [got[i] for i in spec.clips])
            del self.pending[spec.shard_id]
            self.flush()

    def _commit(self, spec: ShardSpec, results: list[dict[str, Any]]) -> None:
        from safetensors.numpy import save as safetensors_bytes

        identity = json.loads(results[0]["identity"])
        if self.state.model is None:
            self.state.model = identity
        elif self.state.model != identity:
            raise DatasetError(f"the encoders' model {identity} is not the one that wrote the earlier shards "
                               f"({self.state.model}); the checkpoint changed: use a new output folder")
        tensors: dict[str, np.ndarray] = {}
        records, errors, failed = [], [], []
        for pos, (idx, r) in enumerate(zip(spec.clips, results)):
            clip = self.plan.clips[idx]
            if r["error"]:
                problem = {"kind": r["stage"], "row": clip.row, "path": clip.path, "clip_id": clip.clip_id,
                           "shard": spec.shard_id, "start": clip.start, "end": clip.end, "reason": r["error"]}
                (failed if r["stage"] == "encode" else errors).append(problem)
                continue
            key = f"{pos:04d}"
            if self.plan.settings["encoder"]["latents"] == "sample":
                tensors[f"{key}/sample"] = np.ascontiguousarray(r["mean"])
            else:
                tensors[f"{key}/mean"] = np.ascontiguousarray(r["mean"])
                tensors[f"{key}/logvar"] = np.ascontiguousarray(r["logvar"])
            records.append({**clip.to_dict(), "key": key, "position": pos, "latent_shape": list(r["mean"].shape),
                            "seed": r["seed"] if r["seed"] >= 0 else None,
                            "model_sha256": identity.get("model_sha256"),
                            "scaling_factor": identity.get("scaling_factor")})
            self.report.decode_s += r["decode_s"]
            self.report.encode_s += r["encode_s"]
        if failed:  # not written: the next run encodes this shard again
            self.state.failed[spec.shard_id] = failed
            self.report.shards_failed += 1
            return
        self.state.failed.pop(spec.shard_id, None)
        path = self.out.root / spec.file
        header = {"format": SHARD_FORMAT, "shard": spec.shard_id, "fingerprint": self.plan.fingerprint,
                  "latents": self.plan.settings["encoder"]["latents"], "model": identity, "clips": records}
        # one metadata entry: safetensors writes several in random order, one keeps the bytes reproducible
        metadata = {SHARD_HEADER_KEY: json.dumps(header, sort_keys=True)}
        with atomic_path(path, overwrite=True) as tmp:  # a file left by a killed run is not in the journal
            tmp.write_bytes(safetensors_bytes(tensors, metadata=metadata))  # not save_file: no private temporary
        entry = {"shard": spec.shard_id, "file": spec.file, "fingerprint": self.plan.fingerprint,
                 "sha256": sha256_file(path), "bytes": path.stat().st_size, "clips": len(spec.clips),
                 "encoded": len(records), "frames": sum(c["num_frames"] for c in records), "errors": errors,
                 "model": identity, "completed_at": utc_now()}
        self.out.append_journal(entry)
        self.state.entries[spec.shard_id] = entry
        self.report.shards_written += 1
        self.report.clips_encoded += len(records)
        self.report.frames_encoded += entry["frames"]
        self.report.clip_errors += len(errors)
        if self.kill_after is not None and self.report.shards_written >= self.kill_after:
            log.warning("%s=%d: killing this process after shard %s", KILL_AFTER_ENV, self.kill_after, spec.shard_id)
            os.kill(os.getpid(), signal.SIGKILL)

    def flush(self, *, force: bool = False) -> None:
        if force or time.monotonic() - self.last_flush >= INDEX_FLUSH_S:
            if self.report.status == "running":  # so a killed run still shows its progress
                self.report.encode_wall_s = time.perf_counter() - self.started
                self.state.runs[-1] = self.report.as_dict()
            self.out.write_index(self.plan, self.state)
            self.last_flush = time.monotonic()


@dataclass
class ClipLatents:
    """One clip of a shard: its record (path, frame range, fps, original size, columns, ...) and its latents."""

    record: dict[str, Any]
    latents: Any   # cvvae.runtime.api.Latents (mean/logvar, or the sample as mean with logvar None)


def load_shard(path: str | Path) -> tuple[dict[str, Any], list[ClipLatents]]:
    """The header (format, shard, fingerprint, latents, model) and the clips of one shard file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cvvae.runtime.api import Latents

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(SHARD_HEADER_KEY, "{}"))
    if header.get("format") != SHARD_FORMAT:
        raise DatasetError(f"{path} is not a {SHARD_FORMAT} shard (no {SHARD_HEADER_KEY!r} header of that format)")
    tensors = load_file(str(path))
    out = []
    for rec in header["clips"]:
        rec, key = {**rec, "shard": header["shard"]}, rec["key"]
        mean = tensors.get(f"{key}/mean", tensors.get(f"{key}/sample"))
        meta = {**header["model"], "fps": rec["fps"], "source_video": rec["path"], "clip_id": rec["clip_id"]}
        out.append(ClipLatents(rec, Latents(mean, tensors.get(f"{key}/logvar"), rec["num_frames"], rec["height"],
                                            rec["width"], meta)))
    return header, out


def iter_clips(out_dir: str | Path, shards: Iterable[str] | None = None) -> Iterator[ClipLatents]:
    """Clips of the complete shards (all, or those listed), in plan order."""
    index = json.loads(DatasetDir(out_dir).index_path.read_text())
    wanted = set(shards) if shards is not None else None
    for entry in index["shards"]:
        if entry["status"] == "complete" and (wanted is None or entry["shard"] in wanted):
            yield from load_shard(Path(out_dir) / entry["file"])[1]
