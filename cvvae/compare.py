"""Comparisons as data, and every tolerance of the toolkit in one place (spec: "Export verification" and "Parity").

One :class:`Comparison` per output (optionally per component, backend, precision and case) holds the error statistics
of a candidate against a reference: max/mean/p99 absolute error, PSNR, the reference's magnitude, non-finite
elements, and the limits of the named :class:`Tolerance` it was judged by, like Polygraphy's ``OutputCompareResult``.
Export verification, ``cvvae parity``, ``cvvae deploy`` (and ``build.sh``), INT8 accuracy and the tests compare with
:func:`compare` and print with :func:`format_table`.

Why not Polygraphy's ``Comparator`` itself: it compares runners that each execute one graph on one feed, while parity
runs whole videos through the chunk/tile plan (many graph calls, blended tiles) on torch, ONNX Runtime and TensorRT
alike. Polygraphy is the tool to bisect a TensorRT engine layer by layer; ``cvvae deploy`` prints that command.

The module is numpy only: torch tensors (and CuPy arrays) are converted, torch is never imported, so the thin runtime
can compare too.

Tolerances (a check passes when every set limit holds and no element is non-finite):

* ``max_abs <= atol + rtol * max|reference|``; ``mean_abs <= mean_atol + mean_rtol * mean|reference|``;
  ``psnr >= min_psnr`` (PSNR with data range 2: pixels and latents in roughly [-1, 1]).
* Export verification (:data:`EXPORT`; each graph alone against raw PyTorch fp32, no chunking): fp32 1e-4 max abs
  (the graph computes what PyTorch computes, up to summation order); fp16 1e-2 + 1e-2 * max|reference| max abs and
  2e-3 + 1e-3 * mean|reference| mean abs (fp16 keeps 11 significant bits and the rounding compounds over ~40
  convolutions and 30 normalisations; measured errors, docs/export.md, sit 2-5x below; the relative mean part is for
  outputs far from 1, e.g. a posterior logvar of 17-20). :data:`FP16_END_TO_END`: the fp16 encoder feeding the fp16
  decoder, 3e-2 + 2e-2 * max|reference| max abs, 5e-3 + 2e-3 * mean|reference| mean abs.
* Parity (:data:`PARITY`; a backend through the whole chunk/tile plan against PyTorch fp32 on a real clip, as
  docs/engines.md states): max abs fp32 1e-3; fp16 2e-2 per component and 5e-2 for the round trip (its encoder feeding
  its decoder compounds both: FP16_END_TO_END's 3e-2 + 2e-2 * max|pixels| with pixels in [-1, 1]); int8 is not
  bounded elementwise but by PSNR, >= 30 dB per component and >= 20 dB for the round trip (its accuracy contract is
  the PSNR drop against the input frames that ``cvvae calibrate`` measures).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .arrays import to_numpy
from .errors import InputError
from .metrics import psnr_from_mse

P99_SAMPLE = 1 << 24  # elements the p99 is computed on (a fixed random subset beyond)


@dataclass(frozen=True)
class Tolerance:
    """Limits a comparison is judged by; ``None`` leaves that statistic unchecked."""

    atol: float | None = None
    rtol: float = 0.0
    mean_atol: float | None = None
    mean_rtol: float = 0.0
    min_psnr: float | None = None

    def limit(self, reference_max_abs: float) -> float | None:
        return None if self.atol is None else self.atol + self.rtol * reference_max_abs

    def mean_limit(self, reference_mean_abs: float) -> float | None:
        return None if self.mean_atol is None else self.mean_atol + self.mean_rtol * reference_mean_abs

    def describe(self) -> str:
        """Short form for tables: ``1e-03``, ``1e-02+1e-02*|ref|``, ``>=30dB``."""
        parts = []
        if self.atol is not None:
            parts.append(f"{self.atol:.0e}" + (f"+{self.rtol:.0e}*|ref|" if self.rtol else ""))
        if self.min_psnr is not None:
            parts.append(f">={self.min_psnr:g}dB")
        return ",".join(parts) or "-"


EXPORT: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, mean_atol=2e-3, mean_rtol=1e-3),
}
FP16_END_TO_END = Tolerance(atol=3e-2, rtol=2e-2, mean_atol=5e-3, mean_rtol=2e-3)
PARITY: dict[tuple[str, str], Tolerance] = {
    ("fp32", "component"): Tolerance(atol=1e-3),
    ("fp32", "round_trip"): Tolerance(atol=1e-3),
    ("fp16", "component"): Tolerance(atol=2e-2),
    ("fp16", "round_trip"): Tolerance(atol=5e-2),
    ("int8", "component"): Tolerance(min_psnr=30.0),
    ("int8", "round_trip"): Tolerance(min_psnr=20.0),
}


def parity_tolerance(precision: str, output: str) -> Tolerance:
    """The parity tolerance of ``output`` (``encoder.mean``, ``round_trip.video``, ...) at ``precision``."""
    kind = "round_trip" if output.startswith("round_trip") else "component"
    try:
        return PARITY[(precision, kind)]
    except KeyError:
        raise InputError(f"no parity tolerance for precision {precision!r}; known: "
                         f"{', '.join(sorted({p for p, _ in PARITY}))}") from None


@dataclass(frozen=True)
class Comparison:
    """Errors of one output against its reference, and the limits it was judged by."""

    output: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    p99_abs: float
    psnr: float
    reference_max_abs: float
    limit: float | None = None
    mean_limit: float | None = None
    min_psnr: float | None = None
    nonfinite: int = 0
    component: str = ""
    precision: str = ""
    case: str = ""
    backend: str = ""

    @property
    def name(self) -> str:
        """``backend/output`` (``onnxruntime/encoder.mean``), or the output alone."""
        return f"{self.backend}/{self.output}" if self.backend else self.output

    @property
    def passed(self) -> bool:
        return (self.nonfinite == 0 and (self.limit is None or self.max_abs <= self.limit)
                and (self.mean_limit is None or self.mean_abs <= self.mean_limit)
                and (self.min_psnr is None or self.psnr >= self.min_psnr))

    def __bool__(self) -> bool:
        return self.passed

    def failure(self) -> str:
        """Which limit failed, in words (empty when it passed)."""
        why = []
        if self.nonfinite:
            why.append(f"{self.nonfinite} non-finite")
        if self.limit is not None and self.max_abs > self.limit:
            why.append(f"max abs {self.max_abs:.3g} > {self.limit:.3g}")
        if self.mean_limit is not None and self.mean_abs > self.mean_limit:
            why.append(f"mean abs {self.mean_abs:.3g} > {self.mean_limit:.3g}")
        if self.min_psnr is not None and self.psnr < self.min_psnr:
            why.append(f"PSNR {self.psnr:.2f} dB < {self.min_psnr:g} dB")
        return ", ".join(why)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: an infinite PSNR (identical outputs) becomes ``None`` (strict JSON has no infinity)."""
        d = asdict(self)
        d["psnr"] = self.psnr if math.isfinite(self.psnr) else None
        d["shape"] = list(self.shape)
        d["name"] = self.name
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Comparison":
        """Back from :meth:`as_dict` (manifests written before a field existed get its default)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["shape"] = tuple(values.get("shape", ()))
        values["psnr"] = math.inf if values.get("psnr", math.inf) is None else values.get("psnr", math.nan)
        return cls(**values)


def compare(actual: Any, reference: Any, tolerance: Tolerance | None = None, *, output: str = "",
            component: str = "", precision: str = "", case: str = "", backend: str = "",
            data_range: float = 2.0) -> Comparison:
    """Errors of ``actual`` against ``reference`` (numpy arrays or torch tensors; computed in float64). Non-finite
    elements of ``actual`` are counted (any fails the check) and enter the statistics as 0."""
    a, r = to_numpy(actual), to_numpy(reference)
    if a.shape != r.shape:
        where = " ".join(x for x in (component, backend, output, case) if x)
        raise InputError(f"{where}: shape {tuple(a.shape)} differs from the reference {tuple(r.shape)}")
    a, r = a.astype(np.float64), r.astype(np.float64)
    finite = np.isfinite(a)
    err = np.abs(np.where(finite, a, 0.0) - r)
    ref_abs = np.abs(r)
    tolerance = tolerance or Tolerance()
    empty = err.size == 0
    ref_max = 0.0 if empty else float(ref_abs.max())
    flat = err.ravel()
    if flat.size > P99_SAMPLE:
        flat = flat[np.random.default_rng(0).choice(flat.size, P99_SAMPLE, replace=False)]
    return Comparison(
        output=output, shape=tuple(a.shape),
        max_abs=0.0 if empty else float(err.max()),
        mean_abs=0.0 if empty else float(err.mean()),
        p99_abs=0.0 if empty else float(np.quantile(flat, 0.99)),
        psnr=psnr_from_mse(0.0 if empty else float(np.mean(err ** 2)), data_range),
        reference_max_abs=ref_max, limit=tolerance.limit(ref_max),
        mean_limit=tolerance.mean_limit(0.0 if empty else float(ref_abs.mean())), min_psnr=tolerance.min_psnr,
        nonfinite=int((~finite).sum()), component=component, precision=precision, case=case, backend=backend)


# ----- tables -------------------------------------------------------------------------------------------------------
Column = tuple[str, int, Callable[[Comparison], str]]  # header, width (negative: left-aligned), cell


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else format(value, spec)


def _verify_status(c: Comparison) -> str:
    return "yes" if c.passed else "NO" + (f" ({c.nonfinite} non-finite)" if c.nonfinite else "")


def _parity_status(c: Comparison) -> str:
    return "ok" if c.passed else f"FAIL ({c.failure()})"


COLUMNS: dict[str, list[Column]] = {
    # export verification: one row per component, precision, case and output
    "verify": [("component", -9, lambda c: c.component), ("prec", -5, lambda c: c.precision),
               ("case", -22, lambda c: c.case), ("output", -7, lambda c: c.output),
               ("max_abs", 9, lambda c: f"{c.max_abs:.2e}"), ("mean_abs", 9, lambda c: f"{c.mean_abs:.2e}"),
               ("p99_abs", 9, lambda c: f"{c.p99_abs:.2e}"), ("|ref|max", 9, lambda c: f"{c.reference_max_abs:.3g}"),
               ("limit", 9, lambda c: _num(c.limit, ".2e")), (" ok", -3, lambda c: " " + _verify_status(c))],
    # cvvae parity: backend/output rows
    "parity": [("output", -28, lambda c: c.name), ("max abs", 10, lambda c: f"{c.max_abs:.3e}"),
               ("mean abs", 10, lambda c: f"{c.mean_abs:.3e}"), ("p99 abs", 10, lambda c: f"{c.p99_abs:.3e}"),
               ("PSNR dB", 8, lambda c: _num(c.psnr, ".2f")), (" status", -7, lambda c: " " + _parity_status(c))],
    # cvvae deploy's summary: every backend and precision against PyTorch fp32
    "deploy": [("backend", -12, lambda c: c.backend), ("prec", -5, lambda c: c.precision),
               ("output", -18, lambda c: c.output), ("max abs", 10, lambda c: f"{c.max_abs:.3e}"),
               ("mean abs", 10, lambda c: f"{c.mean_abs:.3e}"), ("PSNR dB", 8, lambda c: _num(c.psnr, ".2f")),
               ("tolerance", 9, lambda c: tolerance_of(c).describe()),
               (" status", -7, lambda c: " ok" if c.passed else " FAIL")],
}


def tolerance_of(c: Comparison) -> Tolerance:
    """The parity tolerance a comparison was judged by (for display)."""
    return parity_tolerance(c.precision, c.output) if c.precision else Tolerance()


def format_table(rows: Sequence[Comparison], columns: str | Sequence[Column] = "parity") -> str:
    """A fixed-width table of comparisons; ``columns`` names a layout of :data:`COLUMNS` or gives one."""
    cols = COLUMNS[columns] if isinstance(columns, str) else list(columns)

    def line(cells: Sequence[str]) -> str:
        return " ".join(f"{cell:<{-w}}" if w < 0 else f"{cell:>{w}}" for cell, (_, w, _) in zip(cells, cols)).rstrip()

    header = line([h for h, _, _ in cols])
    return "\n".join([header, "-" * len(header), *(line([cell(r) for _, _, cell in cols]) for r in rows)])


__all__ = ["Comparison", "COLUMNS", "EXPORT", "FP16_END_TO_END", "PARITY", "Tolerance", "compare", "format_table",
           "parity_tolerance", "tolerance_of"]
