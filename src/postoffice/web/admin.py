"""/admin: the pages for users flagged admin (``postoffice user admin``).

Every change goes through the code the CLI runs (policy/account_changes.py, the
account store, the queue store), in the I/O pool, and is refused with the
same words.  Reached only through ``WebApp.guarded(..., admin=True)``: a
session of a user flagged admin, from ``[web] admin_networks``.

- ``/admin``        counts, the queue's size and age, and the accounts:
                    domains, users (quota, admin flag) and aliases, with a
                    search and the forms to add and remove each;
- ``/admin/queue``  the outbound queue as ``queue list`` shows it, flush,
                    remove;
- ``/admin/trace``  ``?id=QUEUEID`` or an address: the records ``postoffice
                    trace`` prints, as a timeline.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from postoffice import metrics
from postoffice.config.settings import Settings
from postoffice.delivery.queue.records import PENDING, QUEUE_ID, QueueEntry, QueueError
from postoffice.delivery.queue.store import Removal
from postoffice.delivery.queue_cli import queue_store
from postoffice.mail.address import Address, AddressError, normalise_domain, parse_mailbox
from postoffice.net.http import Response, Routes
from postoffice.policy import account_changes
from postoffice.storage.accounts import AccountError
from postoffice.storage.maildir import ensure_maildir
from postoffice.trace import Record, log_files, parse_line, read_lines, select
from postoffice.web.app import Page, WebApp
from postoffice.web.dashboard import BAR_WIDTH, PLOT_HEIGHT, PLOT_WIDTH, plot

MAX_LISTED = 500  # rows of one table on a page (users, aliases, queue entries)
MAX_TRACE_RECORDS = 1000
MAX_SEARCH = 200
HEAD_READ = 64 * 1024  # octets of a queued message read for its header fields
SHOWN_FIELDS = ("From", "To", "Subject", "Date", "Message-ID")
MAX_FIELD_SHOWN = 300  # characters of one decoded field value


@dataclass(frozen=True, slots=True)
class UserRow:
    address: str
    admin: bool
    quota: str  # as `user quota` shows it: "default", "none", "10 MiB"
    quota_value: str  # as the form takes it back: "default", "none", bytes


@dataclass(frozen=True, slots=True)
class QueueRow:
    queue_id: str
    created: str
    size: int
    sender: str
    recipients: tuple[tuple[str, str, str], ...]  # address, state, last error


@dataclass(frozen=True, slots=True)
class TraceRow:
    time: str
    queue_id: str
    event: str
    fields: tuple[tuple[str, str], ...]


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _queue_rows(entries: Iterator[tuple[QueueEntry, int]]) -> tuple[list[QueueRow], int, float]:
    """At most MAX_LISTED rows; the count of all, and the oldest's age in seconds."""
    rows: list[QueueRow] = []
    count, oldest = 0, 0.0
    now = time.time()
    for entry, size in entries:
        count += 1
        env = entry.envelope
        oldest = max(oldest, now - env.created)
        if len(rows) >= MAX_LISTED:
            continue
        recipients = tuple(
            (str(r.address), r.state.value, r.last_error or "") for r in entry.recipients
        )
        rows.append(
            QueueRow(entry.queue_id, _when(env.created), size, str(env.sender or ""), recipients)
        )
    return rows, count, oldest


class AdminPages:
    def __init__(self, web: WebApp) -> None:
        self.web = web
        self.accounts = web.services.accounts

    @property
    def settings(self) -> Settings:
        return self.web.services.settings  # a reload replaces it

    # --- accounts ------------------------------------------------------------------
    def _accounts(self, query: str) -> dict[str, object]:
        q = query.strip().lower()
        store = self.accounts
        domains = sorted(set(store.list_domains()) | set(self.settings.domains))
        users = [
            UserRow(str(u), store.is_admin(u), *self._quota(u))
            for u in store.list_users()
            if q in str(u).lower()
        ]
        aliases = [
            (alias, ", ".join(str(t) for t in targets))
            for alias, targets in store.list_aliases().items()
            if q in alias.lower() or any(q in str(t).lower() for t in targets)
        ]
        return {
            "query": query,
            "domains": [d for d in domains if q in d],
            "config_domains": set(self.settings.domains),
            "users": users[:MAX_LISTED],
            "users_total": len(users),
            "aliases": aliases[:MAX_LISTED],
            "aliases_total": len(aliases),
        }

    def _quota(self, user: Address) -> tuple[str, str]:
        from postoffice.storage.quota import format_size

        own = self.accounts.quota(user)
        if own is None or own == 0:
            word = "default" if own is None else "none"
            return word, word
        return format_size(own), str(own)

    async def _dashboard(self) -> dict[str, object]:
        _rows, count, oldest = await self.web.blocking(self._queue)
        history = self.web.history
        await history.take()
        plots = [plot(name, history.hourly(name)) for name in metrics.TRAFFIC]
        plots.append(plot("queue", history.queue_hourly()))
        plots.append(plot("queue age (minutes)", history.queue_age_hourly()))
        return {
            "queue_count": count,
            "queue_oldest": int(oldest),
            "plots": plots,
            "plot_width": PLOT_WIDTH,
            "plot_height": PLOT_HEIGHT,
            "bar_width": BAR_WIDTH,
        }

    def _queue(self) -> tuple[list[QueueRow], int, float]:
        return _queue_rows(queue_store(self.settings).entries_blocking())

    async def show(self, page: Page, status: int = 200, **values: object) -> Response:
        query = page.request.query.get("q", "")[:MAX_SEARCH]
        listing = await self.web.blocking(self._accounts, query)
        dashboard = await self._dashboard()
        return self.web.page("admin.html", page, status, **listing, **dashboard, **values)

    async def view(self, page: Page) -> Response:
        return await self.show(page)

    async def change(self, page: Page) -> Response:
        """One accounts form: ``what`` (domain, user, alias) and ``action``."""
        form = page.form
        what, action = form.get("what", ""), form.get("action", "")
        try:
            done = await self.web.blocking(self._change, what, action, form)
        except (AccountError, AddressError) as exc:
            return await self.show(page, 400, error=str(exc))
        return await self.show(page, notice="\n".join(done))

    def _change(self, what: str, action: str, form: dict[str, str]) -> list[str]:
        store = self.accounts
        if what == "domain":
            name = form.get("name", "").strip()
            if action == "add":
                store.add_domain(name)
                shown = normalise_domain(name)
                return [f"added domain {shown}", f"next: add postmaster@{shown} as an alias"]
            if action == "remove":
                store.remove_domain(name)
                return [f"removed domain {normalise_domain(name)}"]
        elif what == "user":
            address = parse_mailbox(form.get("address", "").strip())
            if action == "add":
                maildir = account_changes.check_new_user(self.settings, store, address)
                password = account_changes.check_password(form.get("password", ""), address)
                from postoffice.policy.auth import PasswordHasher

                # Blocking, in the I/O pool like the CLI's hash: an admin
                # adding a user is rare, and the login flood guard is the
                # hashing pool's job, not this form's.
                store.add_user(address, PasswordHasher().hash(password))
                ensure_maildir(maildir)
                return [f"added user {address}"]
            if action == "remove":
                return account_changes.remove_user(
                    self.settings, store, address, force=form.get("force") == "on"
                )
            if action == "quota":
                return [account_changes.set_quota(store, address, form.get("size", ""))[1]]
        elif what == "alias":
            alias = form.get("alias", "").strip()
            if action == "add":
                targets = account_changes.parse_targets(
                    [t for t in form.get("targets", "").replace(",", " ").split() if t]
                )
                if not targets:
                    raise AccountError("an alias needs at least one target")
                warnings = account_changes.add_alias(store, alias, targets)
                return [f"added alias {alias} -> {', '.join(str(t) for t in targets)}", *warnings]
            if action == "remove":
                store.remove_alias(alias)
                return [f"removed alias {alias}"]
        raise AccountError("unknown change")

    # --- queue -----------------------------------------------------------------------
    async def queue(self, page: Page, status: int = 200, **values: object) -> Response:
        rows, count, oldest = await self.web.blocking(self._queue)
        return self.web.page(
            "queue.html",
            page,
            status,
            rows=rows,
            count=count,
            oldest=int(oldest),
            pending={s.value for s in PENDING},
            **values,
        )

    async def queue_change(self, page: Page) -> Response:
        action = page.form.get("action", "")
        if action == "flush":
            await self.web.blocking(self._flush)
            return await self.queue(page, notice="flush requested: every message is retried now")
        if action == "remove":
            queue_id = page.form.get("id", "")
            if not QUEUE_ID.fullmatch(queue_id):
                return await self.queue(page, 400, error="that is not a queue id")
            result = await self.web.blocking(queue_store(self.settings).remove_blocking, queue_id)
            if result is Removal.MISSING:
                return await self.queue(page, 404, error=f"no message {queue_id} in the queue")
            return await self.queue(page, notice=f"{queue_id}: removed")
        return await self.queue(page, 400, error="unknown action")

    def _flush(self) -> None:
        store = queue_store(self.settings)
        store.ensure_dirs()
        store.requests.request_flush_blocking()

    # --- trace -------------------------------------------------------------------------
    async def trace(self, page: Page) -> Response:
        wanted = page.request.query.get("id", "").strip()[:MAX_SEARCH]
        path = self.settings.log.file
        rows: list[TraceRow] = []
        error = ""
        if wanted and path is None:
            error = "[log] file is not set: the trace reads the mail log from a file"
        elif wanted:
            rows = await self.web.blocking(self._trace, path, wanted)
        queued: list[tuple[str, str]] = []
        if QUEUE_ID.fullmatch(wanted) and not self.settings.cluster.enabled:
            queued = await self.web.blocking(self._queued_fields, wanted)
        return self.web.page(
            "trace.html", page, wanted=wanted, rows=rows, error=error, queued=queued
        )

    def _queued_fields(self, queue_id: str) -> list[tuple[str, str]]:
        """The header fields an admin inspecting a queued message wants (From,
        To, Subject...), RFC 2047 decoded; [] when it is not in the queue.
        Sender-controlled text: the template escapes it."""
        store = queue_store(self.settings)
        try:
            entry = store.load_blocking(queue_id)
            if entry is None:
                return []
            with store.open_message_blocking(entry) as fh:
                head = fh.read(HEAD_READ)
        except (OSError, QueueError):
            return []
        end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0), default=-1)
        if end >= 0:
            head = head[:end]
        message = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        fields: list[tuple[str, str]] = []
        for name in SHOWN_FIELDS:
            try:
                value = message[name]
            except Exception:  # a malformed field: email's parser may raise anything
                value = None
            if value is not None:
                fields.append((name, str(value)[:MAX_FIELD_SHOWN]))
        return fields

    def _trace(self, path: Path, wanted: str) -> list[TraceRow]:
        files = log_files(path)

        def records() -> Iterator[Record]:
            for one in files:
                try:
                    for line in read_lines(one):
                        record = parse_line(line)
                        if record is not None:
                            yield record
                except (OSError, EOFError):
                    continue

        chosen = select(records, wanted)
        return [
            TraceRow(
                r.time.astimezone().isoformat(sep=" ", timespec="seconds"),
                r.queue_id,
                r.event,
                tuple((k, v) for k, v in r.fields.items() if k not in ("id", "event", "time")),
            )
            for r in itertools.islice(chosen, MAX_TRACE_RECORDS)
        ]


def add_routes(routes: Routes, web: WebApp) -> None:
    pages = AdminPages(web)
    routes.add("/admin", web.guarded(pages.view, admin=True))
    small = 16 * 1024
    routes.add("/admin/accounts", web.guarded(pages.change, admin=True), ("POST",), max_body=small)
    routes.add("/admin/queue", web.guarded(pages.queue, admin=True))
    routes.add(
        "/admin/queue/change",
        web.guarded(pages.queue_change, admin=True),
        ("POST",),
        max_body=small,
    )
    routes.add("/admin/trace", web.guarded(pages.trace, admin=True))
