"""Tensor files for the CLI: float pixels in .npy, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputError
from .fsutil import atomic_path, reporting_target


def read_pixels(path: Path) -> np.ndarray:
    """Float pixels in [-1, 1] from a .npy file, checked for shape and range."""
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.suffix != ".npy":
        raise InputError(f"tensor input {path} must be .npy (float32 pixels in [-1,1], shape (B,3,T,H,W) or (3,T,H,W))")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"cannot read {path} as a .npy array: {e}") from e
    if arr.ndim not in (4, 5) or arr.shape[-4] != 3:
        raise InputError(f"{path} has shape {arr.shape}; expected (B,3,T,H,W) or (3,T,H,W) RGB pixels")
    if arr.size == 0:
        raise InputError(f"{path} has shape {arr.shape}: no pixels (a video needs at least 1 frame of 1x1)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path} holds {arr.dtype}; expected float pixels in [-1,1] (x/127.5 - 1 for uint8)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1.001 or hi > 1.001 or not np.isfinite([lo, hi]).all():
        raise InputError(f"{path} has values in [{lo:.3g}, {hi:.3g}]; expected pixels in [-1, 1]")
    return np.ascontiguousarray(arr, dtype=np.float32)


class _PlainWriter:
    """Not an io file object, so numpy writes through ``write`` in chunks instead of ``tofile``: a full disk then
    raises OSError(ENOSPC) with its errno rather than numpy's "N requested and M written"."""

    def __init__(self, f: BinaryIO) -> None:
        self.write = f.write


def save_npy(path: Path, array: np.ndarray, *, overwrite: bool) -> None:
    with reporting_target(path), atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.save(_PlainWriter(f), array)
