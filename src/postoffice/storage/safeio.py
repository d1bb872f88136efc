"""Small durable-file helpers shared by every store (Maildir, queue, caches, keys).

"Durable" here means what a crash or power cut cannot undo: file data is
fsync'd before the rename that publishes it, and the directory is fsync'd
after, so the new name survives too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable
from pathlib import Path


def _syncfs_function() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's syncfs(2), where it also reports writeback errors (Linux 5.8+:
    errors since the descriptor was opened); None elsewhere."""
    if platform.system() != "Linux":
        return None
    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (ValueError, OSError, AttributeError):
        return None
    if (major, minor) < (5, 8):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_SYNCFS = _syncfs_function()
SYNCFS_RELIABLE = _SYNCFS is not None


def syncfs(fd: int) -> None:
    """Flush every dirty file, directory and the journal of the file system
    ``fd`` is on (one call instead of an fsync per file); raise OSError on a
    writeback error since ``fd`` was opened.  Only where SYNCFS_RELIABLE."""
    if _SYNCFS is None:
        raise OSError("syncfs is not available here")
    if _SYNCFS(fd) != 0:  # ctypes releases the GIL for the call
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# link(2) errors that mean "no hard link here", not "something is wrong".
_NO_HARD_LINK = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP})


def link_or_copy(source: Path, target: Path, copy: Callable[[Path], None]) -> None:
    """Hard-link ``source`` as ``target`` (one message file for several
    mailboxes); where the file system cannot -- another device, too many
    links, no hard links -- call ``copy(target)`` to write it out instead."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINK:
            raise
        copy(target)


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (renames, links, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (it may write less)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def writev_all(fd: int, parts: list[bytes]) -> None:
    """Write ``parts`` in order, every byte, without joining them first."""
    if len(parts) > 512:  # IOV_MAX is 1024 on Linux: stay well under it
        write_all(fd, b"".join(parts))
        return
    written = os.writev(fd, parts)
    total = sum(map(len, parts))
    if written < total:  # a short write (rare): the rest in order
        write_all(fd, b"".join(parts)[written:])


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, never
    a mix, and after return the new one survives a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
