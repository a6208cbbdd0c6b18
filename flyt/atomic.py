"""Atomic file writes: a crash never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from flyt.errors import FlytError, StorageError


# a write that fails for want of room or rights, not because of what is written
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A full disk or a read-only folder becomes one ``StorageError`` naming ``path``; the previous file
    at ``path``, if any, is untouched and the temporary file is removed."""
    path = Path(path)
    tmp_path = _temporary(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 would hide outputs from the user's group
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except FlytError:  # already says what went wrong (a nested write's StorageError names its own file)
        raise
    except Exception as exc:  # an OSError, or a library's error raised while handling one (torch.save's)
        raise storage_error(exc, path) or exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``atomic_path`` with its temporary open for writing, for a library that writes into a file object
    (pyarrow, numpy, torch). The file is this one's to close, so a write that fails (a full disk) cannot
    leave it open in a writer kept alive by the error; and torch's and numpy's own writers say only
    "iostream error" or "N requested and M written", while through a Python file the OSError is raised,
    which ``atomic_path`` names."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle


def check_writable(path: str | os.PathLike) -> None:
    """Raise now the ``StorageError`` that writing ``path`` later would (a read-only or forbidden folder),
    so that a command fails before its work rather than after it; nothing is left behind."""
    _temporary(Path(path)).unlink()


def _temporary(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (its folder made if need be)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(exc, path) or exc
    os.close(fd)
    return Path(tmp)


def sweep_temporaries(paths: Iterable[Path]) -> None:
    """Remove what ``atomic_path`` left beside these outputs when a write was killed."""
    for path in map(Path, paths):
        if path.parent.is_dir():
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)


def sweep_folder(*folders: Path) -> None:
    """Remove every ``atomic_path`` temporary in these folders (for folders only one writer writes to)."""
    for folder in folders:
        for stale in Path(folder).glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def append_whole(path: Path, text: str) -> None:
    """Append ``text`` to a log whole or not at all: a full disk truncates the file back to its previous
    end (a half line would break the next reader) and raises a ``StorageError`` naming it."""
    try:
        with open(path, "ab", buffering=0) as f:
            end, data = f.tell(), memoryview(text.encode())
            try:
                while data:  # an unbuffered write may take part of it; the next one reports why
                    data = data[f.write(data):]
            except OSError:
                f.truncate(end)
                raise
    except OSError as exc:
        raise storage_error(exc, path) or exc


def storage_error(exc: BaseException, path=None) -> StorageError | None:
    """A ``StorageError`` naming the path for an OSError of room or rights (``exc`` itself, or the error
    it was raised while handling), else None."""
    while not isinstance(exc, OSError):
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if exc is None:
            return None
    if exc.errno is None and path is not None and _nearly_full(Path(path).parent):
        reason = os.strerror(errno.ENOSPC)  # numpy's tofile says only "N requested and M written"
    elif exc.errno in STORAGE_ERRNOS:
        reason = os.strerror(exc.errno)  # not pyarrow's "Error writing bytes to file. Detail: [errno 28] ..."
    else:
        return None
    where = path if path is not None else exc.filename
    kept = " (the previous file there is intact)" if path is not None and Path(path).exists() else ""
    return StorageError(f"cannot write {where or 'an output'}: {reason}{kept}; "
                        "free space or fix the folder's permissions, then rerun: finished outputs are kept")


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False
