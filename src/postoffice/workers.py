"""Extra processes for the smtp listener (``[limits] smtp_processes``): the pool.

One Python process runs one event loop on one core; large messages and many
parallel senders need more (the default, ``0``: one per CPU).  The server
starts ``N - 1`` more processes that
inherit its smtp listening sockets and accept from the same queue, taking
turns (net/accept.py).  Each extra process serves only that listener, with
its own thread pools and its own delivery journal
(``data_dir/journal-w<i>``); what it queues for remote recipients (alias
forwards) it hands to the delivering server (``QueueHandoff``).  POP3,
submission, the outbound queue and everything else stay in the first
process.

This module starts, watches and stops them; what runs in them is the
composition root's (``app.run_smtp_process``, named by the command the
server gives the pool).  They die with the server (``childproc``): a
``kill -9`` of the server leaves none behind, and the restarted server
restores their journals before it listens.  The connection caps hold for
all the processes together (net/caps.py); a process that died gives back
what it counted (``AcceptShares.mark_gone``) before its successor starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from postoffice import metrics
from postoffice.config.settings import Settings
from postoffice.net.accept import AcceptShares

log = logging.getLogger("postoffice.workers")

MAX_PROCESSES = 64
RESTARTS_PER_MINUTE = 5


def usable_cpus() -> int:
    """The CPUs this process may run on (a cpuset or systemd's CPUAffinity=
    leaves fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def process_count(settings: Settings) -> int:
    """How many processes accept on the smtp listener (1: just the server);
    ``smtp_processes = 0``, the default: one per usable CPU."""
    wanted = settings.limits.smtp_processes or usable_cpus()
    return max(1, min(wanted, MAX_PROCESSES)) if settings.listen.smtp else 1


def journal_dir(data_dir: Path, index: int) -> Path:
    """The delivery journal of process ``index`` (0: the server itself)."""
    return data_dir / ("journal" if index == 0 else f"journal-w{index}")


def extra_journal_dirs(data_dir: Path) -> list[Path]:
    """Journals of extra processes, past and present (recovered at start)."""
    return sorted(p for p in data_dir.glob("journal-w*") if p.is_dir())


HELD_SIGNALS = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})
# Sent to an smtp process a reload replaces: stop accepting, let the open
# sessions end on their own (no 421 as on SIGTERM), then exit.
RETIRE = signal.SIGUSR2


class WorkerPool:
    """The extra smtp processes of one server: start, watch, stop (by PID).

    Process ``i`` runs ``python -c MAIN SOURCE i FDS PARENT``: ``main`` is
    the Python code that serves (it is the composition root's), SOURCE the
    config file, FDS the inherited listening sockets, PARENT our PID."""

    def __init__(
        self,
        settings: Settings,
        main: str,
        fds: list[int],
        count: int,
        shares: AcceptShares | None = None,
    ) -> None:
        self._settings = settings
        self._main = main
        self.shares = shares
        self._fds = fds
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._count = count
        self._restarts: list[float] = []
        self._stopping = False
        # Processes replaced by a reload that moved the smtp listener, by
        # index: they finish their sessions (SIGTERM); each one's successor
        # starts when it is gone, as it takes over its journal.
        self._retiring: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        # -P: the working directory is not put on sys.path, so a stray dns.py
        # or dkim.py there cannot stand in for a library (as for cpu_workers).
        args = [
            sys.executable,
            "-P",
            "-c",
            self._main,
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

    def send_signal(self, sig: int) -> None:
        """Pass ``sig`` on to every live process (SIGUSR1: reopen the logs),
        retiring ones too (they still write the log while sessions end)."""
        for proc in [*self._procs.values(), *self._retiring.values()]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def replace(self, fds: list[int]) -> None:
        """The smtp listener moved (a reload): new processes on ``fds``; the
        old ones stop accepting and exit when their sessions have ended."""
        self._fds = fds
        for index, proc in self._procs.items():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(RETIRE)
            self._retiring[index] = proc  # watch() starts the successor once it is gone
        self._procs = {}

    async def watch(self) -> None:
        """Restart a process that died on its own (its journal is restored by
        its successor); give up on one that keeps dying."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            for index, proc in list(self._retiring.items()):
                if not self._stopping and proc.poll() is not None:
                    del self._retiring[index]
                    # It may have died holding connections (kill -9, a crash):
                    # what it counted goes back before its successor counts.
                    self._gone(index, proc)
                    if proc.returncode != 0:
                        log.error("retiring smtp process %d exited (%s)", index, proc.returncode)
                    self._spawn(index)
            for index, proc in list(self._procs.items()):
                if self._stopping or proc.poll() is None:
                    continue
                self._gone(index, proc)
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 60]
                if len(self._restarts) >= RESTARTS_PER_MINUTE:
                    log.error("smtp process %d exited (%s); not restarted", index, proc.returncode)
                    del self._procs[index]
                    continue
                log.error("smtp process %d exited (%s); restarting", index, proc.returncode)
                self._restarts.append(now)
                self._spawn(index)

    def _gone(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        """Process ``index`` exited: give back its caps counts and metrics."""
        metrics.process_gone(proc.pid)
        if self.shares is not None:
            self.shares.mark_gone(index)

    def terminate(self) -> None:
        """SIGTERM each: they stop accepting and finish their sessions, as the
        server does (it calls this when it stops accepting itself)."""
        self._stopping = True
        for proc in [*self._procs.values(), *self._retiring.values()]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    async def wait(self, grace: float) -> None:
        """Wait for them; SIGKILL what is left after ``grace`` + 5 seconds."""
        deadline = time.monotonic() + grace + 5
        every = [*self._procs.values(), *self._retiring.values()]
        while any(p.poll() is None for p in every):
            if time.monotonic() > deadline:
                for proc in every:
                    if proc.poll() is None:
                        proc.kill()
                break
            await asyncio.sleep(0.05)
        for proc in every:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
