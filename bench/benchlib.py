"""Helpers for bench/run.py: process trees (CPU, memory), Maildir checks, the
postoffice instance under test, the anchor stack, and quiet-machine checks.

Measuring tools beside postoffice, not part of it.  Everything stays on
127.0.0.0/8; every process started here is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

USER, PASSWORD = "load@example.test", "secret-pass-load"
TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- numbers ---------------------------------------------------------------------------
def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def span(values: list[float], fmt: str = "{:.0f}") -> str:
    """``median [min-max]``."""
    if not values:
        return "-"
    m = fmt.format(med(values))
    return f"{m} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


# --- processes ---------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


Roots = int | list[int]


def tree(root: Roots) -> list[int]:
    """``root`` (one PID or several) and every live descendant."""
    kids = _children()
    out: list[int] = []
    todo = [root] if isinstance(root, int) else list(root)
    while todo and len(out) < 100_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def tree_cpu(root: Roots) -> float:
    """CPU seconds of a process tree: utime+stime of the live processes plus
    cutime+cstime (children already reaped: Postfix's and Dovecot's short-lived
    workers count too, exactly once)."""
    total = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15])
    return total / TCK


def tree_rss(root: Roots) -> int:
    """Bytes of resident memory summed over the tree (shared pages count per process)."""
    total = 0
    for pid in tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


def tree_pss(root: Roots) -> int:
    """Bytes of proportional set size summed over the tree (shared pages split)."""
    total = 0
    for pid in tree(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            pass
    return total


def workers_pss(root: Roots, name: str) -> tuple[int, int]:
    """(PSS bytes summed, count) of the processes called ``name`` in the tree:
    the per-connection processes of a process-per-connection server."""
    total = count = 0
    for pid in tree(root):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != name:
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
                    break
        except (OSError, ValueError):
            pass
    return total, count


def read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


class RssSampler:
    """Peak tree RSS while a load runs (sampled every 0.25 s in a thread)."""

    def __init__(self, root: Roots | None) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        if self.root is not None:
            self.peak = tree_rss(self.root)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.root is not None:
            self.peak = max(self.peak, tree_rss(self.root))

    def _run(self) -> None:
        assert self.root is not None
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, tree_rss(self.root))


# --- the machine must be quiet -----------------------------------------------------------
CONTENDERS = ("smtp-source", "pop3-load", "imap-load", "relay_bench", "pop3_bench")


def others_running() -> list[str]:
    """Load generators of other benchmarkers (their runs share the anchor's mailbox)."""
    me = os.getpid()
    found = []
    for name in CONTENDERS:
        out = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True, check=False)
        pids = [int(p) for p in out.stdout.split() if int(p) != me]
        # pgrep -f may see our own parent shell's command line; ignore our tree.
        ours = set(tree(me))
        pids = [p for p in pids if p not in ours]
        if pids:
            found.append(f"{name}({','.join(map(str, pids[:3]))})")
    return found


def wait_quiet(max_wait: float = 300.0) -> None:
    """Wait (bounded) until no other benchmark load runs; raise if it never ends."""
    deadline = time.monotonic() + max_wait
    announced = False
    while busy := others_running():
        if time.monotonic() > deadline:
            raise RuntimeError(f"other benchmark loads kept running: {' '.join(busy)}")
        if not announced:
            print(f"  waiting for other benchmark loads to end: {' '.join(busy)}", flush=True)
            announced = True
        time.sleep(2)


# --- Maildirs ------------------------------------------------------------------------------
_MSGID = re.compile(rb"^message-id:[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)


def maildir_files(maildir: Path, subs: Iterable[str] = ("new", "cur")) -> list[Path]:
    out: list[Path] = []
    for sub in subs:
        try:
            with os.scandir(maildir / sub) as it:
                out += [Path(e.path) for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            pass
    return out


def empty_maildir(maildir: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        for path in maildir_files(maildir, (sub,)):
            path.unlink(missing_ok=True)
    for entry in maildir.glob("postoffice-pop3.*") if maildir.is_dir() else ():
        entry.unlink(missing_ok=True)


def message_ids(files: Iterable[Path]) -> list[bytes]:
    """The Message-ID of each file (b"" when it has none), from its header block."""
    ids = []
    for path in files:
        try:
            with open(path, "rb") as fh:
                head = fh.read(8192)
        except FileNotFoundError:
            continue
        end = head.find(b"\n\n")
        m = _MSGID.search(head[: end if end >= 0 else len(head)])
        ids.append(m.group(1).strip() if m else b"")
    return ids


@dataclass
class StoreCheck:
    expected: int
    stored: int
    distinct_ids: int
    leftover_tmp: int

    @property
    def ok(self) -> bool:
        return self.stored == self.expected == self.distinct_ids and self.leftover_tmp == 0

    def __str__(self) -> str:
        text = f"stored {self.stored}/{self.expected}, ids {self.distinct_ids}"
        return text + (f", tmp {self.leftover_tmp}" if self.leftover_tmp else "")


def check_store(maildir: Path, expected: int) -> StoreCheck:
    files = maildir_files(maildir)
    ids = [i for i in message_ids(files) if i]
    return StoreCheck(expected, len(files), len(set(ids)), len(maildir_files(maildir, ("tmp",))))


# --- ports ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def greets(port: int, prefix: bytes, tls: bool = False) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            s = ctx.wrap_socket(raw, server_hostname="localhost") if tls else raw
            return s.recv(200).startswith(prefix)
    except OSError:
        return False


# --- postoffice under test -------------------------------------------------------------------
# metrics too, on its own port: the default config serves it (what users
# get), and two postoffices (--against, the milter row) must not clash on 2900.
LISTENERS = ("smtp", "submission", "pop3", "pop3s", "imap", "imaps", "metrics")


@dataclass
class Postoffice:
    """A private postoffice on free loopback ports, data in a temporary directory
    on the same file system as the anchor's (/tmp), users like the anchor's."""

    smarthost_port: int
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="po-bench-")))
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {name: free_port() for name in LISTENERS}
        listen = "\n".join(f'{k} = ["127.0.0.1:{v}"]' for k, v in self.ports.items())
        self.config = self.root / "postoffice.toml"
        self.config.write_text(
            'hostname = "mail.example.test"\n'
            f'data_dir = "{self.root / "data"}"\n'
            'domains = ["example.test"]\n\n'
            f"[listen]\n{listen}\nsubmissions = []\n\n"
            # Room for the idle-connection measurement (10,000 from one address).
            "[limits]\nmax_connections = 12000\nmax_connections_per_ip = 12000\n"
            # One smtp process per CPU (README: [limits] smtp_processes).
            "smtp_processes = 0\n\n"
            # Started as root (the bench is): stay root, no postoffice user needed.
            '[run]\nuser = "root"\n\n'
            # Plain POP3 and IMAP from loopback measure the protocol, not TLS
            # (Dovecot does the same for 127.0.0.1 -> 127.0.0.1, see the shared
            # bench README).
            "[auth]\nallow_plaintext_loopback = true\n\n"
            f'[relay]\nsmarthost = "127.0.0.1:{self.smarthost_port}"\n'
            "max_per_destination = 20\n"
        )

    @property
    def maildir(self) -> Path:
        return self.root / "data" / "mail" / "example.test" / "load"

    @property
    def queue_dir(self) -> Path:
        return self.root / "data" / "queue"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def cli(self, *args: str, stdin: str | None = None) -> None:
        cmd = (sys.executable, "-m", "postoffice", "-c", str(self.config), *args)
        env = {**os.environ, **self.env}
        subprocess.run(
            cmd, input=stdin, text=True, check=True, capture_output=True, timeout=120, env=env
        )

    def add_user(self, user: str = USER) -> None:
        if not (self.root / "data").is_dir():
            self.cli("init")  # commands other than serve/init need the data dir
        self.cli("user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        env = {**os.environ, "POSTOFFICE_LOG_LEVEL": "WARNING", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice", "serve", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + 60
        while not all(port_open(p) for p in self.ports.values()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"postoffice did not start; see {self.root / 'server.log'}")
            time.sleep(0.1)

    def queue_empty(self) -> bool:
        q = self.queue_dir
        return not any(p.suffix == ".msg" for p in q.iterdir()) if q.is_dir() else True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def source_tree(path: Path) -> Path:
    """The directory that holds the ``postoffice`` package of a checkout:
    ``path`` itself or its ``src/``."""
    for candidate in (path, path / "src"):
        if (candidate / "postoffice" / "__main__.py").is_file():
            return candidate.resolve()
    raise SystemExit(f"no postoffice package in {path} or {path / 'src'}")


@dataclass
class PostofficeAnchor:
    """A second postoffice, run from another source tree (``PYTHONPATH``
    wins over the venv's editable install, and its smtp and DKIM worker
    processes inherit it), in the anchor's place: ``run.py --against SRC``
    measures this tree against that one, alternating, as against Postfix
    and Dovecot.  Exposes what the SMTP and POP3 workloads use of Anchor."""

    server: Postoffice
    label: str = "baseline"
    owner: str = "nobody-postoffice-bench"  # pop3_bench.fill: as for the postoffice under test

    @classmethod
    def from_tree(cls, src: Path, smarthost_port: int) -> PostofficeAnchor:
        return cls(Postoffice(smarthost_port, env={"PYTHONPATH": str(source_tree(src))}))

    @property
    def smtp_label(self) -> str:
        return self.label

    @property
    def pop3_label(self) -> str:
        return self.label

    @property
    def smtp_port(self) -> int:
        return self.server.ports["smtp"]

    @property
    def pop3_port(self) -> int:
        return self.server.ports["pop3"]

    @property
    def pop3s_port(self) -> int:
        return self.server.ports["pop3s"]

    @property
    def maildir(self) -> Path:
        return self.server.maildir

    @property
    def postfix_pid(self) -> int | None:
        return self.server.pid

    @property
    def dovecot_pid(self) -> int | None:
        return self.server.pid

    def smtp_up(self) -> bool:
        return self.server.pid is not None

    def pop3_up(self) -> bool:
        return self.server.pid is not None

    def drain(self) -> None:
        """Nothing queues: the load's mail is local."""

    def empty_load(self) -> None:
        empty_maildir(self.maildir)

    def before_smtp(self) -> None:
        """As for the postoffice under test (run.py: smtp_workloads)."""
        empty_maildir(self.maildir)
        sync()


# --- the anchor stack (Postfix + Dovecot, ../shared/bench) ---------------------------------
@dataclass
class Anchor:
    bench: Path  # the shared bench directory (scripts)
    root: Path = Path("/tmp/anchor")
    smtp_port: int = 10025
    pop3_port: int = 10110
    pop3s_port: int = 10995
    imap_port: int = 10143
    imaps_port: int = 10993
    smtp_label: str = "postfix"
    pop3_label: str = "dovecot"
    owner: str = "vmail"  # of the anchor's Maildirs (pop3_bench.fill)

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / "example.test" / "load"

    @property
    def postfix_pid(self) -> int | None:
        return read_pid(self.root / "postfix" / "spool" / "pid" / "master.pid")

    @property
    def dovecot_pid(self) -> int | None:
        return read_pid(self.root / "dovecot" / "run" / "master.pid")

    def smtp_up(self) -> bool:
        return greets(self.smtp_port, b"220")

    def pop3_up(self) -> bool:
        return greets(self.pop3_port, b"+OK") and greets(self.pop3s_port, b"+OK", tls=True)

    def imap_up(self) -> bool:
        return greets(self.imap_port, b"* OK") and greets(self.imaps_port, b"* OK", tls=True)

    def drain(self) -> None:
        subprocess.run([str(self.bench / "pf-drain.sh")], capture_output=True, timeout=200)

    def empty_load(self) -> None:
        subprocess.run(
            [str(self.bench / "maildir-empty.sh"), str(self.maildir)],
            capture_output=True,
            timeout=200,
            check=True,
        )

    def before_smtp(self) -> None:
        self.drain()
        self.empty_load()
        time.sleep(0.5)


@dataclass
class RelayAnchor:
    """The second Postfix instance whose relayhost is a sink (shared README,
    ``ANCHOR_RELAYHOST``): its submission port and the sink port it relays to."""

    root: Path
    submission_port: int
    sink_port: int

    @property
    def postfix_pid(self) -> int | None:
        return read_pid(self.root / "postfix" / "spool" / "pid" / "master.pid")

    @property
    def dovecot_pid(self) -> int | None:
        """Its Dovecot does the SASL AUTH of Postfix submission: part of the cost."""
        return read_pid(self.root / "dovecot" / "run" / "master.pid")

    @classmethod
    def discover(cls, root: Path) -> RelayAnchor | None:
        try:
            main = (root / "postfix" / "etc" / "main.cf").read_text()
            master = (root / "postfix" / "etc" / "master.cf").read_text()
        except OSError:
            return None
        relay = re.search(r"^relayhost\s*=\s*\[127\.0\.0\.1\]:(\d+)", main, re.MULTILINE)
        # The listener whose options name it submission (anchor-stack.sh writes it so).
        sub = re.search(
            r"^127\.0\.0\.1:(\d+)\s+inet[^\n]*smtpd\n\s+-o syslog_name=postfix/submission",
            master,
            re.MULTILINE,
        )
        if relay is None or sub is None:
            return None
        return cls(root, int(sub.group(1)), int(relay.group(1)))


def sync() -> None:
    subprocess.run(["sync"], check=False, timeout=300)
