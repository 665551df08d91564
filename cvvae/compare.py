"""Comparisons as data: per-output error statistics between a reference and a candidate (Polygraphy style).

Why not Polygraphy itself: its ``Comparator`` compares runners that each execute one graph on one feed, while our
parity runs whole videos through the chunk/tile plan (many graph calls, blended tiles) on torch, ONNX Runtime and
TensorRT alike; what we need from it is only the statistics (max/mean/p99 abs error), a few lines of torch that work
on every backend's output without another dependency. ``cvvae doctor`` still reports Polygraphy when it is installed
(it is the tool to bisect a TensorRT engine layer by layer: ``polygraphy run --trt --onnxrt``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ErrorStats:
    """Errors of one output. ``psnr`` treats the data range as 2 (pixels and latents in roughly [-1, 1])."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    p99_abs: float
    psnr: float
    atol: float | None = None

    @property
    def ok(self) -> bool:
        return self.atol is None or self.max_abs <= self.atol

    def __bool__(self) -> bool:
        return self.ok

    def as_dict(self) -> dict:
        return asdict(self)


def compare(name: str, reference: torch.Tensor, candidate: torch.Tensor, *, atol: float | None = None,
            data_range: float = 2.0) -> ErrorStats:
    if reference.shape != candidate.shape:
        raise ValueError(f"{name}: shape {tuple(candidate.shape)} differs from the reference {tuple(reference.shape)}")
    diff = (reference.double() - candidate.double()).abs().flatten()
    mse = float(diff.pow(2).mean())
    flat = diff if diff.numel() <= 1 << 24 else diff[torch.randperm(diff.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
    return ErrorStats(
        name=name,
        shape=tuple(reference.shape),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        p99_abs=float(torch.quantile(flat.float(), 0.99)),
        psnr=math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse),
        atol=atol,
    )


def format_table(rows: list[ErrorStats]) -> str:
    """A fixed-width table for terminals and Markdown-ish logs."""
    header = f"{'output':<28} {'max abs':>10} {'mean abs':>10} {'p99 abs':>10} {'PSNR dB':>8}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        status = "ok" if r.ok else f"FAIL (atol {r.atol:g})"
        lines.append(f"{r.name:<28} {r.max_abs:>10.3e} {r.mean_abs:>10.3e} {r.p99_abs:>10.3e} {r.psnr:>8.2f}  {status}")
    return "\n".join(lines)
