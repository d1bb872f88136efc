"""Worker processes for CPU work on attacker input, each job with a deadline.

Why processes: CPython runs one thread of Python at a time, and a single C
call such as ``pow()`` on big integers or ``re.sub`` holds the GIL until it
returns, so a thread pool does not keep the event loop free.  Issue 11,
item 4: DKIM verification in the shared thread pool froze every session of
the server for 6.8 s per signature of a 16384-bit hostile key.  Here the
work runs in ``workers`` child processes (``python -c``, not fork: the
server has threads), at most one job each, and a job that runs past
``timeout`` seconds has its process killed (by PID, our own child) and
replaced, so work nobody foresaw is bounded too.

The event loop never waits on a pipe: each job is carried by one thread of
a private pool of ``workers`` threads (they sleep in ``poll``), so jobs
beyond ``workers`` queue there and hold nothing.  The pool is not bound to
an event loop.

The child runs ``target`` (``"package.module:function"``, a function
``(header: bytes, payload: bytes) -> bytes``) for each job.  Frames: to the
child ``>II`` (header and payload lengths) + header + payload; back
``>BI`` (0 ok, 1 the function raised) + that many octets, at most
``MAX_REPLY``.  The child dies with the server (PR_SET_PDEATHSIG) and
exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from postoffice.childproc import die_with_parent

log = logging.getLogger("postoffice.cpu_workers")

MAX_REPLY = 1 << 20  # octets a child may answer with
_REQUEST = struct.Struct(">II")
_REPLY = struct.Struct(">BI")
_CHILD_MAIN = (
    "import sys; from postoffice.policy.cpu_workers import child_main; "
    "sys.exit(child_main(sys.argv[1:]))"
)


class CpuTimeout(Exception):
    """The job ran past its deadline; its process was killed."""


class CpuWorkerError(Exception):
    """The job could not be done: the process died, or the function raised."""


class _WorkerGone(CpuWorkerError):
    """The process died or broke the frame protocol: it is not reused."""


class _Worker:
    def __init__(self, target: str) -> None:
        self.proc = subprocess.Popen(
            # -P: the working directory is not put on sys.path (a dkim.py
            # there must not be imported into the worker).
            [sys.executable, "-P", "-c", _CHILD_MAIN, target, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin.fileno()
        self.stdout = self.proc.stdout.fileno()
        os.set_blocking(self.stdin, False)
        os.set_blocking(self.stdout, False)

    def run(self, header: bytes, payload: bytes, deadline: float) -> bytes:
        self._send(_REQUEST.pack(len(header), len(payload)), deadline)
        self._send(header, deadline)
        self._send(payload, deadline)
        status, length = _REPLY.unpack(self._receive(_REPLY.size, deadline))
        if length > MAX_REPLY:
            raise _WorkerGone(f"reply of {length} octets")
        body = self._receive(length, deadline)
        if status != 0:
            raise CpuWorkerError(body.decode("utf-8", "replace"))
        return body

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CpuTimeout
        poller = select.poll()
        poller.register(fd, event)
        if not poller.poll(remaining * 1000):
            raise CpuTimeout

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:  # each pass writes something or waits (bounded by the deadline)
            try:
                sent = os.write(self.stdin, view[: 1 << 20])
            except BlockingIOError:
                self._wait(self.stdin, select.POLLOUT, deadline)
                continue
            except OSError as exc:  # EPIPE: the child is gone
                raise _WorkerGone(f"worker process gone: {exc}") from None
            view = view[sent:]

    def _receive(self, size: int, deadline: float) -> bytes:
        parts = []
        while size > 0:  # each pass reads something, waits, or ends (deadline, EOF)
            try:
                chunk = os.read(self.stdout, min(size, 1 << 20))
            except BlockingIOError:
                self._wait(self.stdout, select.POLLIN, deadline)
                continue
            if not chunk:
                raise _WorkerGone(f"worker process gone (exit {self.proc.poll()})")
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def stop(self, grace: float) -> None:
        """Close its stdin (it exits), then kill it if it has not after ``grace``."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        self.kill()

    def signal_kill(self) -> None:
        """SIGKILL only: the thread using it sees its pipes close and cleans up."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def kill(self) -> None:
        """SIGKILL, reap, close the pipes (only by whoever holds it)."""
        self.signal_kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)  # SIGKILL cannot be caught: this is quick
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


class CpuWorkers:
    """``workers`` processes running ``target``; ``await run(...)`` one job."""

    def __init__(self, target: str, *, workers: int, timeout: float) -> None:
        self.target = target
        self.workers = max(1, workers)
        self.timeout = timeout
        self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="postoffice-cpu")
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    def start(self) -> None:
        """Start every process now (else each starts with its first job)."""
        with self._lock:
            missing = self.workers - len(self._idle) - len(self._busy)
            if not self._closed:
                self._idle += [_Worker(self.target) for _ in range(missing)]

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in [*self._idle, *self._busy] if w.proc.poll() is None]

    async def run(self, header: bytes, payload: bytes) -> bytes:
        """The function's answer.  CpuTimeout: it took over ``timeout`` seconds
        of its process (waiting for a free process does not count);
        CpuWorkerError: it failed."""
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self._threads, self._run_blocking, header, payload)
        except RuntimeError:  # the threads were shut down: close() was called
            raise CpuWorkerError("shut down") from None
        return await job

    def _run_blocking(self, header: bytes, payload: bytes) -> bytes:
        worker = self._take()
        deadline = time.monotonic() + self.timeout
        try:
            answer = worker.run(header, payload, deadline)
        except CpuTimeout:
            log.warning("cpu worker pid %d: job over %.1fs, killed", worker.proc.pid, self.timeout)
            self._drop(worker)
            raise
        except _WorkerGone:
            self._drop(worker)
            raise
        except CpuWorkerError:
            self._give_back(worker)  # the function raised; the process is fine
            raise
        except BaseException:
            self._drop(worker)  # a half-done exchange: the process's state is unknown
            raise
        self._give_back(worker)
        return answer

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise CpuWorkerError("shut down")
            # At most ``workers`` threads run jobs, so one is idle or missing.
            worker = self._idle.pop() if self._idle else None
        if worker is None or worker.proc.poll() is not None:
            if worker is not None:
                worker.kill()
            try:
                worker = _Worker(self.target)
            except OSError as exc:
                raise CpuWorkerError(f"cannot start a worker process: {exc}") from None
        with self._lock:
            self._busy.add(worker)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            if not self._closed:
                self._idle.append(worker)
                return
        worker.stop(1.0)

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
        worker.kill()

    def close(self, grace: float = 2.0) -> None:
        """Stop every process (idle ones get ``grace`` seconds to exit on their
        own; busy ones are killed) and the threads."""
        with self._lock:
            self._closed = True
            idle, busy = list(self._idle), list(self._busy)
            self._idle.clear()
        for worker in busy:
            worker.signal_kill()  # its thread sees the pipe close, reaps it and returns
        for worker in idle:
            worker.stop(grace)
        self._threads.shutdown(wait=True, cancel_futures=True)


# --- the child ----------------------------------------------------------------------------------
def _read_exact(stream: int, size: int) -> bytes | None:
    parts = []
    while size > 0:  # blocking reads: each returns something or EOF
        chunk = os.read(stream, min(size, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def child_main(argv: list[str]) -> int:
    """A worker process: ``TARGET PARENT_PID``; jobs on stdin, answers on stdout."""
    target, parent = argv
    die_with_parent(int(parent))
    # Ctrl-C, and a reload, log reopen or retire sent to the process group,
    # are the server's to handle.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    module, _, name = target.partition(":")
    function: Callable[[bytes, bytes], bytes] = getattr(importlib.import_module(module), name)
    # The answers get a descriptor of their own; fd 1 becomes stderr, so a
    # stray print() cannot corrupt a frame.
    answers = os.dup(1)
    os.dup2(2, 1)
    requests = sys.stdin.fileno()
    while True:  # one job per pass, until the server closes our stdin
        head = _read_exact(requests, _REQUEST.size)
        if head is None:
            return 0
        header_size, payload_size = _REQUEST.unpack(head)
        header = _read_exact(requests, header_size)
        payload = _read_exact(requests, payload_size)
        if header is None or payload is None:
            return 0
        try:
            status, body = 0, function(header, payload)
        except Exception as exc:
            status, body = 1, f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:4096]
        reply = _REPLY.pack(status, len(body)) + body
        view = memoryview(reply)
        while view:
            view = view[os.write(answers, view) :]
