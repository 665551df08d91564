"""Verified files: a graph or an engine is loaded only after its sha256 matches the one recorded when it was written
(the export's ``manifest.json``, the engine's sidecar; tensorrt-notes "sidecar", issue 13 item 1), and a file name
taken from a manifest must name a file inside that manifest's folder.

Hashing a graph of a few hundred MB takes about a second, so :func:`file_sha256` remembers results keyed by the file's
identity and state: device, inode, size, mtime and ctime (nanoseconds). ``cp``/``mv`` over the file change the inode
or the times, and ctime cannot be set back by ``touch``, so a replaced or edited file is always hashed again. The
results live in the process and in ``<cache>/verified-sha256.json`` (``$CVVAE_CACHE``), so a warm start of the CLI
hashes nothing; whoever can write that cache can also write the exports it describes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import CVVAEError, IntegrityError
from .fsutil import atomic_path, cache_root, sha256_file

CACHE_NAME = "verified-sha256.json"
CACHE_FORMAT = "cvvae-sha256-cache/1"
CACHE_LIMIT = 512  # entries kept on disk (the most recent)

_MEMO: dict[str, tuple[list[int], str]] = {}


def _state(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_file() -> Path:
    return cache_root() / CACHE_NAME


def _read_cache() -> dict[str, list]:
    try:
        doc = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    entries = doc.get("entries") if isinstance(doc, dict) and doc.get("format") == CACHE_FORMAT else None
    return entries if isinstance(entries, dict) else {}


def _write_cache(key: str, state: list[int], sha: str) -> None:
    entries = _read_cache()
    entries.pop(key, None)
    entries[key] = [state, sha]
    entries = dict(list(entries.items())[-CACHE_LIMIT:])
    with contextlib.suppress(OSError, CVVAEError):  # a read-only or full cache only costs speed
        path = _cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}) + "\n")


def file_sha256(path: str | Path) -> str:
    """sha256 of ``path``, from the cache while the file is unchanged (see the module docstring)."""
    path = Path(path).resolve()
    key = str(path)
    state = _state(path.stat())
    hit = _MEMO.get(key)
    if hit is None:
        disk = _read_cache().get(key)
        hit = (disk[0], disk[1]) if isinstance(disk, list) and len(disk) == 2 else None
    if hit is not None and hit[0] == state:
        _MEMO[key] = hit
        return hit[1]
    sha = sha256_file(path)
    if _state(path.stat()) == state:  # unchanged while it was read: the hash describes this state
        _MEMO[key] = (state, sha)
        _write_cache(key, state, sha)
    return sha


def check_sha256(path: str | Path, expected: str | None, *, recorded_in: str | Path, fix: str) -> None:
    """Raise :class:`IntegrityError` (one line: file, expected and actual sha256, ``fix``) unless they match."""
    if not expected:
        raise IntegrityError(f"{recorded_in} records no sha256 for {path}, so it cannot be verified; {fix}")
    actual = file_sha256(path)
    if actual != expected:
        raise IntegrityError(f"{path} does not match {recorded_in}: sha256 {actual}, expected {expected} (replaced "
                             f"or modified after it was written); {fix}")


def check_member_name(name: object, *, listed_in: str | Path, fix: str) -> str:
    """``name`` if it is a plain relative path below the manifest's folder (no absolute path, drive or ``..``)."""
    text = str(name) if isinstance(name, str) else ""
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if (not text or posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts
            or ".." in windows.parts or "\x00" in text):
        raise IntegrityError(f"{listed_in} lists the file {name!r}, which is not a relative path inside its folder "
                             f"(absolute paths and '..' are refused); {fix}")
    return text


def member_path(directory: str | Path, name: object, *, listed_in: str | Path, fix: str) -> Path:
    """``directory / name`` after :func:`check_member_name`, also refusing a symlink that leads outside."""
    directory = Path(directory)
    path = directory / check_member_name(name, listed_in=listed_in, fix=fix)
    real, root = path.resolve(), directory.resolve()
    if real != root and root not in real.parents:
        raise IntegrityError(f"{path} (listed in {listed_in}) leads to {real}, outside {directory}; {fix}")
    return path
