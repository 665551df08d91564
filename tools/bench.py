"""Speed and memory of the PyTorch reference and every runtime backend/precision, on the same inputs and plan.

One process, one run: for each model it times the official-semantics reference (eager ``CVVAE.encode``/``decode``
executing the plan) and each target of the runtime (``VideoVAE`` on torch fp32/bf16, ONNX Runtime fp32/fp16/int8,
TensorRT) on identical pixels and latents, for encode, decode and the round trip, over a frame-count sweep and a size
sweep. Each measurement is warm-up runs (on the first chunk of the same size) then ``reps`` timed runs; the figure is
the median. Alongside: ms per frame, frames per second, achieved GFLOP/s (FLOPs of the plan from
:mod:`cvvae.tools.flops`), that rate as a fraction of the machine's GEMM rate at the same precision measured in
the same run (:func:`gemm_peak`: fp32 targets against the fp32 GEMM, bf16 targets against the bf16 GEMM), the time
relative to the reference, peak memory, and the 1-minute load average.

Timed runs use the runtime's own allocator settings (:func:`cvvae.allocator.keep_memory`, as the CLI does). Peak
memory is measured in a separate, untimed pass per target: on CPU the kernel's peak RSS (VmHWM) after a reset
(``/proc/self/clear_refs`` = 5), with glibc's mmap threshold lowered to 1 MiB for that pass only
(:func:`cvvae.allocator.returning_memory`) so that freed buffers go back to the kernel and the peak is repeatable;
on CUDA the torch allocator's peak. ``mem_delta_mb`` (peak minus the RSS just before) is the working memory of
the operation; ``peak_mem_mb`` includes the process, the loaded weights and the inputs.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from cvvae.allocator import keep_memory, release_memory, returning_memory
from cvvae.durations import format_duration
from cvvae.errors import BackendUnavailableError, InputError
from cvvae.fsutil import atomic_path
from cvvae.plan import PlanSettings
from cvvae.tools.flops import FlopCounter

log = logging.getLogger(__name__)

OPS = ("encode", "decode", "roundtrip")
BACKEND_NAMES = ("reference", "torch", "onnxruntime", "tensorrt")
DEFAULT_TARGETS = ("reference", "torch:fp32", "torch:bf16", "onnxruntime:fp32", "onnxruntime:fp16",
                   "onnxruntime:int8")
DEFAULT_MODEL = "default"  # the built-in default model (cvvae/weights/default)
Progress = Callable[[str], None]


# ----- what is measured -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One way of running the model: the reference, or a runtime backend at a precision."""

    backend: str
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise InputError(f"unknown bench target backend {self.backend!r}; choose from {', '.join(BACKEND_NAMES)}")
        if self.backend == "reference" and self.precision != "fp32":
            raise InputError("the reference runs in fp32 only (it is the official semantics); "
                             f"use torch:{self.precision} for the runtime at {self.precision}")

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``reference``, ``torch``, ``torch:bf16``, ``onnxruntime:fp16``, ``tensorrt:fp16``, ..."""
        backend, _, precision = text.strip().partition(":")
        return cls(backend, precision or "fp32")

    @property
    def label(self) -> str:
        return "reference" if self.backend == "reference" else f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class Case:
    """An input shape and the sweeps it belongs to (``frames`` and/or ``size``)."""

    frames: int
    height: int
    width: int
    sweeps: tuple[str, ...]

    @property
    def shape(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"expected a size HxW such as 64x64, got {text!r}") from None
    if h < 8 or w < 8:
        raise InputError(f"size {text} is too small: the model needs at least 8x8 pixels")
    return h, w


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Checked on creation, before any model is loaded."""

    models: tuple[str, ...] = ("random:cvvae-v1", DEFAULT_MODEL)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ops: tuple[str, ...] = OPS
    frames: tuple[int, ...] = (17, 65, 257)    # frame sweep, at frame_size
    frame_size: tuple[int, int] = (64, 64)
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (256, 256))  # size sweep, at size_frames
    size_frames: int = 17
    reps: int = 3
    warmup: int = 1
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else (os.cpu_count() or 1))
    device: str = "cpu"
    gemm_size: int = 2048
    gemm_seconds: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise InputError("no model to benchmark")
        parsed = [Target.parse(t) for t in self.targets]  # raises on unknown backends
        if len(set(parsed)) != len(parsed):
            raise InputError(f"a target is listed twice: {', '.join(self.targets)}")
        bad_ops = [op for op in self.ops if op not in OPS]
        if bad_ops or not self.ops:
            raise InputError(f"unknown op(s) {', '.join(bad_ops) or '(none given)'}; choose from {', '.join(OPS)}")
        if any(n < 1 for n in (*self.frames, self.size_frames)):
            raise InputError(f"frame counts must be positive: {self.frames}, size_frames={self.size_frames}")
        if self.reps < 1 or self.warmup < 0 or self.threads < 1:
            raise InputError(f"reps={self.reps} must be >= 1, warmup={self.warmup} >= 0, threads={self.threads} >= 1")
        if self.gemm_size < 64 or self.gemm_seconds <= 0:
            raise InputError(f"gemm_size={self.gemm_size} must be >= 64 and gemm_seconds={self.gemm_seconds} > 0")

    @classmethod
    def quick(cls, models: tuple[str, ...] | None = None, **overrides: Any) -> "BenchConfig":
        """Small enough for a 2-core machine in well under 3 minutes: tiny/default model, 2 sizes, 17/65 frames.

        One thread: on a machine that also runs other work, torch's OpenMP threads wait at every barrier for a
        descheduled sibling, which makes small tiles up to 50x slower with 2 threads than with 1 (docs/benchmarks.md).
        """
        from cvvae.loading import DEFAULT_MODEL_DIR

        if models is None:
            models = (DEFAULT_MODEL,) if (DEFAULT_MODEL_DIR / "config.json").exists() else ("random:tiny-v1",)
        base: dict[str, Any] = dict(models=models, frames=(17, 65), frame_size=(16, 16), sizes=((16, 16), (32, 32)),
                                    size_frames=17, reps=2, warmup=1, gemm_seconds=0.5, threads=1)
        base.update(overrides)
        return cls(**base)

    def parsed_targets(self) -> list[Target]:
        targets = [Target.parse(t) for t in self.targets]
        # the reference is always measured, first: every ratio is relative to it
        return [Target("reference")] + [t for t in targets if t.backend != "reference"]

    def cases(self) -> list[Case]:
        """Frame sweep then size sweep; a shape in both is measured once."""
        found: dict[tuple[int, int, int], list[str]] = {}
        for n in self.frames:
            found.setdefault((n, *self.frame_size), []).append("frames")
        for h, w in self.sizes:
            found.setdefault((self.size_frames, h, w), []).append("size")
        return [Case(t, h, w, tuple(s)) for (t, h, w), s in found.items()]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- the machine ------------------------------------------------------------------------------------------------
def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads used, memory, library versions, load average (and the GPU when one is used)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "memory_gb": _meminfo_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average": load_average(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _meminfo_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


GEMM_ENGINES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class GemmPeak:
    """Matmul rate of the machine: the yardstick for every backend's achieved GFLOP/s.

    ``gflop_s`` is the best window of ``window_s`` (the rate the machine sustains when the background load lets it),
    ``mean_gflop_s`` the average over the whole measurement. ``engine`` is ``torch`` (``torch.matmul``: MKL on x86
    CPUs) or ``onnxruntime`` (a one-node MatMul graph: MLAS), ``when`` is ``start`` or ``end`` of the run.
    """

    engine: str
    when: str
    gflop_s: float
    mean_gflop_s: float
    size: int
    iterations: int
    seconds: float
    window_s: float
    threads: int
    device: str
    load_1m: float | None
    dtype: str = "fp32"


GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _matmul_fn(engine: str, size: int, threads: int, device: str, dtype: str = "fp32") -> Callable[[], Any]:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    if engine == "torch":
        a, b = a.to(device, GEMM_DTYPES[dtype]), b.to(device, GEMM_DTYPES[dtype])
        out = torch.empty(size, size, device=device, dtype=GEMM_DTYPES[dtype])
        return lambda: torch.matmul(a, b, out=out)
    if dtype != "fp32":
        raise InputError(f"the {engine} GEMM is measured in fp32 only, not {dtype}")
    if engine != "onnxruntime":
        raise InputError(f"unknown GEMM engine {engine!r}; choose from {', '.join(GEMM_ENGINES)}")
    from onnx import TensorProto, helper

    from cvvae.onnxrt import ort_session

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("A", "B", "C")]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    session = ort_session(model.SerializeToString(), threads=threads)
    feeds = {"A": a.numpy(), "B": b.numpy()}
    return lambda: session.run(None, feeds)


def gemm_peak(*, engine: str = "torch", size: int = 2048, seconds: float = 2.0, window_s: float = 0.25,
              threads: int | None = None, device: str = "cpu", when: str = "start",
              dtype: str = "fp32") -> GemmPeak:
    """Repeat a ``size``^2 matmul in ``dtype`` (2*n^3 FLOPs) for about ``seconds`` after 2 warm-up products."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    fn = _matmul_fn(engine, size, threads, device, dtype)
    for _ in range(2):
        fn()
    _sync(device)
    flop = 2 * size**3
    n, best, t0 = 0, 0.0, time.perf_counter()
    w_n, w_t0 = 0, t0
    while True:
        fn()
        _sync(device)
        n, w_n = n + 1, w_n + 1
        now = time.perf_counter()
        if now - w_t0 >= window_s:
            best = max(best, flop * w_n / (now - w_t0))
            w_n, w_t0 = 0, now
        if now - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    mean = flop * n / elapsed
    return GemmPeak(engine, when, max(best, mean) / 1e9, mean / 1e9, size, n, elapsed, window_s, threads, device,
                    (load_average() or [None])[0], dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# ----- memory -----------------------------------------------------------------------------------------------------
def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{name} is not in /proc/self/status")


class PeakMemory:
    """Peak memory of what runs between :meth:`reset` and :meth:`read`: RSS on CPU, allocator on CUDA."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.kind = "cuda-allocator" if device.startswith("cuda") else "rss"
        self.unavailable: str | None = None
        if self.kind == "rss":
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError as e:
                self.unavailable = f"cannot reset the peak RSS (/proc/self/clear_refs: {e}); peaks not measured"
                log.warning("%s", self.unavailable)
        self.base_mb: float | None = None

    def reset(self) -> None:
        # no gc.collect() here: tensors are freed by reference counting, and a full collection costs 0.1-0.5 s
        if self.kind == "cuda-allocator":
            torch.cuda.synchronize(torch.device(self.device))
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
            self.base_mb = torch.cuda.memory_allocated(torch.device(self.device)) / 2**20
        elif self.unavailable is None:
            release_memory()
            Path("/proc/self/clear_refs").write_text("5")
            self.base_mb = _status_kb("VmRSS") / 1024

    def read(self) -> tuple[float | None, float | None]:
        """(peak MB, peak minus the value at reset MB)."""
        if self.kind == "cuda-allocator":
            peak = torch.cuda.max_memory_allocated(torch.device(self.device)) / 2**20
        elif self.unavailable is None:
            peak = _status_kb("VmHWM") / 1024
        else:
            return None, None
        return peak, peak - (self.base_mb or 0.0)


# ----- running a target -------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The same pixels and latents for every target (seeded)."""

    pixels: torch.Tensor   # B,3,T,H,W in [-1, 1]
    latent: torch.Tensor   # B,z,L,h,w
    frames: int
    height: int
    width: int

    @classmethod
    def make(cls, case: Case, latent_channels: int, settings: PlanSettings, *, seed: int,
             device: str = "cpu") -> "Inputs":
        """Random pixels of the case's size and the latent of their padded size (what encoding them gives)."""
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.rand(1, 3, case.frames, case.height, case.width, generator=gen) * 2 - 1
        latent_t = settings.num_latent_frames(settings.padded_frames(case.frames))
        lh, lw = settings.latent_cells(case.height), settings.latent_cells(case.width)
        latent = torch.randn(1, latent_channels, latent_t, lh, lw, generator=gen)
        return cls(pixels.to(device), latent.to(device), case.frames, case.height, case.width)

    def warmup(self, settings: PlanSettings) -> "Inputs":
        """The first chunk of this input (same tile shapes), for warm-up runs."""
        if settings.chunk_frames is None or self.frames <= settings.chunk_frames + 1:
            return self
        t = settings.chunk_frames + 1
        return Inputs(self.pixels[:, :, :t], self.latent[:, :, : settings.num_latent_frames(t)], t, self.height,
                      self.width)


OpFn = Callable[[Inputs], None]


def reference_ops(model: Any) -> dict[str, OpFn]:
    """The official semantics: ``CVVAE.encode``/``decode`` in eager PyTorch, whole tensors in and out."""

    def encode(x: Inputs) -> None:
        model.encode(x.pixels)

    def decode(x: Inputs) -> None:
        model.decode(x.latent, num_frames=x.frames, height=x.height, width=x.width)

    def roundtrip(x: Inputs) -> None:
        r = model.encode(x.pixels)
        model.decode(r.mean, num_frames=r.num_frames, height=r.height, width=r.width)

    return {"encode": encode, "decode": decode, "roundtrip": roundtrip}


def runtime_ops(vae: Any) -> dict[str, OpFn]:
    """The runtime: ``VideoVAE.encode`` and ``decode_stream`` into a sink that keeps nothing (as a renderer would)."""
    from cvvae.runtime.api import Latents

    def encode(x: Inputs) -> None:
        vae.encode(x.pixels)

    def decode(x: Inputs) -> None:
        for _ in vae.decode_stream(Latents(x.latent, None, x.frames, x.height, x.width), check_model=False):
            pass

    def roundtrip(x: Inputs) -> None:
        latents = vae.encode(x.pixels)
        for _ in vae.decode_stream(latents, check_model=False):
            pass

    return {"encode": encode, "decode": decode, "roundtrip": roundtrip}


def onnx_export_for(model_spec: str | None) -> Path:
    """An export directory with the fp32 and fp16 graphs of a checkpoint, made once by ``cached_export``.

    An export directory given directly is used as it is. Otherwise fp32 and fp16 are always made, one cache entry
    for both; int8 graphs come only from an export directory that has them.
    """
    from cvvae.runtime.api import cached_export

    if model_spec and (Path(model_spec) / "manifest.json").exists():
        return Path(model_spec)
    return cached_export(model_spec, precision="fp16")


def _open_target(target: Target, model: Any, model_spec: str | None, export_dir: Path | None,
                 cfg: BenchConfig) -> dict[str, OpFn]:
    """The ops of a target; raises BackendUnavailableError/InputError with the reason it cannot run."""
    from cvvae.runtime.api import VideoVAE
    from cvvae.runtime.backends import TORCH_DTYPE_NAMES, TorchBackend, torch_dtype

    if target.backend == "reference":
        return reference_ops(model)
    if target.backend == "torch":
        if target.precision not in TORCH_DTYPE_NAMES:
            raise InputError(f"torch runs {', '.join(TORCH_DTYPE_NAMES)}, not {target.precision}")
        if target.precision == "fp32":
            impl = TorchBackend(model, "fp32")  # the reference's own weights: no second copy
        else:
            import copy

            impl = TorchBackend(copy.deepcopy(model).to(torch_dtype(target.precision)), target.precision)
        return runtime_ops(VideoVAE(impl))
    if target.backend == "onnxruntime":
        if export_dir is None:
            raise BackendUnavailableError("no ONNX export (onnxruntime is not installed)")
        from cvvae.export.manifest import load_manifest

        have = {c: load_manifest(export_dir).precisions(c) for c in ("encoder", "decoder")}
        if any(target.precision not in p for p in have.values()):
            hint = (" (make INT8 graphs with cvvae.calibration and pass that export directory as --model)"
                    if target.precision == "int8" else "")
            raise InputError(f"{export_dir} has no {target.precision} graphs "
                             f"(encoder: {', '.join(have['encoder'])}; decoder: {', '.join(have['decoder'])}){hint}")
        vae = VideoVAE.load(export_dir, backend="onnxruntime", device=cfg.device, precision=target.precision,
                            threads=cfg.threads)
        return runtime_ops(vae)
    if not torch.cuda.is_available():
        raise BackendUnavailableError("tensorrt needs a CUDA GPU; none is visible")
    vae = VideoVAE.load(model_spec, backend="tensorrt", precision=target.precision)
    return runtime_ops(vae)


# ----- results ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One (model, case, op, target) measurement."""

    model: str
    op: str
    frames: int
    height: int
    width: int
    sweeps: list[str]
    target: str
    backend: str
    precision: str
    times_s: list[float]
    median_s: float
    ms_per_frame: float
    fps: float
    gflop: float
    gflop_s: float
    fraction_of_gemm_peak: float | None       # of the best GEMM of the run
    fraction_of_torch_matmul: float | None    # of the best torch.matmul of the run
    peak_mem_mb: float | None
    mem_delta_mb: float | None
    mem_kind: str
    time_vs_reference: float | None
    load_1m: float | None

    @property
    def shape(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass
class BenchResult:
    """Everything one run measured, plus what it could not measure and why."""

    config: dict[str, Any]
    machine: dict[str, Any]
    gemm: list[GemmPeak] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    loaded: list[dict[str, Any]] = field(default_factory=list)  # RSS each target added when loaded
    notes: list[str] = field(default_factory=list)
    started_utc: str = ""
    wall_s: float = 0.0
    load_average_end: list[float] = field(default_factory=list)

    @property
    def peak_gflop_s(self) -> float:
        """The fp32 GEMM yardstick: the best fp32 matmul rate measured in the run (any engine, start or end)."""
        return self.peak_for("fp32")

    def peak_for(self, precision: str) -> float:
        """The yardstick of a target: the best GEMM rate at its precision (fp32 where none was measured)."""
        rates = [g.gflop_s for g in self.gemm if g.dtype == precision]
        return max(rates) if rates else max((g.gflop_s for g in self.gemm if g.dtype == "fp32"), default=math.nan)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = "cvvae-bench/1"
        d["peak_gflop_s"] = self.peak_gflop_s
        return d

    def markdown(self) -> str:
        return format_markdown(self)


class _Counter:
    """Progress text "[done/total measured, elapsed, ETA]"; the ETA assumes the remaining measurements cost what the
    finished ones did on average (rough: later sweep points are the larger ones)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def tick(self) -> None:
        self.done += 1

    def __str__(self) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = f", ETA ~{format_duration(elapsed / self.done * (self.total - self.done))}" if self.done else ""
        return f"[{self.done}/{self.total} measured, {format_duration(elapsed)}{eta}]"


def run_bench(cfg: BenchConfig, *, on_progress: Progress | None = None) -> BenchResult:
    """Measure every model x case x op x target of ``cfg`` in this process (see the module docstring)."""
    from cvvae.loading import DEFAULT_MODEL_DIR, load_model
    from cvvae.extras import is_installed

    say = on_progress or (lambda msg: log.info("%s", msg))
    started, t_start = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), time.perf_counter()
    torch.set_num_threads(cfg.threads)
    allocator = keep_memory()
    memory = PeakMemory(cfg.device)
    result = BenchResult(cfg.as_dict(), machine_info(cfg.threads, cfg.device), started_utc=started)
    _measure_gemm(cfg, result, "start", say)
    if cfg.device == "cpu":
        result.notes.append(f"timed with the runtime's allocator settings ({allocator}); peak memory measured in a "
                            "separate untimed pass per target with glibc's mmap threshold at 1 MiB")
    if memory.unavailable:
        result.notes.append(memory.unavailable)
    targets = cfg.parsed_targets()
    progress = _Counter(len(cfg.models) * len(cfg.cases()) * len(cfg.ops))
    for spec in cfg.models:
        model_path = None if spec == DEFAULT_MODEL else spec
        if model_path is None and not (DEFAULT_MODEL_DIR / "config.json").exists():
            reason = f"the built-in default model does not exist ({DEFAULT_MODEL_DIR}): not measured"
            result.skipped.append({"model": spec, "target": "*", "reason": reason})
            say(reason)
            progress.total -= len(cfg.cases()) * len(cfg.ops)
            continue
        _bench_model(spec, model_path, targets, cfg, memory, result, say, is_installed("onnxruntime"), load_model,
                     progress)
    _measure_gemm(cfg, result, "end", say)
    torch_mm = max((g.gflop_s for g in result.gemm if g.engine == "torch"), default=math.nan)
    for row in result.rows:  # the yardstick is the best GEMM measurement of the run
        row.fraction_of_gemm_peak = row.gflop_s / result.peak_for(row.precision)
        row.fraction_of_torch_matmul = row.gflop_s / torch_mm
    result.wall_s = time.perf_counter() - t_start
    result.load_average_end = load_average()
    return result


def _measure_gemm(cfg: BenchConfig, result: BenchResult, when: str, say: Progress) -> None:
    from cvvae.extras import is_installed

    engines = [(e, "fp32") for e in GEMM_ENGINES
               if e == "torch" or (cfg.device == "cpu" and is_installed("onnxruntime"))]
    engines += [("torch", p) for p in sorted({t.precision for t in cfg.parsed_targets()} & {"bf16", "fp16"})
                if p == "bf16" or cfg.device != "cpu"]
    for engine, dtype in engines:
        say(f"GEMM peak ({when}): {cfg.gemm_size}^2 {dtype} matmul in {engine} for {cfg.gemm_seconds:g} s")
        result.gemm.append(gemm_peak(engine=engine, size=cfg.gemm_size, seconds=cfg.gemm_seconds,
                                     threads=cfg.threads, device=cfg.device, when=when, dtype=dtype))


def _bench_model(spec: str, model_path: str | None, targets: list[Target], cfg: BenchConfig, memory: PeakMemory,
                 result: BenchResult, say: Progress, have_ort: bool, load_model: Callable[..., Any],
                 progress: _Counter) -> None:
    """All targets of one model, interleaved: every repetition runs each target once, in turn.

    Interleaving spreads the machine's background load evenly over the targets, so the ratios to the reference stay
    meaningful on a shared machine; all targets are loaded at once for that (``loaded_mb`` says what each added).
    """
    from cvvae.tools.parity import checkpoint_of

    export_dir = None
    ort_precisions = tuple(t.precision for t in targets if t.backend == "onnxruntime")
    if ort_precisions and have_ort:
        say(f"{spec}: ONNX export (cached after the first run)")
        export_dir = onnx_export_for(model_path)
    model = load_model(checkpoint_of(model_path), device=cfg.device)
    counter = FlopCounter(model.config)
    settings = model.plan_settings()
    opened: list[tuple[Target, dict[str, OpFn]]] = []
    for target in targets:
        if target.backend == "onnxruntime" and not have_ort:
            result.skipped.append({"model": spec, "target": target.label, "reason": "onnxruntime is not installed"})
            continue
        memory.reset()
        try:
            ops = _open_target(target, model, model_path, export_dir, cfg)
        except (BackendUnavailableError, InputError) as e:
            result.skipped.append({"model": spec, "target": target.label, "reason": str(e)})
            say(f"{spec}: {target.label} skipped: {e}")
            continue
        _, loaded = memory.read()
        result.loaded.append({"model": spec, "target": target.label, "loaded_mb": loaded})
        opened.append((target, ops))
    for case in cfg.cases():
        plan = model.plan(case.frames, case.height, case.width, settings)
        enc, dec = counter.plan(plan, "encoder").total, counter.plan(plan, "decoder").total
        flops = {"encode": enc, "decode": dec, "roundtrip": enc + dec}
        x = Inputs.make(case, model.config.latent_channels, settings, seed=cfg.seed, device=cfg.device)
        warm = x.warmup(settings)
        for op in cfg.ops:
            say(f"{progress} {spec}: {op} {case.shape} on {', '.join(t.label for t, _ in opened)}")
            runs = _measure_interleaved([ops[op] for _, ops in opened], x, warm, cfg, memory)
            progress.tick()
            ref_median = statistics.median(runs[0]["times_s"])  # the reference is always first
            for (target, _), run in zip(opened, runs):
                median = statistics.median(run["times_s"])
                gflop = flops[op] / 1e9
                result.rows.append(Row(
                    model=spec, op=op, frames=case.frames, height=case.height, width=case.width,
                    sweeps=list(case.sweeps), target=target.label, backend=target.backend,
                    precision=target.precision, times_s=run["times_s"], median_s=median,
                    ms_per_frame=1e3 * median / case.frames, fps=case.frames / median, gflop=gflop,
                    gflop_s=gflop / median, fraction_of_gemm_peak=None, fraction_of_torch_matmul=None,
                    peak_mem_mb=run["peak_mb"], mem_delta_mb=run["delta_mb"], mem_kind=memory.kind,
                    time_vs_reference=median / ref_median, load_1m=run["load_1m"]))
    opened.clear()
    del model
    gc.collect()


def _measure_interleaved(fns: list[OpFn], x: Inputs, warm: Inputs, cfg: BenchConfig,
                         memory: PeakMemory) -> list[dict[str, Any]]:
    """Warm every target up, then ``reps`` rounds of one timed run per target, then one untimed memory pass each.

    Timed runs keep the runtime's allocator settings; the memory pass returns freed buffers to the kernel (glibc
    mmap threshold 1 MiB for its duration) so that its peak is that of the run's own live buffers.
    """
    runs: list[dict[str, Any]] = [{"times_s": [], "peak_mb": None, "delta_mb": None, "loads": []} for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            for _ in range(cfg.warmup):
                fn(warm)
        _sync(cfg.device)
        for _ in range(cfg.reps):
            for fn, run in zip(fns, runs):
                t0 = time.perf_counter()
                fn(x)
                _sync(cfg.device)
                run["times_s"].append(time.perf_counter() - t0)
                run["loads"].append((load_average() or [math.nan])[0])
        for fn, run in zip(fns, runs):
            with returning_memory(enabled=cfg.device == "cpu"):
                memory.reset()
                fn(x)
                _sync(cfg.device)
                run["peak_mb"], run["delta_mb"] = memory.read()
    for run in runs:
        run["load_1m"] = round(statistics.mean(run.pop("loads")), 2)
    return runs


# ----- output -----------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


TABLE_HEADER = ("| model | op | T×H×W | target | median ms | ms/frame | fps | GFLOP/s | of GEMM peak | "
                "of torch.matmul | peak RSS MB | Δ MB | time / ref | load |")


def format_markdown(result: BenchResult) -> str:
    """Machine, GEMM peak, one table of every row (grouped by model, op and shape), and what was skipped."""
    m = result.machine
    mem = "peak RSS MB" if all(r.mem_kind == "rss" for r in result.rows) else "peak alloc MB"
    lines = [
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m['threads']} thread(s), "
        f"{m.get('memory_gb')} GB; torch {m['torch']}, onnxruntime {m.get('onnxruntime')}, Python {m['python']}"
        + (f"; GPU {m['gpu']}" if m.get("gpu") else ""),
        f"Load average (1/5/15 min) at start {m['load_average']}, at end {result.load_average_end}; "
        f"run {result.wall_s:.0f} s, {result.started_utc}.",
        f"GEMM peak (the yardstick of 'of GEMM peak'): {result.peak_gflop_s:.1f} GFLOP/s, the best "
        f"{result.gemm[0].window_s:g}-s window of a {result.gemm[0].size}² fp32 matmul loop on "
        f"{m['threads']} thread(s); "
        + "; ".join(_gemm_text(g) for g in result.gemm) + ".",
        "",
        TABLE_HEADER.replace("peak RSS MB", mem),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.model} | {r.op} | {r.shape} | {r.target} | {1e3 * r.median_s:.0f} | {r.ms_per_frame:.1f} | "
            f"{r.fps:.2f} | {r.gflop_s:.1f} | {_pct(r.fraction_of_gemm_peak)} | {_pct(r.fraction_of_torch_matmul)} | "
            f"{_fmt(r.peak_mem_mb, '.0f')} | {_fmt(r.mem_delta_mb, '.0f')} | {_fmt(r.time_vs_reference, '.2f')} | "
            f"{_fmt(r.load_1m, '.1f')} |")
    if result.loaded:
        lines.append("\nRSS added by loading each target (weights, sessions): " + "; ".join(
            f"{d['model']} {d['target']} {_fmt(d['loaded_mb'], '.0f')} MB" for d in result.loaded) + ".")
    for s in result.skipped:
        lines.append(f"\nNot measured: {s['model']} {s['target']}: {s['reason']}")
    for note in result.notes:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def _gemm_text(g: GemmPeak) -> str:
    name = "torch.matmul" if g.engine == "torch" else "ONNX Runtime MatMul"
    return (f"{name} at the {g.when} {g.gflop_s:.1f} (mean {g.mean_gflop_s:.1f} over {g.seconds:.1f} s, "
            f"load {g.load_1m})")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def save_plots(result: BenchResult, directory: str | Path, *, dpi: int = 72) -> list[Path]:
    """Per model and op: time and peak memory against frame count and against size (one PNG, four panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sweeps = (("frames", lambda r: r.frames, "frames", lambda r: str(r.frames)),
              ("size", lambda r: r.height * r.width, "frame size (pixels)", lambda r: f"{r.height}x{r.width}"))
    load = result.machine["load_average"][0] if result.machine.get("load_average") else "?"
    written = []
    for model in dict.fromkeys(r.model for r in result.rows):
        for op in dict.fromkeys(r.op for r in result.rows if r.model == model):
            rows = [r for r in result.rows if r.model == model and r.op == op]
            fig, axes = plt.subplots(2, 2, figsize=(9, 6.2))
            for col, (sweep, xkey, xlabel, tick) in enumerate(sweeps):
                ticks: dict[float, str] = {}
                for target in dict.fromkeys(r.target for r in rows):
                    pts = sorted(((xkey(r), r) for r in rows if r.target == target and sweep in r.sweeps),
                                 key=lambda p: p[0])
                    if not pts:
                        continue
                    ticks.update((x, tick(r)) for x, r in pts)
                    style = dict(marker="o", linestyle="--" if target == "reference" else "-", label=target)
                    axes[0, col].plot([x for x, _ in pts], [r.median_s for _, r in pts], **style)
                    if all(r.mem_delta_mb is not None for _, r in pts):
                        axes[1, col].plot([x for x, _ in pts], [r.mem_delta_mb for _, r in pts], **style)
                axes[0, col].set(ylabel="median time (s)", yscale="log", title=f"time vs {sweep}")
                axes[0, col].yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axes[0, col].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axes[0, col].yaxis.set_minor_formatter(NullFormatter())
                axes[1, col].set(ylabel="peak RSS above the run's start (MB)", title=f"memory vs {sweep}")
                axes[1, col].set_ylim(bottom=0)
                for ax in axes[:, col]:
                    ax.set_xscale("log")
                    ax.set_xlabel(xlabel)
                    if ticks:
                        ax.set_xticks(list(ticks), list(ticks.values()))
                    ax.xaxis.set_minor_formatter(NullFormatter())
                    ax.grid(True, alpha=0.3)
            handles, labels = axes[0, 0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
            fig.suptitle(f"{model}: {op} ({result.machine['cpu']}, {result.machine['threads']} threads, "
                         f"load {load})", fontsize=10)
            fig.tight_layout(rect=(0, 0.05, 1, 0.96))
            path = directory / f"{_slug(model)}-{op}.png"
            fig.savefig(path, dpi=dpi)
            plt.close(fig)
            _palette_png(path)
            written.append(path)
    return written


def _palette_png(path: Path, colors: int = 64) -> None:
    """Re-save a plot with a 64-colour palette: a third of the size, no visible change for line plots."""
    try:
        from PIL import Image
    except ImportError:  # Pillow comes with matplotlib; without it the plot simply stays RGBA
        return
    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def load_result(path: str | Path) -> BenchResult:
    """A :class:`BenchResult` back from ``bench.json`` (to redraw plots or tables)."""
    import json

    d = json.loads(Path(path).read_text())
    if d.get("format") != "cvvae-bench/1":
        raise InputError(f"{path} is not a cvvae bench result (format {d.get('format')!r})")
    return BenchResult(
        config=d["config"], machine=d["machine"], gemm=[GemmPeak(**g) for g in d["gemm"]],
        rows=[Row(**r) for r in d["rows"]], skipped=d["skipped"], notes=d["notes"], started_utc=d["started_utc"],
        wall_s=d["wall_s"], load_average_end=d["load_average_end"], loaded=d["loaded"])


def write_results(result: BenchResult, out_dir: str | Path, *, overwrite: bool = False,
                  plots: bool = True) -> Path:
    """bench.json, bench.md and the plots into ``out_dir``, atomically."""
    import json

    out_dir = Path(out_dir)
    with atomic_path(out_dir, overwrite=overwrite, directory=True, kind="bench") as tmp:
        (tmp / "bench.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
        (tmp / "bench.md").write_text(result.markdown())
        if plots:
            save_plots(result, tmp)
    return out_dir
