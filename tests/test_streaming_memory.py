"""Streaming decode: peak memory does not grow with video length (65 vs 257 frames, fresh processes, RSS)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import streaming_memory  # noqa: E402


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_decode_257_frames_needs_no_more_memory_than_65():
    # each measurement is its own single-threaded process with its own peak-RSS mark: run both at once
    with ThreadPoolExecutor(2) as pool:
        short, long = pool.map(lambda frames: streaming_memory.measure("random:tiny-v1", frames, 48, 64), (65, 257))
    assert (short["frames"], long["frames"]) == (65, 257)
    assert long["peak_rss_mb"] <= 1.10 * short["peak_rss_mb"]
    # stricter: the growth above the pre-decode RSS stays within 10%, which holding all 257 decoded frames
    # (257*3*48*64*4 bytes = 9.5 MB on top of ~40 MB of working memory) would exceed
    grow_short = short["peak_rss_mb"] - short["rss_before_mb"]
    grow_long = long["peak_rss_mb"] - long["rss_before_mb"]
    assert grow_long <= 1.10 * grow_short + 1.0, (short, long)
