"""What a storage failure means, in one place, for whoever must answer for it.

Why: SMTP (452 4.3.1 or 451 4.3.0), the queue's DSN statuses (4.3.1 or
4.3.0) and POP3 (``-ERR [SYS/PERM]`` or ``[SYS/TEMP]``, RFC 3206 §4) answer
a failed write or open in their own words, but they must agree on what
failed.  So the classification of an ``OSError`` lives here, once; each
protocol maps a ``StorageFault`` to its reply next to its other replies.
A quota of the file system (EDQUOT) is a full disk like ENOSPC: the writer
has no room, and making room (not retrying blindly) is what helps.
"""

from __future__ import annotations

import enum
import errno


class StorageFault(enum.Enum):
    NO_SPACE = "no space"  # the file system, or its quota for us, is full
    NEEDS_ADMIN = "needs admin"  # not ours to use (owner, mode, a file where a directory goes)
    OTHER = "other"  # an I/O error, no descriptors left, ...: may pass by itself


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NEEDS_ADMIN = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ELOOP}
)


def errno_fault(number: int | None) -> StorageFault:
    """The fault an ``OSError`` with ``errno`` ``number`` reports."""
    if number in _NO_SPACE:
        return StorageFault.NO_SPACE
    if number in _NEEDS_ADMIN:
        return StorageFault.NEEDS_ADMIN
    return StorageFault.OTHER


class DeliveryError(Exception):
    """A message could not be stored; its text is safe to log.  ``fault``
    decides the answer; ``paths``: the files or directories the failing
    call named (a Maildir uses them to know which mailbox is broken)."""

    def __init__(
        self,
        message: str,
        *,
        fault: StorageFault = StorageFault.OTHER,
        paths: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.fault = fault
        self.paths = paths


def fault_of(exc: BaseException) -> StorageFault | None:
    """What ``exc`` says about storage; None when it is no storage failure
    (a bug, which its handler logs with a traceback)."""
    if isinstance(exc, DeliveryError):
        return exc.fault
    if isinstance(exc, OSError):
        return errno_fault(exc.errno)
    return None
