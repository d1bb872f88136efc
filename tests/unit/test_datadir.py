"""datadir: the serve lock, who holds it, the servers /proc shows, handing files over."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.datadir import (
    LOCK_NAME,
    DataDirBusy,
    Owner,
    ServeLock,
    running_servers,
    serving_pid,
)

HOLD = (
    "import sys, time; from pathlib import Path; from postoffice.datadir import ServeLock;"
    " lock = ServeLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process (its command line names postoffice) serving tmp_path/data."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "data")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_second_lock_names_the_holder(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    data = tmp_path / "data"
    assert (data / LOCK_NAME).read_text() == f"{holder.pid}\n"
    assert serving_pid(data) == holder.pid
    with pytest.raises(DataDirBusy, match=rf"in use by another server \(pid {holder.pid}\)"):
        ServeLock.acquire(data)
    holder.kill()
    holder.wait()
    assert serving_pid(data) is None  # the kernel dropped it with the process
    lock = ServeLock.acquire(data)
    try:
        assert serving_pid(data) is None  # our own lock never conflicts with us
    finally:
        lock.release()
    assert (data / LOCK_NAME).read_text() == ""


def test_serving_pid_of_a_directory_never_served(tmp_path: Path) -> None:
    assert serving_pid(tmp_path) is None
    assert serving_pid(tmp_path / "missing") is None


def test_running_servers_finds_the_lock_holder(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    found = [s for s in running_servers() if s.pid == holder.pid]
    assert len(found) == 1
    server = found[0]
    assert server.data_dir == tmp_path / "data"
    assert "postoffice.datadir" in server.command
    assert server.cwd == Path.cwd()
    assert f"pid {holder.pid} serves data directory {tmp_path / 'data'}" in server.describe()


def test_other_locks_are_not_servers(tmp_path: Path) -> None:
    # A postoffice process holding a POSIX lock on some other file (SQLite does).
    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
        " fcntl.lockf(fd, fcntl.LOCK_EX); print('postoffice', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "accounts.sqlite3")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "postoffice\n"
        assert proc.pid not in [s.pid for s in running_servers()]
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_sweep_hands_over_only_roots_own_entries(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    data = tmp_path / "data"
    for path in (data / "mail" / "example.test", data / "queue", data / "dkim" / "example.test"):
        path.mkdir(parents=True)
    (data / "accounts.sqlite3").write_text("")
    (data / "dkim" / "example.test" / "k.pem").write_text("")
    (data / "tls").mkdir()
    os.chown(data / "tls", 1, 1)  # given to someone else on purpose: stays theirs
    deep = data / "mail" / "example.test" / "alice"
    deep.mkdir()  # below mail/<domain>: user add hands its Maildir over itself
    os.chown(data, 65534, 65534)
    owner = Owner.of(data)
    assert owner.needs_handing_over and owner.name == "nobody"
    owner.sweep(data)
    uid = {p.relative_to(data).as_posix(): p.lstat().st_uid for p in data.rglob("*")}
    assert uid == {
        "accounts.sqlite3": 65534,
        "dkim": 65534,
        "dkim/example.test": 65534,
        "dkim/example.test/k.pem": 65534,
        "mail": 65534,
        "mail/example.test": 65534,
        "mail/example.test/alice": 0,
        "queue": 65534,
        "tls": 1,
    }
