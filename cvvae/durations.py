"""Durations as people read them in progress lines and logs (training, benchmarks)."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``4m05s`` or ``1h02m03s`` (negative values read as 0)."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
