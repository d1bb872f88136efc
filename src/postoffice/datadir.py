"""The data directory: one server at a time, files its owner can use, and
where the other servers on this machine keep theirs.

* ``ServeLock``: ``serve`` holds an exclusive lock on ``data_dir/postoffice.pid``
  (which holds its PID) for as long as it runs, as Postfix does with
  master.pid, so a second ``serve`` on the same directory is refused and told
  which process holds it.  A POSIX record lock (fcntl), not flock: F_GETLK
  names the holder's PID without taking the lock, /proc/locks lists it, and
  the kernel drops it when the process dies, however it dies.  The file is
  left in place when the server stops (emptied): unlinking a lock file races
  with a server that has just opened it.
* ``Owner``: whoever owns the data directory.  The CLI run as root hands the
  files it makes (accounts database, Maildirs, DKIM keys, queue requests) to
  that user, so a server running as that user can use them.  (Dropping to
  that user instead would also need the Python installation to be readable
  by it, and changes nothing a chown does not.)
* ``running_servers``: the servers on this machine (processes holding the lock
  of a ``postoffice.pid``, from /proc/locks) and, where /proc lets us see it,
  the data directory each one serves: a command pointed at the wrong
  directory says where the server is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "postoffice.pid"
# struct flock on Linux (x86-64, arm64): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi4x"


class DataDirBusy(Exception):
    """Another process serves this data directory."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "a process in another namespace"
        super().__init__(
            f"data directory {data_dir} is in use by another server ({who}); stop it first,"
            " or give this server its own data_dir"
        )
        self.pid = pid


class ServeLock:
    """The running server's claim on its data directory (see the module doc)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> ServeLock:
        """Create the data dir if needed and lock it; raise DataDirBusy or OSError."""
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _holder_of(fd) if exc.errno in (errno.EACCES, errno.EAGAIN) else None
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise DataDirBusy(data_dir, pid) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no stale PID for the next reader
            os.close(self._fd)  # drops the lock
            self._fd = -1


def _holder_of(fd: int) -> int | None:
    """The PID holding a conflicting lock on ``fd``'s file; None if unlocked."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _whence, _start, _len, pid = struct.unpack(
        _FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query)
    )
    if l_type == fcntl.F_UNLCK:
        return None
    if pid > 0:
        return int(pid)
    # Held from another PID namespace: the PID it wrote is the best we know.
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).split()[0]) or None
    return None


def serving_pid(data_dir: Path) -> int | None:
    """The PID of the server running on ``data_dir``, or None.  Never takes the lock."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _holder_of(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


# --- who owns it ----------------------------------------------------------------------
def user_name(uid: int) -> str:
    """The login name of ``uid``, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True, slots=True)
class Owner:
    uid: int
    gid: int

    @classmethod
    def of(cls, path: Path) -> Owner:
        st = os.stat(path)
        return cls(st.st_uid, st.st_gid)

    @property
    def name(self) -> str:
        return user_name(self.uid)

    @property
    def group(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)

    @property
    def needs_handing_over(self) -> bool:
        """We are root and the directory is someone else's: what we create is ours."""
        return os.geteuid() == 0 and self.uid != 0

    def hand_over(self, paths: Iterable[Path]) -> None:
        """Give ``paths`` (those that exist) to the owner, when run as root."""
        if not self.needs_handing_over:
            return
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def sweep(self, data_dir: Path) -> None:
        """After a command run as root: hand over what it made where commands
        make things (the data dir's top level, mail/<domain>, queue/, the DKIM
        keys).  Only root's own entries: files deliberately given to someone
        else stay theirs.  A new Maildir is handed over by ``user add`` itself."""
        if not self.needs_handing_over:
            return
        paths: list[Path] = []
        for directory in (data_dir, data_dir / "mail", data_dir / "queue"):
            with contextlib.suppress(OSError):
                paths += [directory / name for name in os.listdir(directory)]
        for top, dirs, files in os.walk(data_dir / "dkim"):
            paths += [Path(top, name) for name in (*dirs, *files)]
        mine = os.geteuid()
        for path in paths:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == mine:
                    os.chown(path, self.uid, self.gid, follow_symlinks=False)


# --- the servers on this machine ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunningServer:
    pid: int
    data_dir: Path | None  # None: /proc does not show us (another user's process)
    command: str  # its command line
    cwd: Path | None

    def describe(self) -> str:
        where = f"data directory {self.data_dir}" if self.data_dir else "a data directory"
        started = f"`{self.command}`" + (f" in {self.cwd}" if self.cwd else "")
        hidden = "" if self.data_dir else " (run this as root or as its user to see which)"
        return f"pid {self.pid} serves {where}{hidden}, started as {started}"


def running_servers(proc: Path = Path("/proc")) -> list[RunningServer]:
    """Every ``postoffice serve`` holding its data directory's lock, as far as
    /proc shows them ([] where there is no /proc)."""
    try:
        table = (proc / "locks").read_text()
    except OSError:
        return []
    inodes: dict[int, set[int]] = {}
    for line in table.splitlines():
        # "1: POSIX  ADVISORY  WRITE 1234 fe:00:2146353 0 EOF"; waiters show "->".
        parts = line.split()
        if len(parts) < 8 or parts[1] != "POSIX" or parts[3] != "WRITE":
            continue
        with contextlib.suppress(ValueError, IndexError):
            inodes.setdefault(int(parts[4]), set()).add(int(parts[5].rsplit(":", 1)[1]))
    found = []
    for pid, locked in sorted(inodes.items()):
        if pid == os.getpid():
            continue
        try:
            args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        command = " ".join(a.decode("utf-8", "replace") for a in args if a)
        if "postoffice" not in command:
            continue
        data_dir = _locked_data_dir(proc / str(pid), locked)
        if data_dir is None and not _fds_hidden(proc / str(pid)):
            continue  # it holds locks, but not on a postoffice.pid: not a server
        cwd = None
        with contextlib.suppress(OSError):
            cwd = Path(os.readlink(proc / str(pid) / "cwd"))
        found.append(RunningServer(pid, data_dir, command, cwd))
    return found


def _fds_hidden(process: Path) -> bool:
    try:
        os.listdir(process / "fd")
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def _locked_data_dir(process: Path, locked: set[int]) -> Path | None:
    try:
        fds = os.listdir(process / "fd")
    except OSError:
        return None
    for fd in fds:
        link = process / "fd" / fd
        try:
            target = os.readlink(link)
            if not target.endswith("/" + LOCK_NAME) or os.stat(link).st_ino not in locked:
                continue
        except OSError:
            continue
        return Path(target).parent
    return None


def same_directory(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
