"""Safe output on disk (deployment side, not in the architecture spec; issue 13 items 2, 3, 9, 10): every output is written into a temporary sibling and published
with an operation that cannot clobber, ``--force`` replaces only an output this toolkit wrote, and a killed run's
temporaries are recognised and removed by the next run.

* Temporaries are named ``.<target name>.cvvae-tmp-<pid>-<8 hex>[<suffix>]`` in the target's folder (the suffix keeps
  libraries that look at it happy). The writer holds an exclusive ``flock`` on the temporary while it lives; the
  kernel drops it when the process dies, ``kill -9`` included. :func:`remove_stale_temps` deletes a temporary of the
  same target only when nobody holds that lock *and* its pid is not a live process here (or it is older than
  :data:`STALE_AFTER_S`, for a pid reused by an unrelated process). Folders shared between machines work as far as
  their ``flock`` does (Linux NFS clients map it onto POSIX locks).
* Files and folders are created with ``0o666``/``0o777`` masked by the umask, like any ``open()``/``mkdir()``.
* Publishing without ``--force`` fails if the target exists at that instant (:func:`publish`): files through
  ``os.link`` + unlink of the temporary, folders through ``renameat2(RENAME_NOREPLACE)``.
* ``--force`` replaces only an output of the same kind (:data:`KINDS`): a regular file for a file; for a folder, one
  whose every entry is ours: PNG frames named ``frame_NNNNNN.png``, or the entries listed in the folder's
  ``.cvvae-output.json`` marker (written on publish), or, for outputs made before markers existed, the files named
  by an export's ``manifest.json`` or a model folder's ``config.json`` + weights (``overwrite=True`` of
  ``save_model``; no CLI ``--force`` writes model folders). Anything else is refused with the reason and left
  untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator

from .errors import InputError

log = logging.getLogger(__name__)

TEMP_TAG = ".cvvae-tmp-"
MARKER_NAME = ".cvvae-output.json"
MARKER_FORMAT = "cvvae-output/1"
STALE_AFTER_S = 24 * 3600
PNG_FRAME = re.compile(r"frame_\d{6}\.png")
EXPORT_FORMAT_PREFIX = "cvvae-export"
LEGACY_MODEL_FILES = frozenset({"config.json", "diffusion_pytorch_model.safetensors"})  # no marker: save_model's
# What --force may replace. "file": a regular file; "png": a folder of frame_NNNNNN.png; the rest: marked folders.
KINDS = ("file", "png", "export", "model", "report", "bench")


# ----- temporaries ----------------------------------------------------------------------------------------------------
def _temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMP_TAG}"


def _is_our_temp(name: str, target: Path) -> int | None:
    """The pid in ``name`` when it is a temporary of ``target`` made by :func:`make_temp`, else None."""
    prefix = _temp_prefix(target)
    if not name.startswith(prefix):
        return None
    m = re.fullmatch(r"(\d+)-[0-9a-f]{8}(\.[^./]*)?", name[len(prefix):])
    return int(m.group(1)) if m else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lock(path: Path, *, blocking: bool) -> int | None:
    """An fd holding ``flock(LOCK_EX)`` on ``path``, or None when another process holds it (non-blocking)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete temporaries of ``target`` left by dead writers (see the module docstring); return what was removed.

    Only names made by :func:`make_temp` for this very target are considered, so nothing else in the folder is
    touched. A temporary folder holds only what its writer put there, so it is removed as a whole.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        pid = _is_our_temp(entry.name, target)
        if pid is None or pid == os.getpid():
            continue
        path = Path(entry.path)
        try:
            age = time.time() - path.lstat().st_mtime
            fd = _lock(path, blocking=False)
        except OSError:
            continue
        if fd is None:
            continue  # a live writer holds it
        try:
            if _pid_alive(pid) and age < STALE_AFTER_S:
                continue  # just created and not yet locked, or a recycled pid: keep it for now
            remove_tree(path)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d temporary output(s) of %s left by interrupted runs", len(removed), target)
    return removed


def make_temp(target: str | Path, *, directory: bool = False) -> tuple[Path, int]:
    """Create a locked temporary sibling of ``target``: (path, fd holding the lock; close it when done).

    Stale temporaries of the same target are removed first. The entry honours the umask (0o666/0o777 & ~umask).
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    suffix = "" if directory else target.suffix
    for _ in range(100):
        tmp = parent / f"{_temp_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        try:
            fd = _lock(tmp, blocking=True)
        except BaseException:
            remove_tree(tmp)
            raise
        assert fd is not None
        return tmp, fd
    raise FileExistsError(f"could not create a temporary name next to {target}")


def remove_tree(path: Path) -> None:
    """Delete a file, link or folder tree if it exists (for temporaries: everything in them is ours)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ----- what --force may replace ---------------------------------------------------------------------------------------
def _listing(folder: Path) -> set[str]:
    """Relative POSIX paths of every entry below ``folder`` (folders included)."""
    out: set[str] = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in (*dirs, *files):
            out.add((rel / name).as_posix())
    return out


def write_marker(folder: Path, kind: str) -> None:
    """Record in ``folder/.cvvae-output.json`` that cvvae wrote it, and every entry it holds."""
    entries = sorted(_listing(folder) - {MARKER_NAME})
    (folder / MARKER_NAME).write_text(json.dumps({"format": MARKER_FORMAT, "kind": kind, "entries": entries},
                                                 indent=1) + "\n")


def _owned_entries(folder: Path, kind: str) -> tuple[set[str] | None, str]:
    """The entries of ``folder`` that are ours as a ``kind`` output, or (None, why it is not one of ours)."""
    if kind == "png":
        names = set(os.listdir(folder))
        foreign = sorted(n for n in names if not (PNG_FRAME.fullmatch(n) and (folder / n).is_file()))
        if foreign:
            return None, f"it holds {_few(foreign)}, which is not a PNG frame written by cvvae"
        return names, ""
    marker = folder / MARKER_NAME
    if marker.is_file():
        try:
            doc = json.loads(marker.read_text())
            entries = set(doc["entries"]) | {MARKER_NAME}
            written_kind = doc["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"its {MARKER_NAME} is unreadable"
        if written_kind != kind:
            return None, f"it is a cvvae {written_kind} folder, not a {kind} folder"
        return entries, ""
    if kind == "export":
        return _legacy_export_entries(folder)
    if kind == "model" and set(os.listdir(folder)) <= LEGACY_MODEL_FILES:  # save_model's layout before markers
        return set(LEGACY_MODEL_FILES), ""
    return None, f"it has no {MARKER_NAME}, so it was not written by cvvae (or by a version before markers)"


def _legacy_export_entries(folder: Path) -> tuple[set[str] | None, str]:
    """Entries of an export folder written before markers existed: manifest.json and the files it names."""
    manifest = folder / "manifest.json"
    try:
        doc = json.loads(manifest.read_text())
        if not str(doc.get("format", "")).startswith(EXPORT_FORMAT_PREFIX):
            return None, f"its manifest.json is not a cvvae export manifest (format {doc.get('format')!r})"
        names = {"manifest.json"}
        for component in doc["components"].values():
            for f in component["files"].values():
                names.update(n for n in (f.get("path"), f.get("data_path")) if n)
    except FileNotFoundError:
        return None, "it has no manifest.json, so it is not a cvvae export folder"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, "its manifest.json is not a readable cvvae export manifest"
    return names, ""


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def replace_problem(path: str | Path, kind: str) -> str | None:
    """Why ``--force`` must not replace the existing ``path`` with a ``kind`` output (None: it may)."""
    if kind not in KINDS:
        raise InputError(f"unknown output kind {kind!r}; one of {', '.join(KINDS)}")
    path = Path(path)
    if kind == "file":
        if path.is_symlink() or path.is_file():
            return None
        if path.is_dir():
            return "it is a directory, and this output is a file"
        return "it is not a regular file"
    if path.is_symlink() or not path.is_dir():
        return f"it is {'a symbolic link' if path.is_symlink() else 'a file'}, and this output is a {kind} folder"
    owned, why = _owned_entries(path, kind)
    if owned is None:
        return why
    foreign = sorted(_listing(path) - owned)
    if foreign:
        return f"it holds {_few(foreign)}, which cvvae did not write"
    return None


def check_writable_target(path: Path, *, overwrite: bool, what: str = "output", kind: str = "file") -> None:
    """Refuse an existing target unless ``overwrite`` and it is a ``kind`` output of ours; check the parent is
    writable. ``kind``: one of :data:`KINDS` (what the output is, so what ``--force`` may replace)."""
    path = Path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{what} {path} already exists; pass --force (overwrite=True) to replace it")
        problem = replace_problem(path, kind)
        if problem:
            raise FileExistsError(f"refusing to replace {what} {path} with --force: {problem}; "
                                  "remove it yourself or choose another path")
    ancestor = path.absolute().parent
    while not ancestor.exists():  # the nearest existing ancestor decides whether the folders can be made
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {what} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise PermissionError(f"cannot write {what} {path}: directory {ancestor} is not writable")


# ----- publishing -----------------------------------------------------------------------------------------------------
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the kernel, libc or filesystem does not offer it."""
    libc = _libc()
    if libc is None:
        return False
    if libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


_LIBC: list[object] = []


def _libc():
    if not _LIBC:
        lib = None
        with contextlib.suppress(OSError):
            cdll = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            if hasattr(cdll, "renameat2"):
                lib = cdll
        _LIBC.append(lib)
    return _LIBC[0]


def publish_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, failing with FileExistsError if ``path`` exists at that instant.

    Files: ``os.link(tmp, path)`` (fails if ``path`` exists) then unlink ``tmp``. Folders, and files on filesystems
    without hard links: ``renameat2(RENAME_NOREPLACE)``. Where neither exists (not Linux, old kernels, some network
    filesystems) the fallback is a check then ``os.rename``: ``rename`` of a folder fails onto a file or a non-empty
    folder, so the only thing a racing writer can lose there is an empty folder; a file can be overwritten in that
    short window.
    """
    if not tmp.is_dir():
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV):
                raise
        else:
            tmp.unlink()
            return
    if _renameat2(tmp, path, RENAME_NOREPLACE):
        return
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    os.rename(tmp, path)


def publish(tmp: Path, path: Path, *, overwrite: bool, kind: str) -> None:
    """Put ``tmp`` at ``path``: never over an existing entry without ``overwrite``; with it, only over a ``kind``
    output of ours (:func:`replace_problem`), atomically (``os.replace`` for files, ``RENAME_EXCHANGE`` for folders,
    else a rename-aside), removing only the old output's own entries."""
    try:
        publish_new(tmp, path)
        return
    except FileExistsError:
        if not overwrite:
            raise FileExistsError(f"{path} appeared while writing and was left alone; pass --force to replace it, "
                                  "or choose another path") from None
    problem = replace_problem(path, kind)
    if problem:
        raise FileExistsError(f"refusing to replace {path} with --force: {problem}; "
                              "remove it yourself or choose another path")
    if not tmp.is_dir():
        os.replace(tmp, path)
        return
    if _renameat2(tmp, path, RENAME_EXCHANGE):
        remove_output(tmp, kind, label=path)  # tmp now holds the old output
        return
    aside = path.with_name(f"{_temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, aside)
    try:
        publish_new(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    remove_output(aside, kind, label=path)


def remove_output(folder: Path, kind: str, *, label: Path | None = None) -> bool:
    """Delete a ``kind`` output folder's own entries (and then the folder when empty); True when it is gone.

    Something that is not ours (written into it since the check) is kept: the folder is renamed to
    ``<name>.cvvae-replaced-<hex>`` next to it and a warning says where.
    """
    owned, _ = _owned_entries(folder, kind)
    for rel in sorted(owned or (), key=lambda r: r.count("/"), reverse=True):
        p = folder / rel
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()  # only once empty: a foreign file below keeps it
            else:
                p.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
        return True
    label = label or folder
    kept = label.with_name(f"{label.name}.cvvae-replaced-{secrets.token_hex(4)}")
    with contextlib.suppress(OSError):
        os.rename(folder, kept)
        log.warning("%s held files cvvae did not write; they were kept in %s", label, kept)
    return False


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False, directory: bool = False,
                kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success publish it at ``path``, on error delete it.

    With ``directory=True`` the temporary path is a fresh folder (for multi-file outputs) and ``kind`` says what it
    is (default "report"); a marker listing its entries is added on publish so a later ``--force`` knows them.
    """
    path = Path(path)
    kind = kind or ("report" if directory else "file")
    check_writable_target(path, overwrite=overwrite, kind=kind)
    tmp, fd = make_temp(path, directory=directory)
    try:
        yield tmp
        if directory and kind != "png":
            write_marker(tmp, kind)
        publish(tmp, path, overwrite=overwrite, kind=kind)
    except BaseException:
        remove_tree(tmp)
        raise
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """``$CVVAE_CACHE``, else ``~/.cache/cvvae``: where exports and verified hashes are cached."""
    return Path(os.environ.get("CVVAE_CACHE", Path.home() / ".cache" / "cvvae"))


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
