"""The memory budget of a job: ``--max-memory`` parsing and its default, the memory available now (issue 16).

The estimate of what a plan needs is :func:`cvvae.plan.estimate_memory`; :func:`cvvae.plan.fit_plan` picks the plan
that fits the budget given here.
"""

from __future__ import annotations

import os
import re

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEFAULT_FRACTION = 0.9  # of MemAvailable: leave room for the page cache and the rest of the system


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"1.5G"``, ``"512M"``, ``"8GiB"``, ``"1000000"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"memory size {text!r} is not a positive size such as 8G, 1.5G or 512M")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else physical memory from sysconf; None when neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int | None:
    """The budget when ``--max-memory`` is not given: 90 % of the memory available now (None if unknown)."""
    available = available_memory()
    return None if available is None else int(available * DEFAULT_FRACTION)

