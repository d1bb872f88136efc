"""Run a command on a pseudo-terminal, as a person at a shell would.

The command gets the terminal as its controlling terminal (``setsid
--ctty``), so ``getpass`` opens /dev/tty, turns echo off and reads what is
typed there.  Each reply is typed only once the next prompt (a line ending in
": ") has appeared: getpass flushes input typed before it asked.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def on_terminal(
    setsid: str,
    argv: Sequence[str],
    replies: Sequence[bytes],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, str]:
    """(exit status, everything the terminal showed)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [setsid, "--ctty", "--wait", *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=dict(env) if env is not None else None,
        )
    finally:
        os.close(slave)
    shown = b""
    pending = list(replies)
    prompts_answered = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every holder of the terminal closed it
                    break
                if not chunk:
                    break
                shown += chunk
            prompts = shown.count(b": ")
            if pending and prompts > prompts_answered and shown.rstrip(b" ").endswith(b":"):
                os.write(master, pending.pop(0))
                prompts_answered = prompts
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, shown.decode("utf-8", "replace")
