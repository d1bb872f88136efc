"""Extra processes for the smtp listener (``[limits] smtp_processes``).

One Python process runs one event loop on one core; large messages and many
parallel senders need more.  The server starts ``N - 1`` more processes that
inherit its smtp listening sockets and accept from the same queue.  Left to
the kernel, whichever process wakes first takes a burst of new connections
(20 sessions arriving at once were seen split 0/20, and the idle core then
stays idle); SO_REUSEPORT's hash would split them at random (four sessions:
3/1 or worse most of the time).  So the processes publish how many
connections each holds (``AcceptShares``, one slot per process in a small
shared file) and a process accepts only while it holds no more than the
least loaded of the others (give or take a slack, see ``my_turn``);
otherwise it steps back for ``DEFER_SECONDS`` (net/listener.py) and looks
again, and after ``MAX_DEFER_SECONDS`` it accepts anyway (a stuck peer must
not stall new clients).  Each extra process
(``run_worker``) serves only that listener, with its own thread pools and its
own delivery journal (``data_dir/journal-w<i>``); what it queues for remote
recipients (alias forwards) it hands to the delivering server
(``QueueHandoff``).  POP3, submission, the outbound queue and everything else
stay in the first process.

The extra processes die with the server: the kernel kills each when its
parent goes (PR_SET_PDEATHSIG), so a ``kill -9`` of the server leaves none
behind, and the restarted server restores their journals before it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from postoffice.config.settings import Settings

log = logging.getLogger("postoffice.workers")

PR_SET_PDEATHSIG = 1
_WORKER_MAIN = (
    "import sys; from postoffice.workers import run_worker; sys.exit(run_worker(sys.argv[1:]))"
)
MAX_PROCESSES = 64
RESTARTS_PER_MINUTE = 5


def process_count(settings: Settings) -> int:
    """How many processes accept on the smtp listener (1: just the server)."""
    wanted = settings.limits.smtp_processes or (os.cpu_count() or 1)
    return max(1, min(wanted, MAX_PROCESSES)) if settings.listen.smtp else 1


def journal_dir(data_dir: Path, index: int) -> Path:
    """The delivery journal of process ``index`` (0: the server itself)."""
    return data_dir / ("journal" if index == 0 else f"journal-w{index}")


def extra_journal_dirs(data_dir: Path) -> list[Path]:
    """Journals of extra processes, past and present (recovered at start)."""
    return sorted(p for p in data_dir.glob("journal-w*") if p.is_dir())


SHARES_FILE = "smtp-shares"  # in data_dir: the connection count of each smtp process
NOT_ACCEPTING = -1  # a slot's value while its process is not (or no longer) accepting
_SLOT = struct.Struct("=q")


class AcceptShares:
    """The smtp processes' connection counts, one 8-byte slot each in a file
    every process maps.  Counts are advisory: a stale or torn read only
    makes one accept a little early or late, never refuses a client."""

    def __init__(self, path: Path, index: int) -> None:
        self.index = index
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.count = os.fstat(fd).st_size // _SLOT.size
            if not 0 <= index < self.count:
                raise ValueError(f"{path}: no slot {index} among {self.count}")
            self._map = mmap.mmap(fd, _SLOT.size * self.count)
        finally:
            os.close(fd)
        self._mine = 0
        self._accepting = False

    @classmethod
    def create(cls, data_dir: Path, count: int) -> AcceptShares:
        """The server's (index 0) view, every other slot "not accepting" yet."""
        path = data_dir / SHARES_FILE
        # A new file put in place, never one truncated under a running
        # server's map (a second ``serve`` started by mistake would kill it).
        fresh = data_dir / f".{SHARES_FILE}.{os.getpid()}"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _SLOT.pack(NOT_ACCEPTING) * count)
        finally:
            os.close(fd)
        os.replace(fresh, path)
        return cls(path, 0)

    @classmethod
    def open(cls, data_dir: Path, index: int) -> AcceptShares:
        """An extra smtp process's view (the server created the file)."""
        return cls(data_dir / SHARES_FILE, index)

    def _set(self, index: int, value: int) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, value)

    def opened(self) -> None:
        self._mine += 1
        if self._accepting:
            self._set(self.index, self._mine)

    def closed(self) -> None:
        self._mine = max(0, self._mine - 1)
        if self._accepting:  # a stopping process stays out of the sharing
            self._set(self.index, self._mine)

    def accepting(self, yes: bool) -> None:
        """Join (with the connections held now) or leave the sharing."""
        self._accepting = yes
        self._set(self.index, self._mine if yes else NOT_ACCEPTING)

    def mark_gone(self, index: int) -> None:
        """Process ``index`` died: the others stop waiting for it to accept."""
        self._set(index, NOT_ACCEPTING)

    def my_turn(self) -> bool:
        """No other accepting process holds fewer connections than this one,
        give or take a slack that grows with the load (one in 16, at least
        one): 20 sessions split at worst 11/9, and a burst of thousands is
        accepted in runs instead of strictly in turn, one wake-up each."""
        counts: list[int] = [
            _SLOT.unpack_from(self._map, i * _SLOT.size)[0]
            for i in range(self.count)
            if i != self.index
        ]
        others = [c for c in counts if c != NOT_ACCEPTING]
        if not others:
            return True
        least = min(others)
        return self._mine <= least + 1 + least // 16

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()


def share_accepts() -> None:
    """Accept one connection per wake-up (libuv reads this before its first
    accept), so processes sharing a listening socket take turns."""
    os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")


HELD_SIGNALS = frozenset({signal.SIGHUP, signal.SIGUSR1})


def die_with_parent(parent: int) -> None:
    """Be killed when ``parent`` exits, however it exits (Linux; elsewhere the
    worker notices its parent is gone at the next check)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it went before the signal was armed
        os._exit(1)


class WorkerPool:
    """The extra smtp processes of one server: start, watch, stop (by PID)."""

    def __init__(
        self, settings: Settings, fds: list[int], count: int, shares: AcceptShares | None = None
    ) -> None:
        self._settings = settings
        self.shares = shares
        self._fds = fds
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._count = count
        self._restarts: list[float] = []
        self._stopping = False

    def start(self) -> None:
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        args = [
            sys.executable,
            "-c",
            _WORKER_MAIN,
            self._settings.source,
            str(index),
            json.dumps(self._fds),
            str(os.getpid()),
        ]
        # Started with SIGHUP and SIGUSR1 blocked (the mask survives exec): one
        # sent to the whole group while the process is still importing must
        # not kill it; it unblocks them once it handles them (app._hold_signals).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            self._procs[index] = subprocess.Popen(args, close_fds=True, pass_fds=self._fds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.poll() is None]

    async def watch(self) -> None:
        """Restart a process that died on its own (its journal is restored by
        its successor); give up on one that keeps dying."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            for index, proc in list(self._procs.items()):
                if self._stopping or proc.poll() is None:
                    continue
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 60]
                if len(self._restarts) >= RESTARTS_PER_MINUTE:
                    if self.shares is not None:
                        self.shares.mark_gone(index)
                    log.error("smtp process %d exited (%s); not restarted", index, proc.returncode)
                    del self._procs[index]
                    continue
                if self.shares is not None:
                    self.shares.mark_gone(index)
                log.error("smtp process %d exited (%s); restarting", index, proc.returncode)
                self._restarts.append(now)
                self._spawn(index)

    def terminate(self) -> None:
        """SIGTERM each: they stop accepting and finish their sessions, as the
        server does (it calls this when it stops accepting itself)."""
        self._stopping = True
        for proc in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    async def wait(self, grace: float) -> None:
        """Wait for them; SIGKILL what is left after ``grace`` + 5 seconds."""
        deadline = time.monotonic() + grace + 5
        while any(p.poll() is None for p in self._procs.values()):
            if time.monotonic() > deadline:
                for proc in self._procs.values():
                    if proc.poll() is None:
                        proc.kill()
                break
            await asyncio.sleep(0.05)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def run_worker(argv: list[str]) -> int:
    """Entry point of an extra smtp process: ``SOURCE INDEX FDS PARENT``."""
    source, index_text, fds_json, parent_text = argv
    die_with_parent(int(parent_text))
    share_accepts()
    from postoffice import app
    from postoffice.config.settings import load_settings

    settings = load_settings(None if source.startswith("<") else Path(source))
    fds = [int(fd) for fd in json.loads(fds_json)]
    return app.serve_smtp_worker(settings, int(index_text), fds)
