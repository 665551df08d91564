"""Allocation without churn (issue 16): cvvae.allocator keeps big freed buffers for reuse on glibc."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt is what is tested")

CHILD = """
import json, resource, sys
import torch
from cvvae.allocator import keep_memory, release_memory, returning_memory
state = keep_memory() if sys.argv[1] == "keep" else None
def faults(n=8, size=64 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = torch.ones(size, dtype=torch.uint8)   # written: every page is touched (torch does not ask for huge pages)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
kept = faults()
with returning_memory() as measuring:
    returned = faults()
print(json.dumps({"state": None if state is None else [state.allocator, state.kept, state.note],
                  "kept_faults": kept, "returned_faults": returned, "measuring": measuring,
                  "trimmed": release_memory()}))
"""


def run_child(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "CVVAE_ALLOC"))}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env={**clean, **env}, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_buffers_are_reused_without_page_faults():
    pages = 8 * (64 << 20) // 4096
    default = run_child("system")
    kept = run_child("keep")
    assert kept["state"] == ["glibc", True, "mmap/trim thresholds 2047 MiB, one arena"]
    assert default["kept_faults"] > 0.9 * pages      # glibc mmaps and unmaps each 64 MiB buffer: every page faults
    assert kept["kept_faults"] < 0.5 * pages         # reused from the heap: the first buffers fault in, not the rest
    # the measuring pass trims the kept heap first: its pages go back to the kernel and fault in again when reused
    assert kept["measuring"] and kept["returned_faults"] > 0.9 * pages / 8


@pytest.mark.parametrize("env, note", [({"CVVAE_ALLOCATOR": "system"}, "left as the system sets it (CVVAE_ALLOCATOR)"),
                                       ({"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                        "thresholds set by the environment, left as they are")])
def test_explicit_settings_are_respected(env, note):
    child = run_child("keep", **env)
    assert child["state"] == ["glibc", False, note]


def test_an_explicit_arena_count_is_kept():
    child = run_child("keep", MALLOC_ARENA_MAX="4")
    assert child["state"] == ["glibc", True, "mmap/trim thresholds 2047 MiB"]
