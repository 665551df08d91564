"""Arrays in and out of the runtime by DLPack (thin-runtime issue, items 3 and 4).

The runtime works in the caller's array family: numpy in, numpy out; torch in, torch out; CuPy (or any other array
exposing ``__dlpack__`` / ``__cuda_array_interface__`` on a GPU) in, CuPy out. The chunk/tile executor
(:mod:`cvvae.tiling`) runs on whatever these helpers hand it; backends convert only at their own edge (ONNX Runtime on
the CPU wants numpy, PyTorch wants torch tensors, device graphs want a data pointer). None of this imports torch or
CuPy unless the caller's arrays already come from them.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_cupy_array, is_numpy_array, is_torch_array
from array_api_compat import device as array_device

from .errors import InputError
from .extras import lazy_import

Array = Any
__all__ = ["array_device", "as_array", "contiguous", "cuda_device_index", "data_pointer", "is_cupy_array",
           "is_numpy_array", "is_torch_array", "like", "namespace", "on_cuda", "to_numpy"]

DLPACK_CPU = 1  # kDLCPU in DLPack's device enum
DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def as_array(x: Any) -> Array:
    """An array the executor can run on: numpy, torch and CuPy arrays as they are; other DLPack arrays converted.

    A CPU DLPack array becomes a zero-copy numpy array; a CUDA one a zero-copy CuPy array (CuPy needed).
    """
    if is_numpy_array(x) or is_torch_array(x) or is_cupy_array(x):
        return x
    if hasattr(x, "__dlpack_device__"):
        kind = int(x.__dlpack_device__()[0])
        if kind == DLPACK_CPU:
            return np.from_dlpack(x)
        if kind in DLPACK_CUDA:
            return lazy_import("cupy", "passing CUDA arrays other than torch or CuPy").from_dlpack(x)
        raise InputError(f"arrays on DLPack device type {kind} are not supported: pass CPU or CUDA arrays")
    if hasattr(x, "__cuda_array_interface__"):
        return lazy_import("cupy", "passing __cuda_array_interface__ arrays").asarray(x)
    if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
        return np.asarray(x)
    raise InputError(f"expected a numpy array or a DLPack-capable array (torch, CuPy, JAX...), "
                     f"not {type(x).__name__}")


def on_cuda(x: Array) -> bool:
    """Whether ``x`` lives in CUDA device memory."""
    if is_numpy_array(x):
        return False
    if is_torch_array(x):
        return x.device.type == "cuda"
    if is_cupy_array(x):
        return True
    return hasattr(x, "__dlpack_device__") and int(x.__dlpack_device__()[0]) in DLPACK_CUDA


def cuda_device_index(x: Array) -> int:
    """The CUDA ordinal of a device array."""
    if is_torch_array(x):
        return x.device.index or 0
    if is_cupy_array(x):
        return int(x.device.id)
    return int(x.__dlpack_device__()[1])


def data_pointer(x: Array) -> int:
    """Address of the first element of a C-contiguous device (or host) array."""
    if is_torch_array(x):
        return int(x.data_ptr())
    if is_cupy_array(x):
        return int(x.data.ptr)
    if is_numpy_array(x):
        return int(x.ctypes.data)
    return int(x.__cuda_array_interface__["data"][0])


def contiguous(x: Array) -> Array:
    """A C-contiguous version of ``x`` (the same array when it already is)."""
    if is_torch_array(x):
        return x.contiguous()
    if is_cupy_array(x):
        return lazy_import("cupy", "CuPy arrays").ascontiguousarray(x)
    return np.ascontiguousarray(x)


def to_numpy(x: Array, dtype: Any = None) -> np.ndarray:
    """A host numpy array of ``x`` (zero-copy for numpy and CPU torch tensors); ``dtype`` casts when it differs."""
    if is_numpy_array(x):
        y = x
    elif is_torch_array(x):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        y = t.numpy()
    elif is_cupy_array(x):
        y = x.get()
    else:
        y = np.from_dlpack(x)
    return y if dtype is None else y.astype(dtype, copy=False)


def like(y: Array, ref: Array) -> Array:
    """``y`` as an array of ``ref``'s family and device (no copy when it already is)."""
    if is_numpy_array(ref):
        return to_numpy(y)
    if is_torch_array(ref):
        torch = sys.modules["torch"]  # ref is a torch tensor, so torch is imported
        t = torch.from_numpy(y) if is_numpy_array(y) else y if is_torch_array(y) else torch.from_dlpack(y)
        return t if t.device == ref.device else t.to(ref.device)
    if is_cupy_array(ref):
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(ref.device.id):
            return y if is_cupy_array(y) and y.device == ref.device else cupy.asarray(to_numpy(y) if not on_cuda(y)
                                                                                  else cupy.from_dlpack(y))
    return y


def namespace(x: Array) -> Any:
    """The array API namespace of ``x`` (array-api-compat's wrapper for numpy/torch/CuPy)."""
    return array_namespace(x)


def is_floating(x: Array) -> bool:
    return array_namespace(x).isdtype(x.dtype, "real floating")


def is_uint8(x: Array) -> bool:
    return x.dtype == array_namespace(x).uint8
