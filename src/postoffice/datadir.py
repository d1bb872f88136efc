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
* ``Owner``: whoever owns the data directory.  The CLI run as root on a data
  directory that belongs to another user (the one the server runs as) becomes
  that user, uid, gid and groups, for the whole command, before it touches
  anything in it (``Owner.become``).  Everything it makes is then that user's,
  and a symlink the owner planted (``queue -> /etc``) leads root nowhere the
  owner could not go itself.  (Handing root's files over afterwards with chown
  cannot be made safe: every path below a directory the owner controls can be
  swapped for a symlink between the check and the chown.)
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
import stat
import struct
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
        # O_NOFOLLOW: serve may run as root on a directory its service user
        # owns; a postoffice.pid symlinked elsewhere must not be truncated.
        # O_NONBLOCK: nor may a FIFO in its place hang the start.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(data_dir / LOCK_NAME, flags, 0o644)
        found = os.fstat(fd)
        # A FIFO planted there, or a hard link to another file (where the
        # kernel's protected_hardlinks is off): neither is ours to truncate.
        if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
            os.close(fd)
            raise OSError(
                errno.EINVAL, "not a regular file of its own (a link?)", str(data_dir / LOCK_NAME)
            )
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _holder_of(fd) if exc.errno in (errno.EACCES, errno.EAGAIN) else None
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise DataDirBusy(data_dir, pid) from None
            raise
        # Made by root in a directory its service user owns: the user's, so
        # the user can run serve there too (a systemd unit with User=).
        home = os.stat(data_dir)
        if os.geteuid() == 0 and (found.st_uid, found.st_gid) != (home.st_uid, home.st_gid):
            os.fchown(fd, home.st_uid, home.st_gid)
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
        # Non-blocking: a FIFO put in its place must not hang the command.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(data_dir / LOCK_NAME, flags)
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

    @classmethod
    def to_become(cls, data_dir: Path) -> Owner | None:
        """The user a command run as root should become: the data directory's
        owner when that is not root; None when we are not root or the directory
        is root's or missing (``init`` makes it as root)."""
        if os.geteuid() != 0:
            return None
        try:
            owner = cls.of(data_dir)
        except OSError:
            return None
        return owner if owner.uid != 0 else None

    def become(self) -> None:
        """Drop root for good: the owner's groups, gid and uid (real, effective
        and saved, so nothing can take root back).  The group is the data
        directory's; the supplementary groups are the owner's own, as a login
        would have them."""
        try:
            groups = os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid)
        except KeyError:  # a uid with no passwd entry
            groups = [self.gid]
        os.setgroups(groups)
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)


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

    def config_option(self) -> str | None:
        """The config it was started with (``-c``/``--config``), in full; None without."""
        args = self.command.split(" ")
        for i, arg in enumerate(args):
            value = None
            if arg in ("-c", "--config") and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith("--config="):
                value = arg.removeprefix("--config=")
            elif arg.startswith("-c") and len(arg) > 2 and not arg.startswith("--"):
                value = arg[2:]
            if value:
                return str(self.cwd / value) if self.cwd else value
        return None

    def how_to_reach(self) -> str:
        """How to point a command at this server's data, in words."""
        config = self.config_option()
        if config:
            return f"give it its config: postoffice -c {config} ..."
        where = f"{self.cwd}" if self.cwd else "the directory it was started in"
        # No config file to name (the built-in defaults, say): -c cannot help.
        return (
            f"it was started without -c: run the command in {where}, as it was (from there"
            " it finds the same config, or the same built-in defaults and ./postoffice-data)"
        )


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
