"""Allocation without churn: keep the C allocator from returning big buffers to the kernel between ops.

Why (issue 16): a decoder activation of the default model at 256x455 is ~0.5 GB, far above glibc's dynamic mmap
threshold (at most 32 MiB on 64-bit). glibc serves every such buffer with a fresh ``mmap`` and gives it back with
``munmap`` when torch frees it, so each conv output is faulted in page by page (zeroed by the kernel) and unmapped
again: the README job spent 32 s of system time in 15.6 M minor faults against 62 s of user time.

:func:`keep_memory` raises glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (``mallopt``) so such buffers come
from the heap and are reused by the next op, and sets ``M_ARENA_MAX`` to 1 so that every thread allocates from that
one heap (threads' own arenas otherwise keep freed buffers the main thread cannot reuse). With the frame-sliced
layers (:mod:`cvvae.slicing`) the README job peaked at 1.92-3.00 GiB over 12 runs with one arena and 2.57-3.20 GiB
over 3 with glibc's default 8, system time 2-3 % of user time either way (docs/benchmarks.md, "Main job,
frame-sliced layers"): one arena stays, with no strong evidence for it. :func:`release_memory` (``malloc_trim(0)``)
hands the free heap back at the end of a job; trimming after every chunk did not lower the peak. Both are no-ops where the C library is not glibc (musl, macOS, Windows) or where another allocator
(tcmalloc, jemalloc via ``LD_PRELOAD``) replaces malloc: those keep freed memory themselves.

Measured here (glibc 2.36): ``mallopt(M_MMAP_THRESHOLD, v)`` accepts any ``int`` v (up to 2 GiB - 1) and setting it
turns glibc's dynamic threshold off; the man page's 32 MiB ``DEFAULT_MMAP_THRESHOLD_MAX`` bounds only the dynamic
adjustment. Allocations made in a thread's own arena (heaps of at most 64 MiB) larger than that are still mmapped;
torch allocates op outputs on the calling (main) thread, whose arena grows with ``brk``.

No torch import here: the CLI calls this before heavy imports, and numpy/ONNX Runtime jobs benefit the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

M_TRIM_THRESHOLD = -1   # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_THRESHOLD = (1 << 31) - 1  # the largest value mallopt takes (an int): keep every buffer up to 2 GiB in the heap
PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


@dataclass(frozen=True)
class AllocatorState:
    """What :func:`keep_memory` did, for logs, benchmark notes and latent metadata."""

    allocator: str        # "glibc", "tcmalloc (LD_PRELOAD)", "other"
    kept: bool            # thresholds raised in this process
    note: str

    def __str__(self) -> str:
        return f"{self.allocator}: {self.note}"


_STATE: AllocatorState | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _preloaded() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in PRELOADED_ALLOCATORS if name in preload), None)


def keep_memory(threshold: int = KEEP_THRESHOLD) -> AllocatorState:
    """Serve buffers up to ``threshold`` bytes from the heap and keep freed memory for reuse (once per process).

    Respects an explicit ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment (the user's
    choice, e.g. a benchmark fixing the threshold for repeatable peaks), a preloaded allocator, and
    ``CVVAE_ALLOCATOR=system`` (leave malloc alone: the behaviour before issue 16, for comparisons).
    """
    global _STATE
    if _STATE is not None:
        return _STATE
    preloaded = _preloaded()
    libc = _glibc()
    if os.environ.get("CVVAE_ALLOCATOR") == "system":
        _STATE = AllocatorState("glibc" if libc else "other", False, "left as the system sets it (CVVAE_ALLOCATOR)")
    elif preloaded:
        _STATE = AllocatorState(f"{preloaded} (LD_PRELOAD)", False, "left to the preloaded allocator")
    elif libc is None:
        _STATE = AllocatorState("other", False, "not glibc: the system allocator's own policy applies")
    elif any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                       "GLIBC_TUNABLES")):
        _STATE = AllocatorState("glibc", False, "thresholds set by the environment, left as they are")
    else:
        value = ctypes.c_int(min(threshold, KEEP_THRESHOLD))
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(M_TRIM_THRESHOLD, value))
        # one arena for every thread unless the user set MALLOC_ARENA_MAX: freed buffers of one thread are then
        # reusable by the others instead of sitting in per-thread heaps (see the module docstring for the figures)
        one_arena = ok and "MALLOC_ARENA_MAX" not in os.environ and bool(libc.mallopt(M_ARENA_MAX, ctypes.c_int(1)))
        _STATE = AllocatorState("glibc", ok, (f"mmap/trim thresholds {value.value >> 20} MiB"
                                              + (", one arena" if one_arena else "")) if ok
                                else "mallopt refused the thresholds; glibc's dynamic threshold applies")
    return _STATE


def release_memory() -> bool:
    """Give free heap memory back to the kernel (``malloc_trim(0)``) at the end of a job; False if not glibc."""
    libc = _glibc()
    if libc is None or _preloaded():
        return False
    return bool(libc.malloc_trim(0))


@contextmanager
def returning_memory(threshold: int = 1 << 20, *, enabled: bool = True) -> Iterator[bool]:
    """For memory measurements only: the kept heap is trimmed (its free pages go back to the kernel) and, inside,
    glibc mmaps new buffers above ``threshold`` and unmaps them when freed.

    The peak RSS of what runs inside is then that of its own live buffers, repeatably, at the page-fault cost
    :func:`keep_memory` avoids; never time what runs inside. Restores the thresholds :func:`keep_memory` set (or
    glibc's defaults) on exit. Yields whether the thresholds could be set.
    """
    libc = _glibc() if enabled and not _preloaded() else None
    ok = libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    if ok:
        libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(threshold))
        libc.malloc_trim(0)
    try:
        yield ok
    finally:
        if ok:
            state = _STATE
            keep = KEEP_THRESHOLD if state is not None and state.kept else None
            # glibc's defaults: trim 128 KiB; the mmap threshold stays fixed (the dynamic one cannot be restored)
            libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(keep or threshold))
            libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(keep or 128 << 10))


def allocator_state() -> AllocatorState | None:
    """The state :func:`keep_memory` set, or None when it was not called in this process."""
    return _STATE
