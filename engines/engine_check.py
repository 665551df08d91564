"""Load-time checks of an engine against its sidecar and the export (docs/engines.md, "Engines built with trtexec").

Before TensorRT sees a plan file, :func:`open_engine` reads it once and compares the sha256 of those bytes with the one
its sidecar records, together with the TensorRT version, GPU and source graph (:func:`cvvae.engines.sidecar.
check_current`). After deserializing them it reads the engine's I/O tensors and optimization profiles through the
runtime API (``ICudaEngine.num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``,
``get_tensor_shape``, ``num_optimization_profiles``, ``get_tensor_profile_shape``; :func:`inspect_engine`) and
refuses an engine whose names, dtypes, static dims or profile ranges differ from the sidecar or the export.

Engines built with the ``trtexec`` lines of ``cvvae build-engines --print-trtexec`` come with a sidecar whose engine
sha256 is still empty (:func:`cvvae.engines.trtexec.is_pending`): nothing could record it, since the engine did not
exist yet. The first load checks the source graph, then deserializes and checks I/O and profiles, and only then
records the sha256 of the bytes it checked, and the TensorRT/GPU environment it loaded in, into the sidecar. From then
on the engine is verified like any other, so a rebuilt or foreign plan file is refused with the reason.

Every TensorRT object here is passed in (``trt`` module, engine, a ``deserialize`` callable), so the checks run in
tests with a fake engine exposing the same methods.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from cvvae.errors import BackendUnavailableError, StaleEngineError
from cvvae.engines.sidecar import (EngineEnvironment, EngineSidecar, check_current, now_utc,
                                   sidecar_path, stale_message, stale_reasons)

log = logging.getLogger(__name__)

# TensorRT DataType member name -> the dtype name the export manifest and sidecars use
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
              "INT32": "int32", "INT64": "int64", "BOOL": "bool"}

Range = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class EngineIO:
    """What a deserialized engine says about itself: tensors (name -> mode, dtype, dims with -1 for dynamic axes)
    and, per optimization profile, (min, opt, max) of each input."""

    tensors: dict[str, dict[str, Any]]
    profiles: list[dict[str, Range]]

    @property
    def inputs(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t["mode"] == "input"]

    @property
    def outputs(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t["mode"] == "output"]


def dtype_name(dt: Any) -> str:
    """``DataType.HALF`` -> ``"float16"`` (unknown members keep TensorRT's name)."""
    key = getattr(dt, "name", str(dt).split(".")[-1])
    return TRT_DTYPES.get(key, key)


def inspect_engine(trt: Any, engine: Any) -> EngineIO:
    """The I/O tensors and profiles of a deserialized ``ICudaEngine``."""
    tensors: dict[str, dict[str, Any]] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        tensors[name] = {"mode": mode, "dtype": dtype_name(engine.get_tensor_dtype(name)),
                         "dims": [int(d) for d in engine.get_tensor_shape(name)]}
    profiles = []
    for k in range(engine.num_optimization_profiles):
        profiles.append({n: tuple(tuple(int(v) for v in s) for s in engine.get_tensor_profile_shape(n, k))
                         for n, t in tensors.items() if t["mode"] == "input"})
    return EngineIO(tensors, profiles)


def expected_io(export_manifest: Any, component: str, precision: str) -> dict[str, dict[str, Any]]:
    """Tensor name -> {mode, dtype, dims} of a component's graph, as the export manifest lists it (axis names for
    dynamic dims); what a sidecar's ``io`` holds."""
    entry = export_manifest.component(component)
    dtypes = export_manifest.io_dtypes(component, precision)
    return {t.name: {"mode": mode, "dtype": dtypes.get(t.name, "float32"), "dims": list(t.dims)}
            for mode, tensors in (("input", entry.inputs), ("output", entry.outputs)) for t in tensors}


def _io_text(io: Mapping[str, Mapping[str, Any]]) -> str:
    return ", ".join(f"{n} ({t['mode']}, {t['dtype']})" for n, t in io.items())


def io_problems(found: EngineIO, sidecar: EngineSidecar, export_io: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every way in which the engine's I/O and profiles differ from its sidecar and the export (empty: they match)."""
    problems = []
    for label, io in (("its sidecar", sidecar.io), ("the export", export_io)):
        names = {n: (t["mode"], t["dtype"]) for n, t in io.items()}
        if {n: (t["mode"], t["dtype"]) for n, t in found.tensors.items()} != names:
            problems.append(f"I/O tensors: the engine has {_io_text(found.tensors)}; {label} says {_io_text(io)}")
            continue
        for n, t in io.items():
            static = [d if isinstance(d, int) else -1 for d in t.get("dims", [])]
            got = found.tensors[n]["dims"]
            # axes the graph names are dynamic (-1 in the engine); where both give a number (channels) it must agree
            if len(got) != len(static) or any(-1 not in (g, s) and g != s for g, s in zip(got, static)):
                problems.append(f"tensor {n!r}: the engine's dims are {got}; {label} says {t.get('dims')}")
    wanted = [{n: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])) for n, s in p["shapes"].items()}
              for p in sidecar.profiles]
    if len(found.profiles) != len(wanted):
        problems.append(f"optimization profiles: the engine has {len(found.profiles)}; its sidecar lists "
                        f"{len(wanted)}")
    else:
        for k, (got, want) in enumerate(zip(found.profiles, wanted)):
            for n in sorted(set(got) | set(want)):
                if got.get(n) != want.get(n):
                    problems.append(f"profile {k} of input {n!r}: (min, opt, max) is {_ranges(got.get(n))} in the "
                                    f"engine but {_ranges(want.get(n))} in its sidecar")
    return problems


def _ranges(r: Range | None) -> str:
    return "absent" if r is None else "(" + ", ".join("x".join(map(str, s)) for s in r) + ")"


@dataclass
class OpenedEngine:
    """A deserialized engine that passed every check, with what was learned on the way."""

    engine: Any
    io: EngineIO
    sidecar: EngineSidecar
    sha256: str
    recorded: bool = False                                  # True: this load recorded a trtexec engine's sha256
    tolerated: list[str] = field(default_factory=list)      # mismatches that are logged, not refused


def open_engine(path: Path, *, trt: Any, deserialize: Callable[[bytes], Any], environment: EngineEnvironment,
                expected_onnx_sha256: str | None, export_io: Mapping[str, Mapping[str, Any]],
                rebuild_hint: str) -> OpenedEngine:
    """Read, verify, deserialize and inspect one engine; record a pending trtexec engine's sha256 (module docstring).

    Raises :class:`StaleEngineError` with every reason for an engine that does not fit, and
    :class:`BackendUnavailableError` when TensorRT cannot deserialize it.
    """
    from cvvae.engines.trtexec import is_pending, trtexec_hint

    sidecar = EngineSidecar.read(sidecar_path(path))
    data = path.read_bytes()  # hashed and deserialized from the same bytes: no window for a swap in between
    sha = hashlib.sha256(data).hexdigest()
    pending = is_pending(sidecar)
    hint = trtexec_hint(sidecar, path.parent) if sidecar.build.get("builder") == "trtexec" else rebuild_hint
    env = environment.as_dict()
    if pending:  # nothing recorded the engine yet; the graph it claims to come from must still be the export's
        reasons = stale_reasons({**sidecar.to_dict(), "environment": env}, env, onnx_sha256=expected_onnx_sha256)
        if reasons:
            raise StaleEngineError(stale_message(str(path), reasons, hint))
        tolerated = []
    else:
        tolerated = check_current(sidecar.to_dict(), env, engine=str(path), rebuild_hint=hint,
                                  onnx_sha256=expected_onnx_sha256, engine_sha256=sha)
    engine = deserialize(data)
    if engine is None:
        raise BackendUnavailableError(
            f"TensorRT {environment.tensorrt_version} could not deserialize {path} (built by another TensorRT "
            f"version or for another GPU?); {hint}")
    found = inspect_engine(trt, engine)
    problems = io_problems(found, sidecar, export_io)
    if problems:
        what = "a foreign engine, or one built by another command; nothing was recorded" if pending else \
            "its sidecar does not describe it"
        raise StaleEngineError(f"engine {path} does not match its sidecar and export ({what}):\n  "
                               + "\n  ".join(problems) + f"\nRebuild it: {hint}")
    opened = OpenedEngine(engine, found, sidecar, sha, tolerated=[str(m) for m in tolerated])
    if pending:
        sidecar.engine.update({"sha256": sha, "size_bytes": len(data), "recorded_utc": now_utc()})
        sidecar.environment = env
        try:
            sidecar.write(sidecar_path(path))
        except OSError as e:
            raise StaleEngineError(f"{path} passed its first-use check but its sha256 cannot be recorded in "
                                   f"{sidecar_path(path)} ({e}); make that file writable and load it again") from e
        opened.recorded = True
        log.info("%s: built with trtexec; I/O and profiles match its sidecar; sha256 %s... recorded for %s (TensorRT "
                 "%s)", path.name, sha[:12], environment.gpu_name, environment.tensorrt_version)
    return opened
