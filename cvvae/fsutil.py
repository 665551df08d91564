"""Atomic output: write into a temporary sibling, then rename, so a failure never leaves a half-written result."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_writable_target(path: Path, *, overwrite: bool, what: str = "output") -> None:
    """Refuse an existing target unless ``overwrite``; make sure the parent directory can be written."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {path} already exists; pass --force (overwrite=True) to replace it")
    ancestor = path.absolute().parent
    while not ancestor.exists():  # the nearest existing ancestor decides whether the folders can be made
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {what} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise PermissionError(f"cannot write {what} {path}: directory {ancestor} is not writable")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it.

    With ``directory=True`` the temporary path is a fresh directory (for multi-file outputs).
    """
    path = Path(path)
    check_writable_target(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private entries; give the result the permissions a normal write would have
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if directory else 0o666) & ~umask)
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while writing; pass --force to replace it")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def reporting_target(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError without a file name (a failed write on an open temporary) as one naming ``path``.

    A full disk then reads "could not write OUT.safetensors", not an anonymous "[Errno 28]".
    """
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
