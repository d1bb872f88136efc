"""``postoffice queue list|flush|remove ID``: the outbound queue from the shell.

Each works whether or not ``serve`` runs: ``list`` only reads the files
(written atomically, so always consistent); ``flush`` leaves a request the
running server picks up within a second (or the next start does);
``remove`` takes the message's lock, so it never races a delivery attempt —
if one is running, the removal happens as soon as the attempt ends.  With
``[cluster] database`` the three act on the queue in PostgreSQL, shared by
every node, in the same way (delivery/queue/pg_store.py).

Handlers follow cli.py's contract: ``fn(args, settings) -> int``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from postoffice.config.settings import Settings
from postoffice.delivery.queue.records import PENDING, QUEUE_ID, QueueEntry, RecipientState
from postoffice.delivery.queue.store import QueueStore, Removal

if TYPE_CHECKING:
    from postoffice.delivery.queue.pg_store import PgQueueStore

_T = TypeVar("_T")

FLUSH_WAIT = 3.0  # seconds `queue flush` waits to see a running server take the request


def queue_store(settings: Settings) -> QueueStore:
    # The CLI only calls the blocking methods; the executor is never used.
    return QueueStore(settings.queue_dir, ThreadPoolExecutor(max_workers=1))


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def queue_list(args: argparse.Namespace, settings: Settings) -> int:
    count = 0
    out = sys.stdout
    if settings.cluster.enabled:
        return _cluster_list(settings)
    for entry, size in queue_store(settings).entries_blocking():
        count += 1
        for line in entry_lines(entry, size):
            print(line, file=out)
    print(f"{count} message(s) in the queue", file=out)
    return 0


def _in_cluster(settings: Settings, action: Callable[[PgQueueStore], _T]) -> _T | None:
    """``action`` on the [cluster] queue; None (said on stderr) if the
    database cannot be used."""
    # Imported here: the embedded default never loads the driver.
    from postoffice.cluster.db import ClusterError
    from postoffice.delivery.queue.pg_store import PgQueueStore
    from postoffice.delivery.queue.records import QueueError

    try:
        store = PgQueueStore(settings.cluster.database, "cli", ThreadPoolExecutor(max_workers=1))
        try:
            return action(store)
        finally:
            store.close()
    except (ClusterError, QueueError) as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return None


def _cluster_list(settings: Settings) -> int:
    """The queue every [cluster] node shares, with the node working on each
    message right now (its claim's lease has not ended)."""
    found = _in_cluster(settings, lambda q: (q.holders_blocking(), list(q.entries_blocking())))
    if found is None:
        return 1
    holders, listed = found
    for entry, size in listed:
        lines = entry_lines(entry, size)
        holder = holders.get(entry.queue_id)
        if holder is not None:
            lines[0] += f"  (being delivered by {holder})"
        for line in lines:
            print(line)
    print(f"{len(listed)} message(s) in the [cluster] queue")
    return 0


def entry_lines(entry: QueueEntry, size: int) -> list[str]:
    """A queued message as ``queue list`` (and ``trace``) shows it: a line for
    the message, one (or two, with the last error) per recipient."""
    env = entry.envelope
    lines = [f"{entry.queue_id}  {_when(env.created)}  {size:>9}  from <{env.sender or ''}>"]
    for r in entry.recipients:
        line = f"    {r.state.value:<9} <{r.address}>"
        if r.state in PENDING:
            line += f"  next try {_when(r.next_try)}"
        if r.attempts:
            line += f"  tries {r.attempts}"
        if r.last_error and r.state is not RecipientState.DELIVERED:
            line += f"\n              {r.last_error}"
        lines.append(line)
    return lines


def queue_flush(args: argparse.Namespace, settings: Settings) -> int:
    if settings.cluster.enabled:
        count = _in_cluster(settings, lambda q: q.flush_blocking())
        if count is None:
            return 1
        print(f"flush requested; {count} message(s) due now on every node")
        return 0
    store = queue_store(settings)
    store.ensure_dirs()
    request = store.requests.request_flush_blocking()
    deadline = time.monotonic() + FLUSH_WAIT
    while time.monotonic() < deadline and request.exists():
        time.sleep(0.05)
    if request.exists():
        print("flush requested; the server will retry every message when it next runs")
    else:
        print("flush requested; the running server is retrying every message now")
    return 0


def queue_remove(args: argparse.Namespace, settings: Settings) -> int:
    queue_id: str = args.queue_id
    if not QUEUE_ID.fullmatch(queue_id):
        print(f"postoffice: {queue_id!r} is not a queue id", file=sys.stderr)
        return 1
    if settings.cluster.enabled:
        removal = _in_cluster(settings, lambda q: q.remove_blocking(queue_id))
        if removal is None:
            return 1
        result = removal
    else:
        result = queue_store(settings).remove_blocking(queue_id)
    if result is Removal.MISSING:
        print(f"postoffice: no message {queue_id} in the queue", file=sys.stderr)
        return 1
    if result is Removal.REQUESTED:
        print(f"{queue_id}: being delivered right now; removed when this attempt ends")
    else:
        print(f"{queue_id}: removed")
    return 0


def add_queue_parser(subparsers: Any) -> None:
    """Add ``queue list|flush|remove ID`` to the CLI's subcommands."""
    summary = "the outbound queue: list, flush (retry now), remove"
    group = subparsers.add_parser(
        "queue",
        help=summary,
        description=summary,
        epilog="examples:\n"
        "  postoffice queue list\n"
        "  postoffice queue flush\n"
        "  postoffice queue remove 19c4a1f2b3d4e5f6a7b",
    )
    group.set_defaults(handler=None, help_parser=group)
    commands = group.add_subparsers(title="commands", metavar="COMMAND")
    leaves = (
        ("list", "show queued messages and each recipient's state", queue_list),
        ("flush", "retry every queued message now", queue_flush),
        ("remove", "delete a message from the queue (no bounce is sent)", queue_remove),
    )
    for name, help_text, handler in leaves:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        parser.set_defaults(handler=handler)
        if name == "remove":
            parser.add_argument("queue_id", metavar="ID", help="a queue id from `queue list`")
