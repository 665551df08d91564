"""Shared vocabulary of the dataset subpackage: the dataset format name, the error type, the (H, W) alias and the UTC
timestamp every record carries. Nothing here knows about videos, models or Ray; every other module imports it.
"""

from __future__ import annotations

from datetime import datetime, timezone

FORMAT = "cvvae-dataset/1"  # of plan.json and index.json

HW = tuple[int, int]


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
