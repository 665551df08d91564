"""Engines built with ``trtexec``: the sidecars ``cvvae build-engines --print-trtexec`` writes beside its commands
(docs/engines.md, "Engines built with trtexec").

Each printed command gets the sidecar of the engine it will make (:meth:`cvvae.engines.build.EngineBuilder.
trtexec_sidecar`): source graph and its sha256, I/O tensors, profiles, the build options and the exact command, with
the engine's sha256 and environment left empty (*pending*), and the engine directory's ``manifest.json`` lists it.
The first load checks the engine against them and records its sha256 (:mod:`cvvae.engines.engine_check`).

Re-printing the same commands keeps the sidecars (and a sha256 recorded since). An engine that exists and was built
some other way, or by another command, is not given a new sidecar without ``--rebuild``: its old sidecar is the only
record of what it is. Plan files are never deleted here; the printed command overwrites its own.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cvvae.engines.build import EngineBuilder, engine_dir_manifest
from cvvae.engines.sidecar import EngineSidecar, Mismatch
from cvvae.errors import StaleEngineError
from cvvae.fsutil import sha256_file

TRTEXEC = "trtexec"


def is_pending(sidecar: EngineSidecar) -> bool:
    """A trtexec engine whose first load has not yet checked it and recorded its sha256."""
    return sidecar.build.get("builder") == TRTEXEC and not sidecar.engine.get("sha256")


def trtexec_hint(sidecar: EngineSidecar, engine_dir: str | Path | None = None) -> str:
    """What to do about a refused trtexec engine: rebuild it with its own command, or reset its sidecar."""
    command = shlex.join(sidecar.build.get("command") or ["trtexec", "..."])
    export = sidecar.onnx.get("export_dir") or "EXPORT_DIR"
    out = engine_dir or "ENGINE_DIR"
    return (f"run its sidecar's command (from {sidecar.build.get('cwd', '.')}): {command}\n"
            f"If the new plan file is intended, reset its sidecar first: cvvae build-engines --export {export} "
            f"--out {out} --precision {sidecar.precision} --print-trtexec --rebuild")


@dataclass(frozen=True)
class TrtexecEngine:
    """One printed command with its sidecar; ``status``: "written" (a fresh, pending sidecar) or "current"."""

    builder: EngineBuilder
    status: str

    @property
    def command(self) -> list[str]:
        return self.builder.trtexec_command()


def _differences(b: EngineBuilder, old: EngineSidecar, new: EngineSidecar) -> list[Mismatch]:
    out = []
    if old.build.get("builder") != TRTEXEC:
        out.append(Mismatch("builder", old.build.get("builder"), TRTEXEC))
    if old.onnx.get("sha256") != new.onnx["sha256"]:
        out.append(Mismatch("ONNX sha256", old.onnx.get("sha256"), new.onnx["sha256"]))
    if old.io != new.io:
        out.append(Mismatch("I/O tensors", old.io, new.io))
    if old.build.get("builder") == TRTEXEC and old.build.get("command") != new.build["command"]:
        out.append(Mismatch("trtexec command", shlex.join(old.build.get("command") or []),
                            shlex.join(new.build["command"])))
    return out + b.request_differences(old.to_dict())


def write_trtexec_sidecars(builders: Sequence[EngineBuilder], export_dir: str | Path, out_dir: str | Path, *,
                           rebuild: bool = False) -> list[TrtexecEngine]:
    """Write the pending sidecar of each builder's trtexec engine and the engine directory's manifest.json.

    Raises :class:`StaleEngineError` (nothing written) when a plan file exists that another build or command made,
    unless ``rebuild``; and, as ``build_engines`` does, when ``out_dir`` holds another export's engines.
    """
    export_dir, out_dir = Path(export_dir).resolve(), Path(out_dir)
    export_sha = sha256_file(export_dir / "manifest.json")
    dir_manifest = engine_dir_manifest(export_dir, out_dir, export_sha, rebuild=rebuild)
    plans: list[tuple[EngineBuilder, EngineSidecar, str]] = []
    for b in builders:   # decide everything before writing anything
        new = b.trtexec_sidecar(export_dir=export_dir, export_manifest_sha256=export_sha)
        old = None
        if b.sidecar_path.exists():
            try:
                old = EngineSidecar.read(b.sidecar_path)
            except StaleEngineError:
                old = None
        differences = _differences(b, old, new) if old is not None else []
        if old is not None and not differences:
            plans.append((b, old, "current"))
            continue
        if b.engine_path.exists() and not rebuild:
            what = (f"made by {old.build.get('builder')} for something else" if old is not None
                    else "without a readable sidecar")
            lines = [f"{b.engine_path} exists, {what}:"] + [f"  {m}" for m in differences]
            lines.append("Pass --rebuild to give it the sidecar of the printed command (then run that command: it "
                         "overwrites the plan file), or choose another --out")
            raise StaleEngineError("\n".join(lines))
        plans.append((b, new, "written"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for b, sidecar, status in plans:
        if status == "written":
            sidecar.write(b.sidecar_path)
        dir_manifest.engines.setdefault(b.component, {})[b.precision] = b.manifest_entry
        results.append(TrtexecEngine(b, status))
    dir_manifest.write(out_dir)
    return results
