"""Precision policy: what ``--precision auto`` runs, and the guard that keeps it from costing accuracy (issue 16).

``auto`` picks bf16 where the hardware computes it natively: a CPU with AVX512_BF16 or AMX_BF16 (``/proc/cpuinfo``
flags) or a CUDA GPU for which ``torch.cuda.is_bf16_supported()`` holds; fp32 everywhere else (an AVX2-only CPU
emulates bf16 at a fraction of fp32 speed and the same numbers). Only the torch backend runs bf16; ONNX Runtime and
TensorRT keep their explicit precisions (``auto`` is fp32 on ONNX Runtime, whose exports carry fp32/fp16/int8 graphs,
and fp16 on TensorRT, whose engines are built per precision).

bf16's error depends on the weights, so ``auto`` never trusts it blindly: for a checkpoint whose bf16 accuracy is
recorded in :data:`RECORDED_BF16_PSNR` bf16 is used as is; for any other checkpoint the
first tile the runtime computes is also computed in fp32 and, below :data:`MIN_BF16_PSNR_DB`, the job falls back
to fp32 and says so (:class:`cvvae.runtime.api.VideoVAE` runs that check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_BF16_PSNR_DB = 45.0  # bf16 vs fp32 on the first tile; below it `auto` falls back to fp32

# bf16 vs fp32 accuracy measured on real clips (benchmarks/precision_accuracy.py, docs/benchmarks.md "Precision"),
# keyed by the checkpoint's sha256: the lowest per-clip PSNR of the bf16 round trip against the fp32 round trip.
RECORDED_BF16_PSNR: dict[str, float] = {
    # the shipped default model (cvvae/weights/default: the motion fine-tune, shipped 2026-12-01), measured 2026-12-01:
    # carphone_pristine 60.5 dB, bikes 62.2 dB (torch's emulated bf16 on an AVX2 CPU: bf16 weights, activations and
    # results like the native kernels, ~400x slower)
    "aeacfd904fbac58d33394612897550cbb59c1c41dd9f2b465fcd4d0bc774ac90": 60.5,
    # the default model until 2026-12-01 (the stage-3 video fine-tune): carphone_pristine 59.7 dB, bikes 60.3 dB
    "b9374b9dc3668518e9a80fc134ff58bee11d3aa5e1c1df6fe0ae6f85b52ea01b": 59.7,
}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a job runs at, why, and whether ``auto``'s first-tile accuracy check must run."""

    requested: str
    precision: str
    reason: str
    check_first_tile: bool = False

    def describe(self) -> str:
        return self.precision if self.requested != "auto" else f"{self.precision} (auto: {self.reason})"

    def as_metadata(self) -> dict[str, str]:
        return {"precision": self.precision, "precision_requested": self.requested, "precision_reason": self.reason}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16_cpu(flags: frozenset[str] | None = None) -> str | None:
    """The first native-bf16 flag the CPU has (``avx512_bf16``/``amx_bf16``), or None."""
    have = cpu_flags() if flags is None else flags
    return next((f for f in NATIVE_BF16_FLAGS if f in have), None)


def cuda_bf16_supported(device: str) -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, *, backend: str = "torch", device: str = "cpu",
                      flags: frozenset[str] | None = None, cuda_bf16: bool | None = None) -> PrecisionChoice:
    """The precision to run: ``requested`` as is unless it is ``auto`` (policy in the module docstring).

    ``flags`` and ``cuda_bf16`` override the detection (tests inject both branches). An ``auto`` bf16 choice has
    ``check_first_tile`` set; the runtime clears it for checkpoints in :data:`RECORDED_BF16_PSNR`.
    """
    if requested not in PRECISIONS:
        raise InputError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return PrecisionChoice(requested, requested, "requested")
    if backend == "onnxruntime":
        return PrecisionChoice("auto", "fp32", "ONNX Runtime exports carry no bf16 graphs")
    if backend == "tensorrt":
        return PrecisionChoice("auto", "fp16", "TensorRT engines: fp16 is the built default")
    if device.startswith("cuda"):
        supported = cuda_bf16_supported(device) if cuda_bf16 is None else cuda_bf16
        if not supported:
            return PrecisionChoice("auto", "fp32", "this GPU has no bf16 support")
        native = "this GPU supports bf16"
    else:
        flag = native_bf16_cpu(flags)
        if flag is None:
            return PrecisionChoice("auto", "fp32", "this CPU has no native bf16 (AVX512_BF16/AMX_BF16)")
        native = f"this CPU has {flag.upper()}"
    return PrecisionChoice("auto", "bf16", native, check_first_tile=True)


def recorded_bf16_psnr(model_sha256: str | None) -> float | None:
    """The recorded bf16-vs-fp32 PSNR of a checkpoint when it is good enough to skip the first-tile check."""
    value = RECORDED_BF16_PSNR.get(model_sha256 or "")
    return value if value is not None and value >= MIN_BF16_PSNR_DB else None


def peak_psnr(reference: Any, test: Any) -> float:
    """PSNR (:func:`cvvae.metrics.psnr`) of ``test`` against ``reference`` with the reference's peak-to-peak range as
    the data range (pixels and latents alike; any array family)."""
    import numpy as np

    from .arrays import to_numpy
    from .metrics import psnr

    ref = to_numpy(reference)
    return psnr(ref, test, data_range=float(np.ptp(ref.astype(np.float64))) or 1.0)