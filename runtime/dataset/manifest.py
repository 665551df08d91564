"""Manifest reading: INPUTS (a directory, a glob, a video, a text list of paths, or a CSV/TSV/Parquet/JSONL
manifest) become :class:`ManifestRow` s, each a video path with an optional source frame range ``[start, end)`` and
the other columns of its row, passed through to every clip record.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvvae.errors import DatasetError
from cvvae.extras import lazy_import


VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"})
RESERVED_COLUMNS = ("path", "start", "end")  # everything else in a manifest row is passed through


@dataclass(frozen=True)
class ManifestRow:
    """One video of the manifest: frames ``[start, end)`` (source indices; None: from the first / to the last)."""

    row: int                       # position among all INPUTS, from 0
    path: str                      # absolute
    start: int | None = None
    end: int | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # caption, ids, ...: copied into every clip record


def read_manifest(inputs: str | Path | Sequence[str | Path]) -> list[ManifestRow]:
    """Rows of one or more INPUTS, in order.

    Each input is a directory (its video files, recursively, sorted), a glob (``clips/**/*.mp4``; the matching
    files, sorted), a video file, a text list (``.txt``/``.lst``: one path per line, ``#`` comments), or a
    manifest (``.csv``/``.tsv``/``.parquet``/``.jsonl``) with a ``path`` column, optional ``start``/``end``
    (source frames, end exclusive) and any other columns (passed through). Relative paths in a list or manifest
    are relative to that file's folder.
    """
    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not specs:
        raise DatasetError("no INPUTS: pass a directory, a glob, a text list of paths or a CSV/Parquet manifest")
    rows: list[ManifestRow] = []
    for spec in specs:
        for where, record in _read_input(str(spec)):
            rows.append(_to_row(len(rows), record, where))
    return rows


def _read_input(spec: str) -> list[tuple[str, dict[str, Any]]]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        if not files:
            raise DatasetError(f"directory {path} holds no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
        return [(str(path), {"path": str(p.resolve())}) for p in files]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            return [(str(path), {"path": str(path.resolve())})]
        reader = _MANIFEST_READERS.get(suffix)
        if reader is None:
            raise DatasetError(
                f"cannot tell what {path} is from its suffix {suffix or '(none)'!r}: pass a directory, a glob, a "
                f"video, a path list (.txt/.lst) or a manifest ({', '.join(sorted(_MANIFEST_READERS))})")
        base = path.resolve().parent
        out = []
        for n, record in enumerate(reader(path), 1):
            where = f"{path} row {n}"
            value = record.get("path")
            if value is None or str(value).strip() == "":
                raise DatasetError(f"{where} has no 'path' (columns: {', '.join(map(str, record)) or 'none'}); "
                                   "a manifest needs a 'path' column")
            record["path"] = str((base / Path(str(value).strip()).expanduser()).resolve())
            out.append((where, record))
        return out
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(m).resolve() for m in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise DatasetError(f"glob {spec!r} matches no files (cwd {Path.cwd()})")
        return [(spec, {"path": str(p)}) for p in files]
    raise DatasetError(f"input {spec} does not exist (cwd {Path.cwd()}); pass a directory, a glob, a video, "
                       "a text list of paths or a CSV/Parquet manifest")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(r) for r in csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    pq = lazy_import("pyarrow.parquet", f"reading the Parquet manifest {path}", instead="pass a CSV manifest")
    return pq.read_table(path).to_pylist()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} line {n} is not JSON: {e}") from e
        records.append(value if isinstance(value, dict) else {"path": value})
    return records


def _read_list(path: Path) -> list[dict[str, Any]]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [{"path": line} for line in lines if line and not line.startswith("#")]


_MANIFEST_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet, ".pq": _read_parquet, ".jsonl": _read_jsonl,
    ".txt": _read_list, ".lst": _read_list, ".list": _read_list,
}


def _to_row(index: int, record: dict[str, Any], where: str) -> ManifestRow:
    columns = {str(k): _jsonable(v) for k, v in record.items() if k not in RESERVED_COLUMNS}
    return ManifestRow(index, str(record["path"]), _frame_number(record.get("start"), "start", where),
                       _frame_number(record.get("end"), "end", where), columns)


def _frame_number(value: Any, name: str, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {name}={value!r} is not a frame number") from None
    if number != int(number) or number < 0:
        raise DatasetError(f"{where}: {name}={value!r} must be a whole frame number >= 0")
    return int(number)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)
