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
    RunningServer,
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


BECOME = (
    "import os, sys; from pathlib import Path; from postoffice.datadir import Owner;"
    " owner = Owner.to_become(Path(sys.argv[1])); print(owner);"
    " owner is None or owner.become(); print(os.getresuid(), os.getresgid(), os.getgroups())"
)


def test_root_becomes_the_data_dirs_owner_for_good(tmp_path: Path, require_root: None) -> None:
    data = tmp_path / "data"
    data.mkdir()
    became = subprocess.run(
        [sys.executable, "-c", BECOME, str(data)], capture_output=True, text=True, timeout=30
    )
    assert became.stdout.splitlines()[0] == "None"  # root's own: nothing to become
    os.chown(data, 65534, 65533)
    became = subprocess.run(
        [sys.executable, "-c", BECOME, str(data)], capture_output=True, text=True, timeout=30
    )
    assert became.returncode == 0, became.stderr
    lines = became.stdout.splitlines()
    assert lines[0] == "Owner(uid=65534, gid=65533)"
    # Real, effective and saved ids: nothing can take root back.
    assert lines[1].startswith("(65534, 65534, 65534) (65533, 65533, 65533) [")
    assert "0" not in lines[1].split("[")[1].strip("]").split(", ")  # no root group left


def test_serve_lock_never_follows_a_planted_link(tmp_path: Path) -> None:
    """The data dir's owner may plant postoffice.pid for serve run as root:
    a symlink or a hard link to another file, or a FIFO."""
    data = tmp_path / "data"
    data.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root:secret\n")
    for plant in (
        lambda p: p.symlink_to(victim),
        lambda p: os.link(victim, p),
        lambda p: os.mkfifo(p),
    ):
        lock_file = data / LOCK_NAME
        plant(lock_file)
        with pytest.raises(OSError):
            ServeLock.acquire(data)
        assert victim.read_text() == "root:secret\n"
        lock_file.unlink()
    ServeLock.acquire(data).release()  # a file of its own is fine


def test_serving_pid_does_not_hang_on_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOCK_NAME)
    code = "import sys; from pathlib import Path; from postoffice.datadir import serving_pid;"
    code += " print(serving_pid(Path(sys.argv[1])))"
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=10
    )
    assert result.stdout == "None\n", result.stderr


def test_how_to_reach_a_server_started_with_or_without_a_config() -> None:
    """trial #12: -c CONFIG cannot reach a server that has no config file."""
    without = RunningServer(
        1, Path("/srv/mail/postoffice-data"), "python -m postoffice serve", Path("/srv/mail")
    )
    assert without.config_option() is None
    hint = without.how_to_reach()
    assert "started without -c: run the command in /srv/mail" in hint
    assert "-c " not in hint.replace("without -c", "")
    for command in (
        "python -m postoffice serve -c po.toml",
        "python -m postoffice -c po.toml serve",
        "python -m postoffice serve --config po.toml",
        "python -m postoffice serve --config=po.toml",
    ):
        server = RunningServer(2, None, command, Path("/srv/mail"))
        assert server.how_to_reach() == "give it its config: postoffice -c /srv/mail/po.toml ..."
    absolute = RunningServer(3, None, "postoffice serve -c /etc/po.toml", Path("/"))
    assert absolute.config_option() == "/etc/po.toml"
