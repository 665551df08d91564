"""Device memory and streams on one CUDA GPU, through torch where it is installed, else CuPy (thin runtime, item 3).

The TensorRT backend needs device buffers, a stream of its own and stream ordering with the caller's work; those
are the only CUDA services it uses, and both torch and CuPy offer them. Which one is used is decided once per
device: torch when installed (the caller's tensors are then ordered with torch's current stream), else CuPy (the
``gpu`` extra). Arrays of the other family, or from any DLPack/``__cuda_array_interface__`` producer, are accepted
and viewed without copies where the device and dtype already fit.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import arrays
from .extras import is_installed, lazy_import


@dataclass
class CudaDevice:
    """CUDA device ``index`` driven by ``lib`` ("torch" or "cupy")."""

    index: int
    lib: str
    module: Any

    @classmethod
    def open(cls, index: int = 0, lib: str | None = None) -> "CudaDevice":
        """torch where installed, else CuPy; a missing CuPy says what to install."""
        lib = lib or ("torch" if is_installed("torch") else "cupy")
        module = lazy_import(lib, "CUDA device buffers for the tensorrt backend")
        return cls(index, lib, module)

    # ----- arrays ---------------------------------------------------------------------------------------------
    @property
    def namespace(self) -> Any:
        """array-api-compat's namespace for this device's library."""
        return importlib.import_module(f"array_api_compat.{self.lib}")

    @property
    def device(self) -> Any:
        return self.module.device("cuda", self.index) if self.lib == "torch" else self.module.cuda.Device(self.index)

    def dtype(self, name: str) -> Any:
        return getattr(self.module, name)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        if self.lib == "torch":
            return self.module.empty(shape, dtype=self.dtype(dtype), device=self.device)
        with self.device:
            return self.module.empty(shape, dtype=self.dtype(dtype))

    def put(self, x: Any, dtype: str) -> Any:
        """``x`` (any array) as a C-contiguous array of ``dtype`` on this device, in this device's library."""
        m = self.module
        if self.lib == "torch":
            t = x if arrays.is_torch_array(x) else m.from_numpy(np.ascontiguousarray(x)) if not arrays.on_cuda(x) \
                else m.from_dlpack(x)
            return t.to(self.device, self.dtype(dtype), non_blocking=True).contiguous()
        with self.device:
            a = x if arrays.is_cupy_array(x) else m.asarray(arrays.to_numpy(x)) if not arrays.on_cuda(x) \
                else m.from_dlpack(x)
            return m.ascontiguousarray(a.astype(self.dtype(dtype), copy=False))

    # ----- streams --------------------------------------------------------------------------------------------
    def guard(self) -> AbstractContextManager:
        """Make this device current for the block."""
        return self.module.cuda.device(self.index) if self.lib == "torch" else self.module.cuda.Device(self.index)

    def new_stream(self) -> Any:
        if self.lib == "torch":
            return self.module.cuda.Stream(device=self.device)
        with self.device:
            return self.module.cuda.Stream(non_blocking=True)

    def current_stream(self) -> Any:
        if self.lib == "torch":
            return self.module.cuda.current_stream(self.device)
        with self.device:
            return self.module.cuda.get_current_stream()

    @staticmethod
    def pointer(stream: Any) -> int:
        """The ``cudaStream_t`` of a torch or CuPy stream."""
        return int(stream.cuda_stream if hasattr(stream, "cuda_stream") else stream.ptr)

    def wait(self, waiter: Any, work_of: Any) -> None:
        """Make ``waiter`` wait (on the device, no host sync) for the work enqueued so far on ``work_of``."""
        if self.lib == "torch":
            waiter.wait_stream(work_of)
        else:
            waiter.wait_event(work_of.record())

    # ----- environment ----------------------------------------------------------------------------------------
    def describe(self) -> tuple[str, str, str]:
        """(CUDA runtime version, GPU name, compute capability "major.minor")."""
        if self.lib == "torch":
            major, minor = self.module.cuda.get_device_capability(self.index)
            return str(self.module.version.cuda), self.module.cuda.get_device_name(self.index), f"{major}.{minor}"
        runtime = self.module.cuda.runtime
        version = runtime.runtimeGetVersion()  # 1000 * major + 10 * minor
        props = runtime.getDeviceProperties(self.index)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return f"{version // 1000}.{version % 1000 // 10}", name, f"{props['major']}.{props['minor']}"

    def available(self) -> bool:
        if self.lib == "torch":
            return bool(self.module.cuda.is_available()) and self.index < self.module.cuda.device_count()
        try:
            return self.index < self.module.cuda.runtime.getDeviceCount()
        except Exception:  # noqa: BLE001 - CuPy raises CUDARuntimeError without a driver
            return False
