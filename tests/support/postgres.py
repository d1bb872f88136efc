"""Debian's PostgreSQL, started by the tests themselves, for the [cluster] tests.

``initdb`` makes a cluster in a temporary directory and ``postgres`` runs it
as a child of the test process (its PID is ours to stop), listening only on
127.0.0.1 at a free port, with no Unix socket.  Authentication is ``trust``
on loopback: the tests check postoffice, not PostgreSQL's password handling.

initdb and postgres refuse to run as root (CI runs as root), so as root both
run as the ``postgres`` system user that Debian's package creates (``nobody``
where it does not exist), through ``setpriv`` which execs them: the PID we
hold is the server's.  The cluster directory is then made for that user
outside pytest's root-only tmp directory.

``fsync = off`` and a small ``shared_buffers``: the machine is shared with
other test runs, and no test here pulls the power (a durability test would
start its own cluster with fsync on).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.ports import free_port

SUPERUSER = "postoffice"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _service_user() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL when we are root; None: ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no postgres or nobody user")


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:``port``, a child of this process."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="postoffice-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = _service_user()
        self._databases = 0

    def _prefix(self) -> list[str]:
        if self._user is None:
            return []
        return [
            "setpriv",
            f"--reuid={self._user.pw_uid}",
            f"--regid={self._user.pw_gid}",
            "--init-groups",
            "--",
        ]

    def start(self) -> None:
        if self._user is not None:
            # initdb, run as that user, makes the data directory in here.
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        subprocess.run(
            [
                *self._prefix(),
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            env=_ENV,
            timeout=120,
            cwd=self.root,
        )
        self._run()

    def _run(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self._prefix(),
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"port={self.port}",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "shared_buffers=16MB",
                    "-c",
                    "max_connections=100",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_ENV,
                cwd=self.root,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log()}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres never accepted a connection:\n{self.log()}")

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def create_database(self) -> str:
        """A new empty database; its name."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending the sessions a stopped node may have left."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def halt(self) -> None:
        """Fast shutdown (SIGINT: sessions ended, a clean checkpoint) of the
        PID we started; the cluster stays on disk for ``resume``."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def resume(self) -> None:
        """Start the halted cluster again, on the same port."""
        self._run()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)
