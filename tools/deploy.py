"""``cvvae deploy`` (and ``./build.sh``, which calls it): one command from a checkpoint to checked deployment artifacts
on a CPU-only or a GPU machine (spec: "Deployment pipeline").

Steps, in order; a step whose outputs are current is skipped, a step that fails stops the run with its reason:

1. **model**: ``--model``, else the built-in default model, else ``random:tiny-v1`` (said so: random weights check
   the pipeline, not quality).
2. **export**: ONNX graphs (fp32 and ``--precision``), each verified against PyTorch in ONNX Runtime
   (:func:`cvvae.export.to_onnx.export_model`).
3. **int8** (only with ``--int8``): Q/DQ graphs calibrated on the clip (:func:`cvvae.calibration.quantize.
   calibrate_export`) in a copy of the export, ``OUT/export-int8``; later steps use that copy.
4. **engines**: TensorRT engines with sidecars (:func:`cvvae.engines.build.build_engines`) where TensorRT and a CUDA
   GPU are present; elsewhere the step is skipped with the reason, and the trtexec commands (with the sidecars that
   let the tensorrt backend load what they build) go to ``OUT/trtexec.<precision>.sh``. Either way the Polygraphy
   command that compares TensorRT with ONNX Runtime layer by layer goes to ``OUT/polygraphy.<precision>.sh``.
5. **parity**: every available backend and precision against PyTorch fp32 on a real clip (a few frames at a small
   size) through the whole chunk/tile plan (:func:`cvvae.tools.parity.run_parity`), judged by
   :data:`cvvae.compare.PARITY`.
6. **summary**: a table of the steps and of the parity errors, the trtexec and Polygraphy lines; the run's record in
   ``OUT/deploy.json``.

Being current: each step records in ``OUT/.build-state.json`` what it was made from (model sha256 or
``random:PRESET``, cvvae version, options, sha256 of the files it read) and the size and mtime of every file it wrote.
It is current when both are unchanged; otherwise the summary says which input or output changed. Engines are current
when :func:`~cvvae.engines.build.build_engines` says so (their sidecars: TensorRT, GPU, ONNX sha256, profiles).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cvvae.compare import Comparison, format_table
from cvvae.engines.sidecar import cvvae_version
from cvvae.errors import DeployError, InputError
from cvvae.fsutil import atomic_path, sha256_file

STATE_NAME = ".build-state.json"
RECORD_NAME = "deploy.json"
FALLBACK_MODEL = "random:tiny-v1"
PRECISIONS = ("fp32", "fp16")
CLIP_FOLDER = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "videos"
Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"[deploy] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DeployConfig:
    """What ``cvvae deploy`` does; checked on creation."""

    out: Path = Path("artifacts")
    model: str | None = None
    precision: str = "fp16"
    int8: bool = False
    clip: Path | None = None
    frames: int = 9
    size: tuple[int, int] = (64, 96)
    force: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be fp32 or fp16, got {self.precision!r} (int8 graphs come from --int8 "
                             "calibration)")
        if self.frames < 1:
            raise InputError(f"frames must be at least 1, got {self.frames}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise InputError(f"size must be two positive numbers (H, W), got {self.size}")
        object.__setattr__(self, "out", Path(self.out))


@dataclass
class StepResult:
    step: str
    status: str            # done, current, skipped, FAILED
    seconds: float | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "status": self.status, "seconds": self.seconds, "detail": self.detail}


@dataclass
class DeployResult:
    """Steps, parity rows and the engine commands of one run."""

    out: Path
    steps: list[StepResult] = field(default_factory=list)
    parity: list[Comparison] = field(default_factory=list)
    commands: dict[str, list[str]] = field(default_factory=dict)  # trtexec.<p> / polygraphy.<p> -> lines

    @property
    def failed(self) -> list[str]:
        return [s.step for s in self.steps if s.status == "FAILED"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "ok": self.ok, "cvvae": cvvae_version(),
                "steps": [s.as_dict() for s in self.steps], "parity": [c.as_dict() for c in self.parity],
                "commands": self.commands}

    def summary(self) -> str:
        lines = [f"== cvvae deploy summary: {self.out} ==", f"{'step':<10} {'status':<15} {'seconds':>8}  detail"]
        for s in self.steps:
            seconds = "-" if s.seconds is None else f"{s.seconds:.1f}"
            lines.append(f"{s.step:<10} {s.status:<15} {seconds:>8}  {s.detail}")
        if self.parity:
            lines += ["", "parity against PyTorch fp32 on the same clip and plan (status: max abs <= tolerance; "
                          "int8: PSNR)", format_table(self.parity, "deploy")]
        for name, commands in self.commands.items():
            what = ("build the engines with trtexec" if name.startswith("trtexec")
                    else "compare TensorRT with ONNX Runtime layer by layer")
            lines += ["", f"# {what} ({name.split('.', 1)[1]}; also in {self.out / (name + '.sh')}):", *commands]
        lines += ["", f"result: {'FAILED (' + ', '.join(self.failed) + ')' if self.failed else 'ok'}"]
        return "\n".join(lines)


# ----- state: what each step was made from, and what it wrote ---------------------------------------------------------
def _stamp(path: Path) -> list[int]:
    s = path.stat()
    return [s.st_size, s.st_mtime_ns]


class State:
    """``OUT/.build-state.json``: per step, its inputs (name -> digest) and outputs (path -> [size, mtime_ns])."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / STATE_NAME
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("steps", {})

    def why_not_current(self, step: str, inputs: dict[str, Any], outputs: Sequence[Path]) -> str | None:
        """None when ``step`` was recorded with these inputs and its outputs are untouched, else the reason."""
        rec = self.data["steps"].get(step)
        if rec is None:
            return "not run yet"
        changed = [k for k in sorted(set(inputs) | set(rec["inputs"])) if inputs.get(k) != rec["inputs"].get(k)]
        if changed:
            return f"changed since the last run: {', '.join(changed)}"
        recorded = rec["outputs"]
        for path in outputs:
            rel = os.path.relpath(path, self.out)
            if rel not in recorded:
                return f"{rel} was not written by the last run"
        for rel, stamp in recorded.items():
            path = self.out / rel
            if not path.exists():
                return f"{rel} is missing"
            if _stamp(path) != stamp:
                return f"{rel} changed since it was written"
        return None

    def record(self, step: str, inputs: dict[str, Any], outputs: Sequence[Path]) -> None:
        self.data["steps"][step] = {"inputs": inputs, "recorded": time.time(),
                                    "outputs": {os.path.relpath(p, self.out): _stamp(p) for p in outputs}}
        with atomic_path(self.path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")


def _export_files(export_dir: Path) -> list[Path]:
    """manifest.json and every graph (and weights) file it lists."""
    from cvvae.export.manifest import load_manifest

    manifest = load_manifest(export_dir)
    files = {export_dir / "manifest.json"}
    for entry in manifest.components.values():
        for f in entry.files.values():
            files.update(export_dir / p for p in (f.path, f.data_path) if p)
    return sorted(files)


def _export_is_readable(export_dir: Path) -> bool:
    try:
        _export_files(export_dir)
        return True
    except Exception:
        return False


def tensorrt_unavailable() -> str | None:
    """Why TensorRT engines cannot be built here, or None when they can."""
    from cvvae.extras import is_installed

    if not is_installed("tensorrt"):
        return "TensorRT is not installed"
    import torch

    return None if torch.cuda.is_available() else "TensorRT is installed but no CUDA GPU is visible"


def default_clip() -> Path | None:
    """The first clip of the shared data folder next to the checkout, if there is one."""
    clips = sorted(CLIP_FOLDER.glob("*.mp4"))
    return clips[0] if clips else None


def _dims(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def polygraphy_command(builder: Any) -> list[str]:
    """``polygraphy run GRAPH --trt --onnxrt ...`` comparing TensorRT with ONNX Runtime on every layer's output.

    Layer by layer needs the ONNX graph (an engine's outputs are fixed at build time): ``--trt-outputs mark all
    --onnx-outputs mark all`` make every tensor an output of both. The engine's profiles become ``--trt-min/opt/
    max-shapes`` groups, the input is the first profile's opt shape (Polygraphy's data loader fills it), and the
    tolerance is the parity tolerance of the precision (:data:`cvvae.compare.PARITY`).
    """
    from cvvae.compare import EXPORT, parity_tolerance

    cmd = ["polygraphy", "run", str(builder.onnx_path), "--trt", "--onnxrt", "--strongly-typed"]
    for p in builder.profiles:
        for flag, attr in (("--trt-min-shapes", "min"), ("--trt-opt-shapes", "opt"), ("--trt-max-shapes", "max")):
            cmd.append(flag)
            cmd += [f"{name}:{_dims(getattr(shapes, attr))}" for name, shapes in p.items()]
    if builder.profiles:
        cmd.append("--input-shapes")
        cmd += [f"{name}:{_dims(shapes.opt)}" for name, shapes in builder.profiles[0].items()]
    cmd += ["--trt-outputs", "mark", "all", "--onnx-outputs", "mark", "all"]
    tol = parity_tolerance(builder.precision, "component")
    if tol.atol is not None:
        rtol = EXPORT[builder.precision].rtol if builder.precision in EXPORT else 0.0
        cmd += ["--atol", f"{tol.atol:g}", "--rtol", f"{rtol or 1e-5:g}"]
    else:  # int8: error statistics, not elementwise bounds
        cmd += ["--check-error-stat", "median"]
    return cmd


# ----- the pipeline ---------------------------------------------------------------------------------------------------
class Pipeline:
    """One run of the steps over ``config.out``; each ``step_*`` returns (status, detail) or raises."""

    def __init__(self, config: DeployConfig, say: Say = _stderr) -> None:
        self.config = config
        self.say = say
        self.out = config.out.resolve()
        self.export_dir = self.out / "export"
        self.engine_dir = self.out / "engines"
        self.logs = self.out / "logs"
        self.result = DeployResult(self.out)
        self.state: State | None = None
        self.model_spec: str | None = None
        self.model: Any = None
        self.model_id: str | None = None
        self.exported = False
        self.engine_precisions: list[str] = []
        self.engines_built = False
        self.clip = config.clip if config.clip is not None else default_clip()

    # ----- steps ---------------------------------------------------------------------------------------------------
    def step_model(self) -> tuple[str, str]:
        from cvvae.loading import DEFAULT_MODEL_DIR, load_model

        spec = self.config.model
        status, detail = "given", spec
        if spec is None:
            if (DEFAULT_MODEL_DIR / "config.json").exists():
                spec, status = str(DEFAULT_MODEL_DIR), "default"
                detail = f"{DEFAULT_MODEL_DIR} (the built-in default model)"
            else:
                spec, status = FALLBACK_MODEL, "fallback"
                detail = f"{spec} (no built-in default model in cvvae/weights/default)"
                self.say(f"no built-in default model; using {spec}: random weights, so parity checks the pipeline, "
                         "not quality")
        self.model_spec = spec
        if spec.startswith("random:"):
            from cvvae.config import preset

            preset(spec.removeprefix("random:"))  # an unknown preset stops here, not in the export
            self.model_id = spec
        else:
            self.model = load_model(spec)
            self.model_id = self.model.checkpoint_info.sha256
        return status, detail

    def step_export(self) -> tuple[str, str]:
        precisions = ",".join(dict.fromkeys(("fp32", self.config.precision)))
        inputs = {"model": self.model_id, "precisions": precisions, "cvvae": cvvae_version()}
        why = "--force"
        if not self.config.force:
            outputs = _export_files(self.export_dir) if _export_is_readable(self.export_dir) else []
            why = self.state.why_not_current("export", inputs, outputs) if outputs else "no export yet"
            if why is None:
                self.say("export: current; skipped")
                return "current", f"{self.export_dir} ({precisions}) is current"
        self.say(f"export: {why}; exporting {self.model_spec} ({precisions})")
        from cvvae.export.precision import parse_precisions
        from cvvae.export.to_onnx import ExportConfig, export_model
        from cvvae.loading import load_model

        model = self.model if self.model is not None else load_model(self.model_spec)
        with self._log("export") as log:
            export_model(model, self.export_dir, ExportConfig(precisions=parse_precisions(precisions)),
                         overwrite=self.export_dir.exists(), on_progress=log)
        self.state.record("export", inputs, _export_files(self.export_dir))
        self.exported = True
        return "done", f"{self.export_dir} ({precisions}, verified in ONNX Runtime)"

    def step_int8(self) -> tuple[str, str]:
        if not self.config.int8:
            return "skipped", "not asked: pass --int8 to calibrate"
        if self.clip is None or not Path(self.clip).is_file():
            raise InputError(f"no clip to calibrate on ({self.clip or 'none found in ' + str(CLIP_FOLDER)}): "
                             "pass --clip VIDEO")
        int8_dir = self.out / "export-int8"
        inputs = {"export": sha256_file(self.export_dir / "manifest.json"), "clip": sha256_file(self.clip),
                  "cvvae": cvvae_version()}
        why = "--force"
        if not self.config.force:
            outputs = _export_files(int8_dir) if _export_is_readable(int8_dir) else []
            why = self.state.why_not_current("int8", inputs, outputs) if outputs else "no int8 export yet"
            if why is None:
                self.export_dir = int8_dir
                return "current", f"{int8_dir} is current"
        self.say(f"int8: {why}; calibrating on {Path(self.clip).name}")
        from cvvae.calibration.quantize import CalibrationConfig, calibrate_export

        with self._log("int8") as log:
            calibrate_export(self.export_dir, [self.clip], int8_dir, CalibrationConfig(),
                             overwrite=int8_dir.exists(), on_progress=log)
        self.state.record("int8", inputs, _export_files(int8_dir))
        self.export_dir = int8_dir
        self.exported = True  # new graphs: engines and their sidecars are rebuilt
        return "done", f"int8 graphs in {int8_dir}"

    def step_engines(self) -> tuple[str, str]:
        from cvvae.engines import build
        from cvvae.engines.profile import default_spec
        from cvvae.export.manifest import load_manifest

        manifest = load_manifest(self.export_dir)
        self.engine_precisions = [self.config.precision]
        if self.config.int8 and any("int8" in manifest.precisions(c) for c in manifest.components):
            self.engine_precisions.append("int8")
        rebuild = self.config.force or self.exported or self._engines_from_other_export()
        unavailable = tensorrt_unavailable()
        statuses: list[str] = []
        for p in self.engine_precisions:
            builders = build.plan_engines(self.export_dir, self.engine_dir, p, spec=default_spec(manifest))
            if unavailable:
                from cvvae.engines.trtexec import write_trtexec_sidecars

                written = write_trtexec_sidecars(builders, self.export_dir, self.engine_dir, rebuild=rebuild)
                self._write_commands(f"trtexec.{p}", [t.builder.trtexec_line() for t in written])
            self._write_commands(f"polygraphy.{p}", [shlex.join(polygraphy_command(b)) for b in builders])
            if unavailable:
                continue
            with self._log(f"engines.{p}") as log:
                results = build.build_engines(self.export_dir, self.engine_dir, p, spec=default_spec(manifest),
                                              rebuild=rebuild, on_progress=log)
            statuses += [r.status for r in results]
        if unavailable:
            self.say(f"engines: {unavailable}; not building them (trtexec lines and sidecars written)")
            where = ", ".join(str(self.out / f"trtexec.{p}.sh") for p in self.engine_precisions)
            return "skipped", f"{unavailable}; trtexec lines in {where}"
        self.engines_built = True
        status = "current" if statuses and set(statuses) == {"current"} else "done"
        return status, f"{self.engine_dir} ({', '.join(self.engine_precisions)})"

    def step_parity(self) -> tuple[str, str]:
        if self.clip is None or not Path(self.clip).is_file():
            return "skipped", f"no clip (pass --clip VIDEO; looked in {CLIP_FOLDER})"
        targets = [("onnxruntime", "fp32", self.export_dir, "cpu")]
        if self.config.precision != "fp32":
            targets.append(("onnxruntime", self.config.precision, self.export_dir, "cpu"))
        if self.config.int8 and (self.export_dir / "calibration.json").exists():
            targets.append(("onnxruntime", "int8", self.export_dir, "cpu"))
        notes = []
        if self.engines_built:
            targets += [("tensorrt", p, self.engine_dir, "cuda") for p in self.engine_precisions]
        else:
            notes.append(f"tensorrt: no engines here ({tensorrt_unavailable() or 'not built'})")
        ran, kept = [], []
        for backend, precision, model_dir, device in targets:
            rows, current = self._parity(backend, precision, model_dir, device)
            self.result.parity += rows
            (kept if current else ran).append(f"{backend}-{precision}")
        bad = [c for c in self.result.parity if not c.passed]
        size = "x".join(map(str, self.config.size))
        detail = "; ".join(filter(None, [f"ran {', '.join(ran)}" if ran else "",
                                         f"current {', '.join(kept)}" if kept else ""]))
        detail = "; ".join([f"{detail} on {Path(self.clip).name}, {self.config.frames} frames at {size}", *notes])
        if bad:
            raise DeployError(f"{len(bad)} parity output(s) above tolerance: "
                              + "; ".join(f"{c.name} {c.precision}: {c.failure()}" for c in bad))
        return ("done" if ran else "current"), detail

    # ----- helpers -------------------------------------------------------------------------------------------------
    def _parity(self, backend: str, precision: str, model_dir: Path, device: str) -> tuple[list[Comparison], bool]:
        name = f"{backend}-{precision}"
        result = self.out / "parity" / f"{name}.json"
        model_files = sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".plan"))
        inputs = {"clip": sha256_file(self.clip), "frames": self.config.frames, "size": list(self.config.size),
                  "device": device, "cvvae": cvvae_version(),
                  "model": {p.name: sha256_file(p) if p.suffix == ".json" else _stamp(p) for p in model_files}}
        step = f"parity-{name}"
        if not self.config.force and self.state.why_not_current(step, inputs, [result]) is None:
            self.say(f"parity {name}: inputs unchanged; skipped")
            return [Comparison.from_dict(d) for d in json.loads(result.read_text())], True
        self.say(f"parity {name}: {self.config.frames} frames of {Path(self.clip).name}")
        from cvvae.tools.parity import run_parity

        rows = run_parity(Path(self.clip), str(model_dir), ["torch", backend], precision=precision, device=device,
                          read_kwargs={"max_frames": self.config.frames, "size": self.config.size}, judge=True)
        result.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(result, overwrite=True) as tmp:
            tmp.write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        self.state.record(step, inputs, [result])
        return rows, False

    def _engines_from_other_export(self) -> bool:
        """Whether OUT/engines holds engines (or sidecars) of another of this run's exports (export/ vs export-int8/,
        after --int8 was added or dropped): this pipeline wrote them, so they are replaced rather than refused."""
        try:
            recorded = json.loads((self.engine_dir / "manifest.json").read_text())["export"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        ours = Path(recorded.get("dir", "")).parent == self.out
        return ours and recorded.get("manifest_sha256") != sha256_file(self.export_dir / "manifest.json")

    def _write_commands(self, name: str, lines: list[str]) -> None:
        self.result.commands[name] = lines
        with atomic_path(self.out / f"{name}.sh", overwrite=True) as tmp:
            tmp.write_text(f"# written by cvvae deploy from {self.export_dir}; run on the GPU machine\n"
                           + "\n".join(lines) + "\n")

    @contextlib.contextmanager
    def _log(self, name: str) -> Iterator[Say]:
        """Progress lines of a step go to OUT/logs/NAME.log (the console gets one line per step)."""
        with open(self.logs / f"{name}.log", "w") as f:
            yield lambda msg: print(msg, file=f, flush=True)

    # ----- the run -------------------------------------------------------------------------------------------------
    STEPS = ("model", "export", "int8", "engines", "parity")

    def run(self) -> DeployResult:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.state = State(self.out)
        try:
            for step in self.STEPS:
                t0 = time.perf_counter()
                try:
                    status, detail = getattr(self, f"step_{step}")()
                except Exception as e:  # a failing step stops the run: record it, write the summary, say why
                    message = " ".join(str(e).split()) or type(e).__name__
                    self.result.steps.append(StepResult(step, "FAILED", time.perf_counter() - t0,
                                                        f"{type(e).__name__}: {message}"[:300]))
                    raise DeployError(f"step {step} failed: {type(e).__name__}: {message} (the later steps did not "
                                      f"run; logs in {self.logs})") from e
                seconds = time.perf_counter() - t0 if status in ("done", "FAILED") else None
                self.result.steps.append(StepResult(step, status, seconds, detail))
        finally:
            with atomic_path(self.out / RECORD_NAME, overwrite=True) as tmp:
                tmp.write_text(json.dumps(self.result.as_dict(), indent=2) + "\n")
        return self.result


def deploy(config: DeployConfig, *, say: Say = _stderr) -> DeployResult:
    """Run the deployment steps into ``config.out``; raises :class:`DeployError` (with ``.result``) when one fails."""
    pipeline = Pipeline(config, say)
    try:
        return pipeline.run()
    except DeployError as e:
        e.result = pipeline.result
        raise


__all__ = ["DeployConfig", "DeployResult", "Pipeline", "State", "StepResult", "default_clip", "deploy",
           "polygraphy_command", "tensorrt_unavailable"]
