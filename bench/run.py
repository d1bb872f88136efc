#!/usr/bin/env python3
"""postoffice beside Postfix + Dovecot: every hot-path workload, one table.

    python bench/run.py [--runs 3] [--only smtp,relay,pop3,login,idle,imap,milter] [--quick]
                        [--rows 'imap-10k-mbsync-*,imap-idle-latency-*']
                        [--anchor auto|up|no] [--bench-dir ../shared/bench]
                        [--json results.jsonl] [--against SRC]

What it does:

1. Starts its own postoffice (``python -m postoffice serve``) on free
   127.0.0.1 ports with a temporary data directory under /tmp (the file
   system the anchor's Maildirs are on), the domain ``example.test`` and the
   user ``load@example.test`` / ``secret-pass-load``, as in the anchor stack.
2. Finds the anchor stack of the shared bench directory (Postfix on
   127.0.0.1:10025, Dovecot on 10110/10995 and IMAP 10143/10993;
   ``anchor-stack.sh``) and, for the
   relay load, its second Postfix instance whose relayhost is a sink
   (/tmp/anchor-relay).  ``--anchor up`` starts whatever is not answering;
   ``auto`` uses what runs and skips the anchor side, with a note, where
   nothing answers; ``no`` measures postoffice alone.
3. Runs every workload RUNS times, alternating the servers (postoffice,
   anchor, anchor, postoffice, ...) so that machine drift hits both, after
   waiting until no other benchmark load runs (the anchor's ``load`` mailbox
   is shared with other benchmarkers):

   =============  =========================================================
   smtp-1x10k     smtp-source, 1 session x 2000 x 10 KiB        (ack msg/s)
   smtp-20x10k    smtp-source, 20 sessions x 10000 x 10 KiB     (ack msg/s)
   smtp-4x1m      smtp-source, 4 sessions x 200 x 1 MiB         (ack msg/s)
   smtp-rspamd-20x10k  smtp-source, 20 sessions x 5000 x 10 KiB (ack msg/s)
                  with rspamd as milter on both sides (one rspamd, offline
                  config of tests/support/rspamd.py): postoffice with
                  [filters] milters, the anchor a third Postfix instance
                  (/tmp/anchor-milter) with smtpd_milters and
                  milter_default_action = tempfail; every stored message
                  must carry rspamd's X-Rspamd-Queue-Id; rspamd's CPU is
                  reported per side in the notes
   relay-20x10k   submission (STARTTLS+AUTH) -> smtp-sink, 20 x 2000 x 10 KiB
                  (bench/relay_bench.py; msg/s until the sink has them all)
   pop3-10k-*     RETR all of 10000 x 10 KiB, plain and POP3S (pop3-load.py)
   pop3-1m-*      RETR all of 200 x 1 MiB, plain and POP3S
   pop3-login     USER/PASS+STAT+QUIT, 10 parallel clients; postoffice's
                  hash gets the anchor's argon2id parameters (equal cost)
   idle-smtp/pop3 10,000 idle connections held (NOOP answered on each
                  afterwards); memory per connection (PSS; the anchor: 50)
   imap-10k-*     one imap-load.py session each of 10000 x 10 KiB: SELECT
                  cold (IMAP index files removed first) and warm (s), UID
                  FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE
                  BODYSTRUCTURE) and BODY.PEEK[] of all (msg/s), plain and
                  IMAPS (imap-load.py verifies no certificate: CERT_NONE)
   imap-100k-*    SELECT alone of 100000 x 1 KiB, cold and warm (s)
   imap-10k-mbsync-full    ``mbsync -a`` (isync, plain IMAP, ``Sync Pull``)
                  of all 10000 x 10 KiB into an empty local Maildir (s); the
                  local INBOX must then hold exactly 10000 files
   imap-10k-mbsync-resync  the same mbsync right after: nothing to move (s)
   imap-idle-latency-*     3 clients SELECT INBOX + IDLE while 200 messages
                  arrive over SMTP at 20/s (postoffice: its smtp listener;
                  Dovecot: through the anchor's Postfix, which delivers
                  into its Maildir); ms from each 250 to the EXISTS that
                  counts it: median, p95, max
   idle-imap      10,000 idle IMAP connections at the greeting (NOOP after)
   idle-imap-idle 10,000 sessions after LOGIN, SELECT INBOX, IDLE (DONE
                  answered after); the anchor: 50 of each.  Each holds one
                  descriptor in postoffice (its socket: the mailbox's SQLite
                  index and inotify watch are shared by its sessions), so
                  fewer only where the open files limit is below ~11,000
   =============  =========================================================

4. Checks durability and completeness: after each SMTP run every
   acknowledged message is in the Maildir (smtp-source exits non-zero on any
   refusal, so exit 0 means all were acknowledged), counted and with that
   many distinct Message-IDs, and nothing left in tmp/; relayed mail is
   counted and its Message-IDs checked at the sink; POP3 RETR sizes must
   match LIST.
5. Prints one Markdown table: median [min-max] per server, the median of the
   pairwise ratios, server CPU seconds per run (the whole process tree,
   including exited workers) and peak resident memory of the tree.

``--against SRC`` measures this tree against another: a second postoffice,
run from the source tree SRC (a checkout or its ``src/``), takes the
anchor's place in the same alternation (smtp and pop3 only); the ratios are
this tree / that tree, so a change's before and after come from one run.

``--quick`` divides message counts by 5 (a smoke run; not for the record).
``--rows`` keeps, inside the ``--only`` groups, the rows whose names match
one of its shell patterns (``imap-10k-mbsync-*``); a group's set-up (the
mailbox fill) runs only when one of its rows is kept.
Loopback only; every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import idle_conns

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("smtp", "relay", "pop3", "login", "idle", "imap", "milter")


@dataclass
class Row:
    workload: str
    unit: str
    target: str
    po: list[float] = field(default_factory=list)
    anchor: list[float] = field(default_factory=list)
    po_cpu: list[float] = field(default_factory=list)
    anchor_cpu: list[float] = field(default_factory=list)
    po_rss: list[float] = field(default_factory=list)  # MiB
    anchor_rss: list[float] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lower_is_better: bool = False

    @property
    def ratios(self) -> list[float]:
        pairs = zip(self.po, self.anchor, strict=False)
        if self.lower_is_better:
            return [b / a for a, b in pairs if a > 0]
        return [a / b for a, b in pairs if b > 0]

    def failed(self) -> bool:
        return any(not c.startswith("ok") for c in self.checks)


@dataclass
class Side:
    """One server under one workload: how to reach it and how to measure it."""

    label: str  # "postoffice" / "postfix" / "dovecot" / "baseline" (--against)
    pid: Callable[[], bl.Roots | None]
    pre: Callable[[], None] = lambda: None


@dataclass
class Context:
    args: argparse.Namespace
    bench: Path
    po: bl.Postoffice
    anchor: bl.Anchor | bl.PostofficeAnchor | None
    relay: bl.RelayAnchor | None
    rows: list[Row] = field(default_factory=list)

    def scale(self, n: int) -> int:
        return max(1, n // 5) if self.args.quick else n

    def wants(self, *workloads: str) -> bool:
        """Whether ``--rows`` keeps any of these rows (all, without it)."""
        patterns = [p for p in (self.args.rows or "*").split(",") if p]
        return any(fnmatch.fnmatchcase(w, p) for w in workloads for p in patterns)

    def target(self, against_anchor: str) -> str:
        """The row's target: against the anchor stack, or the A/B gate (--against)."""
        return "≥ 0.95" if self.args.against else against_anchor


Run = Callable[[], tuple[float, str]]
# One session that yields several rows' values at once (keyed by workload).
RunMany = Callable[[], tuple[dict[str, float], str]]


def measure(side: Side, run: RunMany) -> tuple[dict[str, float], float, float, str]:
    """(values, CPU s, peak RSS MiB, check) of one run of ``run`` against ``side``."""
    side.pre()
    bl.wait_quiet()
    pid = side.pid()
    cpu0 = bl.tree_cpu(pid) if pid else 0.0
    with bl.RssSampler(pid) as rss:
        values, check = run()
    cpu = bl.tree_cpu(pid) - cpu0 if pid else float("nan")
    return values, cpu, rss.peak / 2**20, check


def alternate(ctx: Context, row: Row, po: tuple[Side, Run], other: tuple[Side, Run] | None) -> None:
    """RUNS runs of each side, in the order A B B A A B ... (drift hits both)."""

    def many(pair: tuple[Side, Run] | None) -> tuple[Side, RunMany] | None:
        if pair is None:
            return None
        side, run = pair

        def run_many() -> tuple[dict[str, float], str]:
            value, check = run()
            return {row.workload: value}, check

        return side, run_many

    po_many = many(po)
    assert po_many is not None
    alternate_rows(ctx, [row], po_many, many(other))


def alternate_rows(
    ctx: Context,
    rows: list[Row],
    po: tuple[Side, RunMany],
    other: tuple[Side, RunMany] | None,
) -> None:
    """As ``alternate``, for a session that measures several rows at once: each
    row gets its value, and all of them the session's CPU and peak RSS.
    Rows ``--rows`` does not keep are left out; if none is kept, the
    session is not run."""
    rows = [r for r in rows if ctx.wants(r.workload)]
    if not rows:
        return
    for i in range(ctx.args.runs):
        order = [("po", po), ("anchor", other)]
        if i % 2:
            order.reverse()
        for which, pair in order:
            if pair is None:
                continue
            side, run = pair
            values: dict[str, float] = {}
            try:
                values, cpu, rss, check = measure(side, run)
            except (RuntimeError, SystemExit, subprocess.SubprocessError, OSError) as exc:
                cpu, rss, check = float("nan"), 0.0, f"FAILED: {exc}"
            for row in rows:
                value = values.get(row.workload, float("nan"))
                if which == "po":
                    row.po.append(value), row.po_cpu.append(cpu), row.po_rss.append(rss)
                else:
                    row.anchor.append(value), row.anchor_cpu.append(cpu)
                    row.anchor_rss.append(rss)
                row.checks.append(
                    check if check.startswith("FAILED") else f"ok {side.label}: {check}"
                )
            shown = "  ".join(
                f"{r.workload} {values.get(r.workload, float('nan')):.4g} {r.unit}" for r in rows
            )
            print(
                f"  run {i + 1} {side.label:10} {shown}  cpu {cpu:6.2f}s  rss {rss:6.0f} MiB"
                f"  {check}",
                flush=True,
            )
    ctx.rows.extend(rows)


# --- SMTP ingest ------------------------------------------------------------------------------
def parse_kv(text: str) -> dict[str, str]:
    lines = [ln for ln in text.strip().splitlines() if "=" in ln]
    return dict(item.split("=", 1) for item in lines[-1].split() if "=" in item) if lines else {}


def smtp_load(
    ctx: Context, port: int, maildir: Path, sessions: int, messages: int, size: int
) -> Callable[[], tuple[float, str]]:
    def run() -> tuple[float, str]:
        env = {
            **os.environ,
            "RCPT": bl.USER,
            "MAILDIR": str(maildir),
            "SEND_TIMEOUT": "400",
            "DELIVERY_TIMEOUT": "300",
        }
        out = subprocess.run(
            [
                str(ctx.bench / "smtp-load.sh"),
                "127.0.0.1",
                str(port),
                str(sessions),
                str(messages),
                str(size),
            ],
            capture_output=True,
            text=True,
            timeout=800,
            env=env,
            check=False,
        )
        kv = parse_kv(out.stdout)
        if out.returncode != 0 or kv.get("smtp_source_rc") != "0":
            raise RuntimeError(f"smtp-source failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        check = bl.check_store(maildir, messages)
        if not check.ok:
            raise RuntimeError(f"acknowledged != stored: {check}")
        e2e = kv.get("e2e_msgs_per_s", "?")
        return float(kv["ack_msgs_per_s"]), f"{check} (e2e {e2e}/s)"

    return run


def smtp_workloads(ctx: Context) -> None:
    po, anchor = ctx.po, ctx.anchor
    loads = [
        ("smtp-1x10k", 1, 2000, 10240, "≥ 1.5"),
        ("smtp-20x10k", 20, 10000, 10240, "≥ 2"),
        ("smtp-4x1m", 4, 200, 1 << 20, "≥ 1.5"),
    ]
    have_anchor = anchor is not None and anchor.smtp_up()
    for name, sessions, messages, size, target in loads:
        messages = ctx.scale(messages)
        row = Row(name, "msg/s", ctx.target(target))
        row.notes.append(
            f"postoffice with [limits] smtp_processes = 0: {os.cpu_count()} smtp processes"
            " (one per CPU); "
            + ("the baseline alike" if ctx.args.against else "Postfix forks an smtpd per session")
        )
        po_side = Side(
            "postoffice", lambda: po.pid, lambda: (bl.empty_maildir(po.maildir), bl.sync())
        )
        other = None
        if have_anchor and anchor is not None:
            pf_side = Side(anchor.smtp_label, lambda: anchor.postfix_pid, anchor.before_smtp)
            other = (
                pf_side,
                smtp_load(ctx, anchor.smtp_port, anchor.maildir, sessions, messages, size),
            )
        else:
            row.notes.append("the anchor's SMTP is not running: postoffice alone")
        port = po.ports["smtp"]
        alternate(
            ctx, row, (po_side, smtp_load(ctx, port, po.maildir, sessions, messages, size)), other
        )
        bl.empty_maildir(po.maildir)
    if have_anchor and anchor is not None:
        anchor.drain()
        anchor.empty_load()


# --- SMTP ingest through rspamd (milter) ------------------------------------------------------
MILTER_ANCHOR_ENV = {
    "ANCHOR_ROOT": "/tmp/anchor-milter",
    "ANCHOR_SMTP_PORT": "13025",
    "ANCHOR_SUBMISSION_PORT": "13587",
    "ANCHOR_POP3_PORT": "13110",
    "ANCHOR_POP3S_PORT": "13995",
}
MILTER_ANCHOR = Path(MILTER_ANCHOR_ENV["ANCHOR_ROOT"])
RSPAMD_HEADER = b"x-rspamd-queue-id:"


def milter_anchor(bench: Path) -> bl.Anchor:
    env = MILTER_ANCHOR_ENV
    return bl.Anchor(
        bench,
        root=MILTER_ANCHOR,
        smtp_port=int(env["ANCHOR_SMTP_PORT"]),
        pop3_port=int(env["ANCHOR_POP3_PORT"]),
        pop3s_port=int(env["ANCHOR_POP3S_PORT"]),
    )


def set_anchor_milter(root: Path, milter: str) -> None:
    """Point the Postfix instance under ``root`` at ``milter`` ("" for none)."""
    etc = str(root / "postfix" / "etc")
    settings = [f"smtpd_milters = {milter}", "milter_default_action = tempfail"]
    subprocess.run(["postconf", "-c", etc, "-e", *settings], check=True, timeout=60)
    subprocess.run(["postfix", "-c", etc, "reload"], check=True, timeout=60, capture_output=True)


def count_rspamd_headers(maildir: Path) -> int:
    """Stored messages whose header block carries rspamd's queue id field
    (its milter_headers), i.e. that went through rspamd."""
    seen = 0
    for path in bl.maildir_files(maildir):
        with open(path, "rb") as fh:
            head = fh.read(16384)
        for line in head.splitlines():
            if not line.strip():  # end of the header block
                break
            if line.lower().startswith(RSPAMD_HEADER):
                seen += 1
                break
    return seen


def milter_workload(ctx: Context) -> None:
    """smtp-20x10k with rspamd as the milter of both servers (one rspamd)."""
    if not ctx.wants("smtp-rspamd-20x10k"):
        return
    sys.path.insert(0, str(REPO))
    from tests.support.rspamd import Rspamd

    row = Row("smtp-rspamd-20x10k", "msg/s", "≥ 1.0")
    sessions, messages, size = 20, ctx.scale(5000), 10240
    rspamd_root = Path(tempfile.mkdtemp(prefix="rspamd-bench-"))
    rspamd = Rspamd(rspamd_root)
    po = bl.Postoffice(smarthost_port=bl.free_port())
    anchor = milter_anchor(ctx.bench)
    rspamd_cpu: dict[str, list[float]] = {"postoffice": [], "postfix": []}
    other: tuple[Side, Run] | None = None
    try:
        rspamd.start()
        assert rspamd.proc is not None
        rspamd_pid = rspamd.proc.pid
        print(f"rspamd pid {rspamd_pid}, milter {rspamd.milter_address}", flush=True)
        config = po.config.read_text()
        po.config.write_text(config + f'\n[filters]\nmilters = ["{rspamd.milter_address}"]\n')
        po.add_user(bl.USER)
        po.start()
        print(f"postoffice (milter) pid {po.pid}, smtp {po.ports['smtp']}", flush=True)

        def through_rspamd(label: str, port: int, maildir: Path) -> Callable[[], tuple[float, str]]:
            load = smtp_load(ctx, port, maildir, sessions, messages, size)

            def run() -> tuple[float, str]:
                cpu0 = bl.tree_cpu(rspamd_pid)
                value, check = load()
                cpu = bl.tree_cpu(rspamd_pid) - cpu0
                rspamd_cpu[label].append(cpu)
                marked = count_rspamd_headers(maildir)
                if marked != messages:
                    raise RuntimeError(f"{marked}/{messages} stored with {RSPAMD_HEADER!r}")
                return value, f"{check}, {marked} with X-Rspamd-Queue-Id, rspamd cpu {cpu:.1f}s"

            return run

        def po_pre() -> None:
            bl.empty_maildir(po.maildir)
            bl.sync()

        po_side = Side("postoffice", lambda: po.pid, po_pre)
        if anchor.smtp_up() and anchor.postfix_pid is not None:
            set_anchor_milter(anchor.root, rspamd.milter_address)

            def pf_pre() -> None:
                subprocess.run(
                    [str(ctx.bench / "pf-drain.sh"), str(anchor.root)],
                    capture_output=True,
                    timeout=200,
                    check=False,
                )
                bl.empty_maildir(anchor.maildir)  # maildir-empty.sh: /tmp/anchor/ only
                time.sleep(0.5)

            pf_side = Side("postfix", lambda: anchor.postfix_pid, pf_pre)
            other = (pf_side, through_rspamd("postfix", anchor.smtp_port, anchor.maildir))
        else:
            row.notes.append(f"no Postfix instance at {anchor.root}: postoffice alone")
        alternate(
            ctx, row, (po_side, through_rspamd("postoffice", po.ports["smtp"], po.maildir)), other
        )
        if other is not None:
            subprocess.run(
                [str(ctx.bench / "pf-drain.sh"), str(anchor.root)],
                capture_output=True,
                timeout=200,
                check=False,
            )
            bl.empty_maildir(anchor.maildir)
    except (RuntimeError, OSError, subprocess.SubprocessError, SystemExit) as exc:
        row.checks.append(f"FAILED: {exc}")
        if not any(r is row for r in ctx.rows):
            ctx.rows.append(row)
    finally:
        if other is not None:  # the instance may outlive this run: no milter left set
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                set_anchor_milter(anchor.root, "")
        po.stop()
        po.remove()
        rspamd.stop()
        shutil.rmtree(rspamd_root, ignore_errors=True)
    cpus = " / ".join(f"{_num(v, '{:.1f}')}" for v in rspamd_cpu.values())
    row.notes.append(
        f"rspamd CPU s/run (not in the CPU column) po / anchor: {cpus}; one rspamd proxy"
        " worker (self_scan), offline config of tests/support/rspamd.py, shared by both"
    )
    row.notes.append(
        f"{sessions} sessions x {messages} x {size // 1024} KiB; anchor: Postfix at"
        f" {anchor.root} with smtpd_milters, milter_default_action = tempfail"
    )


# --- relay ------------------------------------------------------------------------------------
def relay_workload(ctx: Context) -> None:
    import relay_bench

    row = Row("relay-20x10k", "msg/s", "≥ 1.0")
    messages = ctx.scale(2000)
    port = ctx.po.smarthost_port
    if bl.port_open(port):
        row.checks.append(f"FAILED: sink port {port} is in use (another relay benchmark?)")
        ctx.rows.append(row)
        return
    t, m, p = argon2_like_sha512_crypt()
    set_hash(ctx.po, t, m, p, [bl.USER])
    row.notes.append(
        f"AUTH at equal hash cost: postoffice argon2id t={t} m={m} KiB p={p}, about one"
        " SHA512-CRYPT (the relay anchor's scheme) here; anchor CPU includes its Dovecot (SASL)"
    )
    sink = relay_bench.Sink(port)
    ns = argparse.Namespace(messages=messages, size=10240, sessions=20, timeout=300.0)

    def run_for(host_port: int) -> Callable[[], tuple[float, str]]:
        def run() -> tuple[float, str]:
            r = relay_bench.run_once("127.0.0.1", host_port, bl.USER, bl.PASSWORD, sink, ns, None)
            files = [Path(e.path) for e in os.scandir(sink.dir)]
            ids = {i for i in bl.message_ids(files) if i}
            if r.delivered != messages or len(ids) != messages:
                raise RuntimeError(f"sink has {r.delivered}/{messages}, {len(ids)} distinct ids")
            return messages / r.e2e_s, f"relayed {r.delivered}/{messages}, ids {len(ids)}" + (
                f" (ack {messages / r.ack_s:.0f}/s)"
            )

        return run

    def po_pre() -> None:
        deadline = time.monotonic() + 120
        while not ctx.po.queue_empty() and time.monotonic() < deadline:
            time.sleep(0.2)
        bl.sync()

    relay = ctx.relay
    other = None
    if relay is not None and relay.postfix_pid is not None:
        root = relay.root

        def pf_pre() -> None:
            subprocess.run(
                [str(ctx.bench / "pf-drain.sh"), str(root)],
                capture_output=True,
                timeout=200,
                check=False,
            )
            time.sleep(0.5)

        def pf_pids() -> list[int]:
            return [p for p in (relay.postfix_pid, relay.dovecot_pid) if p is not None]

        other = (Side("postfix", pf_pids, pf_pre), run_for(relay.submission_port))
    else:
        row.notes.append("no relay Postfix instance (/tmp/anchor-relay): postoffice alone")
    try:
        sink.start()
        po_side = Side("postoffice", lambda: ctx.po.pid, po_pre)
        alternate(ctx, row, (po_side, run_for(ctx.po.ports["submission"])), other)
    finally:
        sink.stop()
    row.notes.append("msg/s until the sink had every message; STARTTLS+AUTH submission")


# --- POP3 -------------------------------------------------------------------------------------
def pop3_workloads(ctx: Context) -> None:
    import pop3_bench

    anchor = ctx.anchor
    have_anchor = anchor is not None and anchor.pop3_up()
    sets = [("10k", ctx.scale(10_000), 10_240), ("1m", 200, 1 << 20)]
    for tag, count, size in sets:
        pop3_bench.fill(ctx.bench, ctx.po.maildir, count, size, owner="nobody-postoffice-bench")
        if have_anchor and anchor is not None:
            bl.wait_quiet()
            pop3_bench.fill(ctx.bench, anchor.maildir, count, size, owner=anchor.owner)
        # A first (cold) session each: postoffice computes and caches CRLF sizes
        # of names without W=, Dovecot builds its index; not counted.
        cold = pop3_bench.load(ctx.bench, ctx.po.ports["pop3"], "plain", count)
        note = f"cold first session: postoffice {float(cold['msgs_per_s']):.0f} msg/s"
        if have_anchor and anchor is not None:
            cold = pop3_bench.load(ctx.bench, anchor.pop3_port, "plain", count)
            note += f", {anchor.pop3_label} {float(cold['msgs_per_s']):.0f} msg/s"
        for variant in ("plain", "pop3s"):
            row = Row(f"pop3-{tag}-{variant}", "msg/s", ctx.target("≥ 1.0"))
            row.notes.append(note)

            def run_for(
                port: int, v: str = variant, n: int = count
            ) -> Callable[[], tuple[float, str]]:
                def run() -> tuple[float, str]:
                    kv = pop3_bench.load(ctx.bench, port, v, n)
                    return float(kv["msgs_per_s"]), f"{kv['messages']} RETR, {kv['MB_per_s']} MB/s"

                return run

            po_port = ctx.po.ports["pop3s" if variant == "pop3s" else "pop3"]
            po_side = Side("postoffice", lambda: ctx.po.pid)
            other = None
            if have_anchor and anchor is not None:
                a_port = anchor.pop3s_port if variant == "pop3s" else anchor.pop3_port
                other = (Side(anchor.pop3_label, lambda: anchor.dovecot_pid), run_for(a_port))
            else:
                row.notes.append("the anchor's POP3 is not running: postoffice alone")
            alternate(ctx, row, (po_side, run_for(po_port)), other)
    bl.empty_maildir(ctx.po.maildir)


def login_workload(ctx: Context) -> None:
    anchor = ctx.anchor
    have_anchor = anchor is not None and anchor.pop3_up()
    sessions = ctx.scale(100)
    row = Row("pop3-login", "logins/s", "≥ 1.0")
    t, m, p = anchor_argon2(Path("/tmp/anchor/dovecot/users"))
    set_hash(ctx.po, t, m, p, LOGIN_USERS)
    row.notes.append(
        f"both argon2id t={t} m={m // 1024} MiB p={p}; postoffice logins spread over"
        f" {len(LOGIN_USERS)} users (a POP3 maildrop is locked per session, RFC 1939 §8;"
        " Dovecot does not lock, so its clients share load@)"
    )

    def run_for(port: int, users: str) -> Callable[[], tuple[float, str]]:
        def run() -> tuple[float, str]:
            out = subprocess.run(
                [
                    sys.executable,
                    str(ctx.bench / "pop3-load.py"),
                    "--port",
                    str(port),
                    "--user",
                    users,
                    "--password",
                    bl.PASSWORD,
                    "--mode",
                    "login",
                    "--sessions",
                    str(sessions),
                    "--parallel",
                    "10",
                    "--max-seconds",
                    "200",
                ],
                capture_output=True,
                text=True,
                timeout=400,
                check=False,
            )
            kv = parse_kv(out.stdout)
            if out.returncode != 0 or kv.get("sessions_ok") != str(sessions):
                raise RuntimeError(f"login load failed: {out.stdout[-200:]} {out.stderr[-200:]}")
            return float(kv["sessions_per_s"]), f"{kv['sessions_ok']} logins"

        return run

    other = None
    if have_anchor and anchor is not None:
        other = (Side("dovecot", lambda: anchor.dovecot_pid), run_for(anchor.pop3_port, bl.USER))
    po_run = run_for(ctx.po.ports["pop3"], ",".join(LOGIN_USERS))
    alternate(ctx, row, (Side("postoffice", lambda: ctx.po.pid), po_run), other)


# --- IMAP -------------------------------------------------------------------------------------
# The rows of one 10k mailbox (imap_10k), after "imap-10k-".
IMAP_10K_ROWS = (
    "select-cold",
    "meta-cold",
    "select-warm",
    "meta-plain",
    "body-plain",
    "meta-imaps",
    "body-imaps",
    "mbsync-full",
    "mbsync-resync",
)


def imap_workloads(ctx: Context) -> None:
    import imap_bench

    anchor = ctx.anchor
    have_anchor = isinstance(anchor, bl.Anchor) and anchor.imap_up()
    count, size = ctx.scale(10_000), 10_240
    tag = f"{count // 1000}k" if count >= 1000 else str(count)
    if ctx.wants(*(f"imap-{tag}-{name}" for name in IMAP_10K_ROWS)):
        imap_10k(ctx, have_anchor, count, size, tag)
    big = f"imap-{ctx.scale(100_000) // 1000}k-select"
    if ctx.wants(f"{big}-cold", f"{big}-warm"):
        imap_select_big(ctx, have_anchor)
    bl.empty_maildir(ctx.po.maildir)
    imap_bench.forget_indexes(ctx.po.maildir)
    if have_anchor and isinstance(anchor, bl.Anchor):
        anchor.empty_load()
        imap_bench.forget_indexes(anchor.maildir)
    if ctx.wants(*(f"imap-idle-latency-{q}" for q in ("median", "p95", "max"))):
        imap_idle_latency(ctx, have_anchor)
    idle_row(ctx, "imap", "imap-login")
    idle_row(ctx, "imap-idle", "imap")


def imap_10k(ctx: Context, have_anchor: bool, count: int, size: int, tag: str) -> None:
    """The imap-load.py sessions and the mbsync syncs of one 10k mailbox."""
    import imap_bench
    import pop3_bench

    anchor = ctx.anchor
    pop3_bench.fill(ctx.bench, ctx.po.maildir, count, size, owner="nobody-postoffice-bench")
    imap_bench.forget_indexes(ctx.po.maildir)
    if have_anchor and isinstance(anchor, bl.Anchor):
        bl.wait_quiet()
        pop3_bench.fill(ctx.bench, anchor.maildir, count, size, owner=anchor.owner)

    def session(port: int, tls: bool, keys: dict[str, str]) -> RunMany:
        def run() -> tuple[dict[str, float], str]:
            kv = imap_bench.load(ctx.bench, port, tls, count)
            values = {f"imap-{tag}-{row}": kv[key] for row, key in keys.items()}
            return values, f"{kv['body_msgs']:.0f} bodies, {kv['body_mb_per_s']:.0f} MB/s"

        return run

    # (rows: name -> imap-load key, TLS, index files removed before each session)
    sessions = [
        ({"select-cold": "select_s", "meta-cold": "meta_msgs_per_s"}, False, True),
        (
            {
                "select-warm": "select_s",
                "meta-plain": "meta_msgs_per_s",
                "body-plain": "body_msgs_per_s",
            },
            False,
            False,
        ),
        ({"meta-imaps": "meta_msgs_per_s", "body-imaps": "body_msgs_per_s"}, True, False),
    ]
    for keys, tls, cold in sessions:
        rows = []
        for name, key in keys.items():
            seconds = key == "select_s"
            rows.append(
                Row(
                    f"imap-{tag}-{name}",
                    "s" if seconds else "msg/s",
                    "> 1.0",
                    lower_is_better=seconds,
                )
            )
        rows[0].notes.append(
            f"one imap-load.py session (LOGIN, SELECT, UID FETCH 1:* (FLAGS INTERNALDATE"
            f" RFC822.SIZE ENVELOPE BODYSTRUCTURE), UID FETCH BODY.PEEK[] in 500s) of {count} x"
            f" {size // 1024} KiB gives {', '.join(r.workload for r in rows)}; CPU and RSS are"
            " the whole session's"
            + ("; IMAPS (imap-load.py verifies no certificate: CERT_NONE)" if tls else "")
            + (
                "; cold = the IMAP index files (postoffice-imap.sqlite3*, dovecot.index*,"
                " dovecot-uidlist) removed before the session, files in the page cache"
                if cold
                else ""
            )
        )
        port = ctx.po.ports["imaps" if tls else "imap"]
        po_pre = (lambda: imap_bench.forget_indexes(ctx.po.maildir)) if cold else (lambda: None)
        po_side = Side("postoffice", lambda: ctx.po.pid, po_pre)
        other = None
        if have_anchor and isinstance(anchor, bl.Anchor):
            a_pre = (lambda: imap_bench.forget_indexes(anchor.maildir)) if cold else (lambda: None)
            a_port = anchor.imaps_port if tls else anchor.imap_port
            other = (Side("dovecot", lambda: anchor.dovecot_pid, a_pre), session(a_port, tls, keys))
        else:
            rows[0].notes.append("the anchor's IMAP is not running: postoffice alone")
        alternate_rows(ctx, rows, (po_side, session(port, tls, keys)), other)
    imap_mbsync(ctx, have_anchor, count, tag)


def imap_mbsync(ctx: Context, have_anchor: bool, count: int, tag: str) -> None:
    """mbsync pulls the whole mailbox into an empty local Maildir, then syncs
    again with nothing to move; both timed in one session per run."""
    import imap_bench

    anchor = ctx.anchor
    full, resync = f"imap-{tag}-mbsync-full", f"imap-{tag}-mbsync-resync"
    rows = [
        Row(full, "s", "faster than Dovecot (> 1.0)", lower_is_better=True),
        Row(resync, "s", "> 1.0", lower_is_better=True),
    ]
    rows[0].notes.append(
        f"mbsync (isync) -a, plain IMAP on loopback, Sync Pull of INBOX ({count} x 10 KiB)"
        " into an empty local Maildir, then again with nothing to move; the local INBOX"
        f" holds exactly {count} files after each; CPU and RSS are the server's over both"
        "; warm: a SELECT (not timed) builds each server's index first"
    )
    local = Path(tempfile.mkdtemp(prefix="po-bench-mbsync-"))

    def run_for(port: int) -> RunMany:
        def run() -> tuple[dict[str, float], str]:
            a, b = imap_bench.mbsync_seconds(port, local, count)
            return {full: a, resync: b}, f"{count} files after each sync"

        return run

    def warm(port: int) -> Callable[[], None]:
        def pre() -> None:
            imap_bench.select_seconds(port, count)

        return pre

    po_side = Side("postoffice", lambda: ctx.po.pid, warm(ctx.po.ports["imap"]))
    other = None
    if have_anchor and isinstance(anchor, bl.Anchor):
        a_side = Side("dovecot", lambda: anchor.dovecot_pid, warm(anchor.imap_port))
        other = (a_side, run_for(anchor.imap_port))
    else:
        rows[0].notes.append("the anchor's IMAP is not running: postoffice alone")
    try:
        alternate_rows(ctx, rows, (po_side, run_for(ctx.po.ports["imap"])), other)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def imap_idle_latency(ctx: Context, have_anchor: bool) -> None:
    """IDLE notification latency under 20 msg/s of SMTP delivery (the
    mailboxes start empty); three rows from one session per run."""
    import imap_bench

    anchor = ctx.anchor
    names = {"median": "imap-idle-latency-median", "p95": "imap-idle-latency-p95"}
    names["max"] = "imap-idle-latency-max"
    rows = [Row(n, "ms", "report it", lower_is_better=True) for n in names.values()]
    rate, seconds, clients = 20.0, 10.0, 3
    rows[0].notes.append(
        f"{clients} clients (raw sockets) LOGIN, SELECT INBOX, IDLE; {rate:.0f} msg/s x"
        f" {seconds:.0f} s of 1 KiB messages over one SMTP session (postoffice: its smtp"
        " listener; the anchor: Postfix on 10025, whose virtual agent delivers into"
        " Dovecot's Maildir); ms from each 250 to the first EXISTS counting it, per client"
        " (the i-th 250 matched with the count start + i), an EXISTS before the 250 = 0"
    )

    def run_for(smtp_port: int, imap_port: int, empty: Callable[[], None]) -> RunMany:
        def run() -> tuple[dict[str, float], str]:
            empty()
            r = imap_bench.idle_latency(smtp_port, imap_port, rate, seconds, clients)
            values = {
                names["median"]: r.median,
                names["p95"]: r.quantile(0.95),
                names["max"]: max(r.latencies_ms),
            }
            return values, f"{r.sent} x {clients} EXISTS seen, {r.early} before the 250"

        return run

    po_empty = lambda: bl.empty_maildir(ctx.po.maildir)  # noqa: E731
    po_side = Side("postoffice", lambda: ctx.po.pid)
    other = None
    if have_anchor and isinstance(anchor, bl.Anchor) and anchor.smtp_up():
        a_side = Side("dovecot", lambda: [p for p in (anchor.postfix_pid, anchor.dovecot_pid) if p])
        other = (a_side, run_for(anchor.smtp_port, anchor.imap_port, anchor.before_smtp))
        rows[0].notes.append("anchor CPU and RSS: Postfix and Dovecot together")
    else:
        rows[0].notes.append("the anchor's SMTP or IMAP is not running: postoffice alone")
    po_run = run_for(ctx.po.ports["smtp"], ctx.po.ports["imap"], po_empty)
    alternate_rows(ctx, rows, (po_side, po_run), other)
    bl.empty_maildir(ctx.po.maildir)
    if other is not None and isinstance(anchor, bl.Anchor):
        anchor.drain()
        anchor.empty_load()


def imap_select_big(ctx: Context, have_anchor: bool) -> None:
    """SELECT of a 100k-message mailbox (1 KiB each), cold and warm: SELECT only."""
    import imap_bench
    import pop3_bench

    anchor = ctx.anchor
    count = ctx.scale(100_000)
    tag = f"{count // 1000}k"
    pop3_bench.fill(ctx.bench, ctx.po.maildir, count, 1024, owner="nobody-postoffice-bench")
    imap_bench.forget_indexes(ctx.po.maildir)
    if have_anchor and isinstance(anchor, bl.Anchor):
        bl.wait_quiet()
        pop3_bench.fill(ctx.bench, anchor.maildir, count, 1024, owner=anchor.owner)
    for cold in (True, False):
        row = Row(
            f"imap-{tag}-select-{'cold' if cold else 'warm'}", "s", "> 1.0", lower_is_better=True
        )
        row.notes.append(
            f"SELECT INBOX alone (imaplib, plain) of {count} x 1 KiB"
            + ("; index files removed before each" if cold else "")
        )

        def run_for(port: int) -> Run:
            def run() -> tuple[float, str]:
                return imap_bench.select_seconds(port, count), f"{count} messages"

            return run

        def pre(maildir: Path, c: bool = cold) -> Callable[[], None]:
            return (lambda: imap_bench.forget_indexes(maildir)) if c else (lambda: None)

        po_side = Side("postoffice", lambda: ctx.po.pid, pre(ctx.po.maildir))
        other = None
        if have_anchor and isinstance(anchor, bl.Anchor):
            a_side = Side("dovecot", lambda: anchor.dovecot_pid, pre(anchor.maildir))
            other = (a_side, run_for(anchor.imap_port))
        alternate(ctx, row, (po_side, run_for(ctx.po.ports["imap"])), other)


def idle_workloads(ctx: Context) -> None:
    idle_row(ctx, "smtp", "smtpd")
    idle_row(ctx, "pop3", "pop3-login")


# A process (or more) per connection: process limits stop the anchor far below 10,000.
ANCHOR_IDLE = 50
IDLE_FDS = 1  # its socket (the index and the IDLE watch are per mailbox)


def idle_row(ctx: Context, proto: str, worker: str) -> None:
    """Memory per idle connection of ``proto`` (idle_conns.py); the anchor's
    ``worker`` processes are its per-connection cost."""
    anchor = ctx.anchor
    # Logged-in IDLE sessions cost a login each (the hash): fewer of them.
    count = ctx.scale(10_000)
    row = Row(f"idle-{proto}", "KiB/conn", "≤ 30 KiB", lower_is_better=True)
    if not ctx.wants(row.workload):
        return
    login = (bl.USER, bl.PASSWORD) if proto == "imap-idle" else None
    if login:
        # A session with INBOX selected holds one descriptor in the server (its
        # socket; the index and the watch are the mailbox's: idle_conns.py);
        # the server has this process's limit.  Below 10,000 when it is low.
        fit = (idle_conns.open_files_limit() - 1_000) // IDLE_FDS // 1_000 * 1_000
        if fit < count:
            row.notes.append(
                f"{fit} sessions, not {count}: the open files limit"
                f" ({idle_conns.open_files_limit()}, not raisable here) over {IDLE_FDS}"
                " descriptors per selected session"
            )
            count = fit
    if login:
        # The hash's cost is not what this row measures: a cheap one keeps
        # the logins quick (its buffer is freed before memory is read).
        set_hash(ctx.po, 1, 1024, 1, [bl.USER])
    # A fresh server per protocol (memory freed by earlier loads would hide
    # the cost), warmed up by a few connections so lazy set-up is not counted.
    ctx.po.stop()
    ctx.po.start()
    po_pid = ctx.po.pid
    assert po_pid is not None
    bl.wait_quiet()
    listener = "imap" if proto.startswith("imap") else proto
    po_port = ctx.po.ports[listener]
    idle_conns.measure(po_port, 100, proto, lambda: 0, settle=0.5, login=login)
    time.sleep(1)
    try:
        r = idle_conns.measure(po_port, count, proto, lambda p=po_pid: bl.tree_pss(p), login=login)
    except (RuntimeError, OSError) as exc:
        limit = idle_conns.open_files_limit()
        row.checks.append(f"FAILED postoffice: {exc} (open files limit {limit})")
        print(f"  idle-{proto} postoffice FAILED: {exc}", flush=True)
        ctx.rows.append(row)
        return
    row.po.append(r.per_conn / 1024)
    row.po_rss.append(r.after / 2**20)
    ok = r.held == r.opened == count
    row.checks.append(("ok" if ok else "FAILED") + f" postoffice: {r.held}/{count} held")
    print(
        f"  idle-{proto} postoffice {r.per_conn / 1024:.1f} KiB/conn, {r.held}/{count}"
        f" held, opened in {r.seconds:.1f}s",
        flush=True,
    )
    a_pid = None
    if anchor is not None:
        a_pid = anchor.postfix_pid if proto == "smtp" else anchor.dovecot_pid
    a_port = {
        "smtp": anchor.smtp_port if anchor else 0,
        "pop3": anchor.pop3_port if anchor else 0,
        "imap": anchor.imap_port if isinstance(anchor, bl.Anchor) else 0,
        "imap-idle": anchor.imap_port if isinstance(anchor, bl.Anchor) else 0,
    }[proto]
    if anchor is not None and a_pid is not None and a_port:
        n = ANCHOR_IDLE
        seen: list[tuple[int, int]] = []

        def workers(p: int = a_pid, w: str = worker, out: list[tuple[int, int]] = seen) -> int:
            out.append(bl.workers_pss(p, w))
            return out[-1][0]

        ra = idle_conns.measure(a_port, n, proto, workers, login=login)
        pss, procs = seen[-1]
        row.anchor.append(pss / max(1, procs) / 1024)
        row.anchor_rss.append(bl.tree_rss(a_pid) / 2**20)
        ok = ra.held == ra.opened == n
        row.checks.append(("ok" if ok else "FAILED") + f" anchor: {ra.held}/{n} held")
        row.notes.append(
            f"anchor: {n} connections; PSS of its {worker} processes ({procs}, one per"
            " connection) per process"
        )
    what = "LOGIN, SELECT INBOX (empty), IDLE; DONE answered" if login else "a NOOP answered"
    row.notes.append(
        f"postoffice: {count} connections opened in {r.seconds:.1f}s, each {what}"
        " afterwards; memory is the growth of PSS"
    )
    ctx.rows.append(row)


# --- output -----------------------------------------------------------------------------------
def _num(values: list[float], fmt: str) -> str:
    real = [v for v in values if v == v]  # not NaN
    return fmt.format(bl.med(real)) if real else "-"


def table(rows: list[Row]) -> str:
    head = (
        "| workload | unit | postoffice median [min-max] | anchor median [min-max] | "
        "ratio (pairwise median [min-max]) | target | CPU s/run po / anchor | "
        "peak RSS MiB po / anchor | check |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        fmt = "{:.1f}" if r.unit == "KiB/conn" or (r.po and bl.med(r.po) < 100) else "{:.0f}"
        fmt = "{:.3f}" if r.unit == "s" else fmt
        ratio = bl.span(r.ratios, "{:.2f}") if r.ratios else "-"
        cpu = f"{_num(r.po_cpu, '{:.1f}')} / {_num(r.anchor_cpu, '{:.1f}')}"
        rss = f"{_num(r.po_rss, '{:.0f}')} / {_num(r.anchor_rss, '{:.0f}')}"
        check = (
            "ok"
            if r.checks and not r.failed()
            else "; ".join(c for c in r.checks if not c.startswith("ok"))[:120] or "-"
        )
        lines.append(
            f"| {r.workload} | {r.unit} | {bl.span(r.po, fmt)} | {bl.span(r.anchor, fmt)}"
            f" | {ratio} | {r.target} | {cpu} | {rss} | {check} |"
        )
    notes = [f"* {r.workload}: {n}" for r in rows for n in dict.fromkeys(r.notes)]
    return "\n".join(lines + (["", *notes] if notes else []))


LOGIN_USERS = [bl.USER] + [f"load{i}@example.test" for i in range(2, 11)]


def set_hash(po: bl.Postoffice, t: int, m: int, p: int, users: list[str]) -> None:
    """Give postoffice's bench users argon2id hashes of the given cost (the
    running server reads the account store live)."""
    import argon2

    from postoffice.mail.address import parse_mailbox
    from postoffice.storage.sqlite_accounts import SqliteAccountStore

    hasher = argon2.PasswordHasher(time_cost=t, memory_cost=m, parallelism=p)
    db = po.root / "data" / "accounts.sqlite3"
    store = SqliteAccountStore(db, config_domains=["example.test"])
    try:
        for user in users:
            store.set_password(parse_mailbox(user), hasher.hash(bl.PASSWORD))
    finally:
        store.close()


def anchor_argon2(users_file: Path) -> tuple[int, int, int]:
    """(t, m KiB, p) of the anchor Dovecot's load user (ARGON2ID by default)."""
    try:
        for line in users_file.read_text().splitlines():
            if line.startswith(bl.USER + ":") and "$argon2id$" in line:
                kv = dict(x.split("=") for x in line.split("$")[3].split(","))
                return int(kv["t"]), int(kv["m"]), int(kv["p"])
    except (OSError, IndexError, ValueError, KeyError):
        pass
    return 3, 65536, 1


def argon2_like_sha512_crypt() -> tuple[int, int, int]:
    """argon2id parameters (t=1, p=1, m a power of two) whose verify costs about
    what one SHA512-CRYPT (5000 rounds, the relay anchor's scheme) costs here."""
    import warnings

    import argon2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # deprecated, still in 3.11: only to time the anchor's scheme

    salt = crypt.mksalt(crypt.METHOD_SHA512)
    t0 = time.perf_counter()
    for _ in range(20):
        crypt.crypt(bl.PASSWORD, salt)
    target = (time.perf_counter() - t0) / 20
    best = (float("inf"), 4096)
    for m in (1024, 2048, 4096, 8192, 16384):
        hasher = argon2.PasswordHasher(time_cost=1, memory_cost=m, parallelism=1)
        stored = hasher.hash(bl.PASSWORD)
        t0 = time.perf_counter()
        for _ in range(10):
            hasher.verify(stored, bl.PASSWORD)
        cost = (time.perf_counter() - t0) / 10
        best = min(best, (abs(cost - target), m))
    return 1, best[1], 1


RELAY_ANCHOR_ENV = {
    "ANCHOR_ROOT": "/tmp/anchor-relay",
    "ANCHOR_SMTP_PORT": "11025",
    "ANCHOR_SUBMISSION_PORT": "11587",
    "ANCHOR_POP3_PORT": "11110",
    "ANCHOR_POP3S_PORT": "11995",
    "ANCHOR_RELAYHOST": "[127.0.0.1]:12526",
}


def ensure_anchor(
    bench: Path,
    mode: str,
    relay_wanted: bool,
    milter_wanted: bool,
    started: list[dict[str, str]],
) -> tuple[bl.Anchor | None, bl.RelayAnchor | None]:
    """The anchor stacks to measure against; ``started`` gets the environment
    of each one this run had to start (it stops those again at the end)."""
    if mode == "no":
        return None, None
    anchor = bl.Anchor(bench)
    if mode == "up" and not (anchor.smtp_up() and anchor.pop3_up() and anchor.imap_up()):
        subprocess.run([str(bench / "anchor-stack.sh"), "up"], check=True, timeout=1800)
        started.append({})
    if mode == "up" and milter_wanted and not milter_anchor(bench).smtp_up():
        env = {**os.environ, **MILTER_ANCHOR_ENV}
        subprocess.run([str(bench / "anchor-stack.sh"), "up"], check=True, timeout=1800, env=env)
        started.append(MILTER_ANCHOR_ENV)
    relay = bl.RelayAnchor.discover(Path("/tmp/anchor-relay"))
    if mode == "up" and relay_wanted and (relay is None or relay.postfix_pid is None):
        env = {**os.environ, **RELAY_ANCHOR_ENV}
        subprocess.run([str(bench / "anchor-stack.sh"), "up"], check=True, timeout=1800, env=env)
        started.append(RELAY_ANCHOR_ENV)
        relay = bl.RelayAnchor.discover(Path("/tmp/anchor-relay"))
    if not (anchor.smtp_up() or anchor.pop3_up() or anchor.imap_up()):
        print(
            "note: the anchor stack does not answer; measuring postoffice alone"
            " (start it with --anchor up)"
        )
        anchor = None
    return anchor, relay


def stop_anchors(bench: Path, started: list[dict[str, str]]) -> None:
    for extra in started:
        subprocess.run(
            [str(bench / "anchor-stack.sh"), "down"],
            env={**os.environ, **extra},
            timeout=300,
            check=False,
            capture_output=True,
        )


def imported_from(env: dict[str, str]) -> str:
    """Where ``python -m postoffice`` with ``env`` takes the package from."""
    out = subprocess.run(
        [sys.executable, "-c", "import postoffice; print(postoffice.__file__)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return str(Path(out.stdout.strip()).parent)


def find_bench(explicit: Path | None) -> Path:
    """The shared bench tools: ``--bench-dir``, else ``$POSTOFFICE_BENCH_DIR``, else
    ``shared/bench`` beside the repository (the steering checkout's layout) or
    beside the directory of worktrees it is in (``wt/<name>``)."""
    env = os.environ.get("POSTOFFICE_BENCH_DIR")
    default = REPO.parent / "shared" / "bench"
    beside_worktrees = REPO.parent.parent / "shared" / "bench"
    for cand in (explicit, Path(env) if env else None, default, beside_worktrees):
        if cand is not None and (cand / "smtp-load.sh").is_file():
            return cand
    raise SystemExit(
        f"shared bench tools not found in {explicit or env or default};"
        " give --bench-dir or set POSTOFFICE_BENCH_DIR (needs smtp-load.sh, ...)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma list of {', '.join(GROUPS)}")
    ap.add_argument("--quick", action="store_true", help="a fifth of the messages (smoke run)")
    ap.add_argument(
        "--rows", default=None, help="comma list of row-name patterns to keep (imap-idle-*)"
    )
    ap.add_argument("--anchor", choices=["auto", "up", "no"], default="auto")
    ap.add_argument("--bench-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="append the rows as JSON lines")
    ap.add_argument("--keep", action="store_true", help="keep postoffice's temporary data")
    ap.add_argument(
        "--against",
        type=Path,
        default=None,
        metavar="SRC",
        help="in the anchor's place, a postoffice run from the source tree SRC (smtp, pop3)",
    )
    args = ap.parse_args()
    groups = [g for g in args.only.split(",") if g]
    if not set(groups) <= set(GROUPS) or not 1 <= args.runs <= 15:
        ap.error(f"--only takes {', '.join(GROUPS)}; --runs 1..15")
    if args.against is not None and set(groups) - {"smtp", "pop3"}:
        ap.error("--against measures smtp and pop3 only (--only smtp,pop3)")
    bench = find_bench(args.bench_dir)
    anchors_started: list[dict[str, str]] = []
    anchor: bl.Anchor | bl.PostofficeAnchor | None
    if args.against is not None:
        anchor, relay = bl.PostofficeAnchor.from_tree(args.against, bl.free_port()), None
    else:
        anchor, relay = ensure_anchor(
            bench, args.anchor, "relay" in groups, "milter" in groups, anchors_started
        )
    sink_port = relay.sink_port if relay is not None else bl.free_port()
    # The server inherits it: 10,000 connections or IDLE sessions, and room.
    idle_conns.raise_fd_limit(32_000)
    po = bl.Postoffice(smarthost_port=sink_port)
    ctx = Context(args, bench, po, anchor, relay)
    started = time.monotonic()
    try:
        for user in LOGIN_USERS:
            po.add_user(user)
        po.start()
        print(f"postoffice pid {po.pid}, ports {po.ports}, data {po.root}", flush=True)
        print(f"  runs {imported_from(po.env)}", flush=True)
        if isinstance(anchor, bl.PostofficeAnchor):
            other = anchor.server
            other.add_user(bl.USER)
            other.start()
            print(f"{anchor.label} pid {other.pid}, ports {other.ports}, data {other.root}")
            print(f"  runs {imported_from(other.env)}", flush=True)
        for group in GROUPS:
            if group not in groups:
                continue
            print(f"== {group}", flush=True)
            {
                "smtp": smtp_workloads,
                "relay": relay_workload,
                "pop3": pop3_workloads,
                "login": login_workload,
                "idle": idle_workloads,
                "imap": imap_workloads,
                "milter": milter_workload,
            }[group](ctx)
    finally:
        servers = [po] + ([anchor.server] if isinstance(anchor, bl.PostofficeAnchor) else [])
        for server in servers:
            server.stop()
            if not args.keep:
                server.remove()
        stop_anchors(bench, anchors_started)
    print(
        f"\n{len(ctx.rows)} workloads, {args.runs} runs each, alternating; "
        f"{time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs; command: python bench/run.py {' '.join(sys.argv[1:])}\n"
    )
    if isinstance(anchor, bl.PostofficeAnchor):
        src = anchor.server.env["PYTHONPATH"]
        print(f"anchor = {anchor.label}: postoffice from {src}; ratio = this tree / baseline\n")
    print(table(ctx.rows))
    if args.json:
        with open(args.json, "a") as fh:
            for r in ctx.rows:
                extra = {"against": str(args.against)} if args.against else {}
                record = {"time": time.time(), **asdict(r), "ratios": r.ratios, **extra}
                fh.write(json.dumps(record) + "\n")
    return 1 if any(r.failed() for r in ctx.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
