"""The IMAP commands that work on mailboxes (RFC 9051 §6.3, §6.4).

``MailboxCommands`` is the part of ``ImapSession`` (net/imap_session.py)
that answers LIST, STATUS, CREATE, DELETE, RENAME, (UN)SUBSCRIBE, SELECT,
EXAMINE, CLOSE, UNSELECT, APPEND, FETCH, STORE, SEARCH, EXPUNGE, COPY and
MOVE, kept apart so each file reads in one sitting.  Storage work runs in
the executor through ``ImapMailbox`` (storage/imap_mailbox.py).

CONDSTORE and QRESYNC (RFC 7162) ride on the index's mod-sequences: once a
CONDSTORE enabling command was seen (§3.1), every FETCH response with FLAGS
carries MODSEQ; once QRESYNC is enabled (§3.2.3), expunges are told as
VANISHED (§3.2.10).  QUOTA (RFC 9208) shows the Maildir++ quota POP3 and
``postoffice user quota`` show (storage/quota.py): one root, "", for all the
user's folders, so MOVE between them never changes the usage.
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, TypeVar

from postoffice import maillog
from postoffice.filters.learn import MAX_LEARN_PER_COMMAND, learn_kind
from postoffice.mail.address import Address
from postoffice.net import imap_fetch_items as items
from postoffice.net.imap_readahead import ReadAhead
from postoffice.protocol import imap_events as ev
from postoffice.protocol.imap import ImapServerCore
from postoffice.protocol.imap_events import SequenceSet
from postoffice.protocol.imap_fetch import FetchMessage
from postoffice.protocol.imap_response import Atom, Mailbox, ResponseCode, Value
from postoffice.services import Services
from postoffice.storage import folder_names, quota
from postoffice.storage.folder_names import FolderName, FolderNameError
from postoffice.storage.folders import FolderInfo, special_use_of
from postoffice.storage.imap_index import (
    ExpungeResult,
    FolderState,
    MessageRecord,
    RecentUids,
    StoreMode,
    Structure,
)
from postoffice.storage.imap_mailbox import ImapMailbox
from postoffice.storage.maildir_flags import MessageGone

T = TypeVar("T")

FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
# FETCH works in batches, one executor hop each: messages whose files are
# read, up to FETCH_BATCH_BYTES of them (bounding the memory one FETCH
# holds) or FETCH_BATCH of them; INDEX_BATCH when no file is read.
FETCH_BATCH = 256
FETCH_BATCH_BYTES = 4 * 1024 * 1024
INDEX_BATCH = 2048
_STORE_MODES = {"": StoreMode.REPLACE, "+": StoreMode.ADD, "-": StoreMode.REMOVE}
# The commands that number messages or read their flags: the view is read
# before them (``load_view``).
_NEEDS_VIEW = (ev.Fetch, ev.Store, ev.Search, ev.Expunge, ev.Copy, ev.Close)
_STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "RECENT")


def uid_set(uids: Iterable[int]) -> str:
    """``1:3,7`` for UIDs (RFC 9051 §9 sequence-set), ascending runs."""
    out: list[str] = []
    run: list[int] = []
    for uid in sorted(set(uids)):
        if run and uid == run[-1] + 1:
            run.append(uid)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}")
        run = [uid]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}")
    return ",".join(out)


def pattern_regex(reference: str, pattern: str) -> re.Pattern[str]:
    """LIST's ``*`` (anything) and ``%`` (no separator) as a regex
    (RFC 9051 §6.3.9); INBOX matches in any case."""
    text = reference + pattern
    out = []
    for ch in text:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append(r"[^.]*")
        else:
            out.append(re.escape(ch))
    body = "".join(out)
    if text[:5].upper() == "INBOX":
        body = "(?i:INBOX)" + "".join(out[5:])
    return re.compile(body + r"\Z", re.DOTALL)


class MailboxCommands:
    """Mailbox commands for ``ImapSession``; it provides what is declared here."""

    core: ImapServerCore
    selected: FolderName | None
    readonly: bool
    uids: list[int]
    records: dict[int, MessageRecord]
    modseq: int
    unloaded: FolderState | None  # SELECT's state until the view is read
    ghosts: set[int]
    recent: RecentUids
    read_ahead: ReadAhead
    s: Services
    user: Address | None
    client_ip: str

    # Provided by ImapSession.
    def _send(self, data: bytes) -> None: ...
    def _ok(self, text: str, code: ResponseCode | None = None) -> None: ...
    def _no(self, text: str, code: str | ResponseCode | None = None) -> None: ...
    def _bad(self, text: str) -> None: ...
    async def _flush(self) -> None: ...
    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _report_changes(self) -> None: ...
    def watch_selected(self, box: ImapMailbox, folder: FolderName) -> None: ...
    def unwatch(self) -> None: ...

    # --- the view ----------------------------------------------------------------------
    def seq_of(self, uid: int) -> int:
        return bisect.bisect_left(self.uids, uid) + 1

    def forget(self, uid: int) -> None:
        """``uid`` expunged: send its EXPUNGE and drop it from the view."""
        self.forget_all((uid,))

    def forget_all(self, uids: Iterable[int]) -> None:
        """``uids`` expunged: drop them from the view, telling the client one
        EXPUNGE each, or with QRESYNC one VANISHED for all (RFC 7162 §3.2.10)."""
        gone = [u for u in uids if u in self.records]
        vanished = "QRESYNC" in self.core.enabled
        for uid in gone:
            seq = self.seq_of(uid)
            if not vanished:
                self._send(self.core.untagged(seq, Atom("EXPUNGE")))
            del self.uids[seq - 1]
            del self.records[uid]
            self.ghosts.discard(uid)
        if vanished and gone:
            self._send(self.core.untagged(Atom("VANISHED"), Atom(uid_set(gone))))
        if self.recent and any(u in self.recent for u in gone):
            # RFC 3501 §7.3.2: the count of recent messages changed (Dovecot
            # says so too).
            self._send(self.core.untagged(self.recent_count(), Atom("RECENT")))

    def condstore_on(self) -> None:
        """A CONDSTORE enabling command (RFC 7162 §3.1): from now on every
        FETCH response with FLAGS carries MODSEQ too."""
        self.core.enable("CONDSTORE")

    def flag_values(self, record: MessageRecord, uid: bool = True) -> list[Value]:
        """FLAGS (and UID, and MODSEQ once CONDSTORE is on, RFC 7162 §3.1.4)
        of a FETCH response telling a flag change."""
        flags = sorted(record.flags | items.RECENT if record.uid in self.recent else record.flags)
        values: list[Value] = [Atom("FLAGS"), [Atom(f) for f in flags]]
        if uid:
            values += [Atom("UID"), record.uid]
        if "CONDSTORE" in self.core.enabled:
            values += [Atom("MODSEQ"), [record.modseq]]
        return values

    def clear_view(self) -> None:
        self.unwatch()
        self.selected = None
        self.records = {}
        self.uids = []
        self.modseq = 0
        self.unloaded = None
        self.ghosts = set()
        self.recent = RecentUids()
        self.read_ahead.clear()

    @property
    def rev1(self) -> bool:
        """The client did not ENABLE IMAP4rev2: it gets rev1's \\Recent."""
        return "IMAP4REV2" not in self.core.enabled

    def recent_count(self) -> int:
        """RECENT: the view's messages this session holds as \\Recent."""
        uids = self.uids
        return sum(
            bisect.bisect_left(uids, below) - bisect.bisect_left(uids, first)
            for first, below in self.recent.runs
        )

    async def load_view(self, box: ImapMailbox) -> None:
        """Read the selected folder's messages, once, when a command first
        needs them: SELECT itself reads only the folder's counters, so that
        opening a 100,000-message folder costs no row per message.

        The view is what SELECT told the client: messages that arrived since
        are left to the next refresh (reported as new); those expunged since
        stay numbered as *ghosts* (placeholders no command touches) until
        that refresh reports their EXPUNGE (RFC 9051 §7.5.1: numbers must
        not shift unannounced)."""
        state, folder = self.unloaded, self.selected
        if state is None or folder is None:
            return
        view = await self._blocking(box.view, folder, state)
        self.unloaded = None
        self.records = {r.uid: r for r in view.records}
        for uid in view.expunged:
            self.records[uid] = MessageRecord(uid, "", "", frozenset(), 0, 0, 0)
        self.ghosts = set(view.expunged)
        self.uids = sorted(self.records)

    def _targets(self, uid: bool, sequence: SequenceSet) -> list[MessageRecord] | None:
        """The records a sequence set names, ascending; None (answered BAD) for ``$``."""
        if sequence.saved:
            self._bad("The saved search result ($) is not supported")
            return None
        if not self.uids:
            return []
        if uid:
            uids, records = self.uids, self.records
            found = [records[uids[i]] for i in sequence.positions(uids)]
        else:
            found = [self.records[self.uids[n - 1]] for n in sequence.resolve(len(self.uids))]
        if self.ghosts:
            found = [r for r in found if r.uid not in self.ghosts]
        return found

    def _name(self, name: str) -> FolderName | None:
        try:
            return folder_names.parse(name)
        except FolderNameError as exc:
            self._no(str(exc), "CANNOT")
            return None

    # --- dispatch --------------------------------------------------------------------------
    async def mailbox_command(self, box: ImapMailbox, event: ev.Event) -> None:
        if not isinstance(event, ev.Fetch):
            self.read_ahead.clear()  # held only while a client fetches one by one
        if isinstance(event, _NEEDS_VIEW):
            await self.load_view(box)
        match event:
            case ev.ListMailboxes():
                await self._list(box, event)
            case ev.Status(mailbox=name, items=wanted):
                if "HIGHESTMODSEQ" in wanted:
                    self.condstore_on()
                folder = self._name(name)
                if folder is not None:
                    self._send(await self._status_line(box, folder, wanted))
                    self._ok("STATUS completed")
            case ev.Create(mailbox=name, special_use=use):
                folder = self._name(name.rstrip("."))
                if folder is not None:
                    await self._blocking(box.folders.create, folder, use[0] if use else None)
                    self._ok("CREATE completed")
            case ev.Delete(mailbox=name):
                folder = self._name(name)
                if folder is not None:
                    await self._blocking(box.delete, folder)
                    self._ok("DELETE completed")
            case ev.Rename(mailbox=old, new_name=new):
                src, dst = self._name(old), self._name(new)
                if src is not None and dst is not None:
                    await self._rename(box, src, dst)
            case ev.Subscribe(mailbox=name) | ev.Unsubscribe(mailbox=name):
                folder = self._name(name)
                if folder is not None:
                    call = box.index.subscribe
                    if isinstance(event, ev.Unsubscribe):
                        call = box.index.unsubscribe
                    await self._blocking(call, folder.imap())
                    self._ok("Done")
            case ev.Select():
                await self._select(box, event)
            case ev.Close() | ev.Unselect():
                if isinstance(event, ev.Close) and not self.readonly and self.selected:
                    deleted = [r for r in self.records.values() if "\\Deleted" in r.flags]
                    if deleted:
                        await self._expunged(box, self.selected, deleted)
                self.clear_view()
                self._ok("Closed")
            case ev.Append():
                await self._append(box, event)
            case ev.Fetch():
                await self._fetch(box, event)
            case ev.Store():
                await self._store(box, event)
            case ev.Search():
                await self._search(box, event)
            case ev.Expunge(uids=uids):
                await self._expunge(box, uids)
            case ev.Copy():
                await self._copy(box, event)
            case ev.GetQuotaRoot() | ev.GetQuota():
                await self._quota(box, event)
            case _:
                self._bad("Command not supported")

    # --- LIST, STATUS -------------------------------------------------------------
    async def _list(self, box: ImapMailbox, event: ev.ListMailboxes) -> None:
        patterns = event.patterns
        if not event.lsub and patterns == ("",):
            # RFC 9051 §6.3.9: the empty pattern asks for the separator.
            self._send(self.core.untagged(Atom("LIST"), [Atom("\\Noselect")], ".", ""))
            self._ok("LIST completed")
            return
        folders: list[FolderInfo] = await self._blocking(box.folders.list_folders)
        subscribed = set(await self._blocking(box.index.subscriptions))
        regexes = [pattern_regex(event.reference, p) for p in patterns]
        only_subscribed = event.lsub or "SUBSCRIBED" in event.selection
        show_subscribed = "SUBSCRIBED" in event.return_options or "SUBSCRIBED" in event.selection
        kind = "LSUB" if event.lsub else "LIST"
        for info in folders:
            name = info.name.imap()
            if not any(r.match(name) for r in regexes):
                continue
            if only_subscribed and name not in subscribed:
                continue
            if "SPECIAL-USE" in event.selection and not (info.special_use and info.selectable):
                continue  # RFC 6154 §3: the selection option lists special-use mailboxes only
            attrs = list(info.attributes())
            if show_subscribed and name in subscribed:
                attrs.append("\\Subscribed")
            self._send(self.core.untagged(Atom(kind), [Atom(a) for a in attrs], ".", Mailbox(name)))
            if event.status_items and info.selectable:
                self._send(await self._status_line(box, info.name, event.status_items))
        self._ok(f"{kind} completed")

    async def _status_line(
        self, box: ImapMailbox, folder: FolderName, wanted: Sequence[str]
    ) -> bytes:
        status = await self._blocking(box.status, folder)
        values: dict[str, int] = {
            "MESSAGES": status.messages,
            "UIDNEXT": status.state.uidnext,
            "UIDVALIDITY": status.state.uidvalidity,
            "UNSEEN": status.unseen,
            "DELETED": status.deleted,
            "SIZE": status.size,
            "RECENT": (
                await self._blocking(box.index.recent_count, folder.imap())
                if "RECENT" in wanted
                else 0
            ),
            "HIGHESTMODSEQ": status.state.highestmodseq,
        }
        out: list[Value] = []
        for item in wanted:
            if item in values:
                out += [Atom(item), values[item]]
        return self.core.untagged(Atom("STATUS"), Mailbox(folder.imap()), out)

    async def _rename(self, box: ImapMailbox, src: FolderName, dst: FolderName) -> None:
        await self._blocking(box.folders.rename, src, dst)
        index = box.index
        if src.is_inbox:
            # INBOX's messages moved to a new folder: the index sees them there
            # at the next sync, and INBOX's old records vanish likewise.
            await self._blocking(box.sync, src)
        else:
            for state in await self._blocking(index.folders):
                old = folder_names.parse(state.name)
                if old == src or old.is_under(src):
                    await self._blocking(
                        index.rename_folder, state.name, old.moved(src, dst).imap()
                    )
        self._ok("RENAME completed")

    # --- SELECT, EXAMINE ----------------------------------------------------------
    async def _select(self, box: ImapMailbox, event: ev.Select) -> None:
        if event.qresync is not None and "QRESYNC" not in self.core.enabled:
            # RFC 7162 §3.2.5: QRESYNC without ENABLE QRESYNC is BAD.
            self._bad("ENABLE QRESYNC first")
            return
        if event.condstore:
            self.condstore_on()
        was_selected = self.selected is not None
        self.clear_view()
        folder = self._name(event.mailbox)
        if folder is None:
            return
        try:
            state = await self._blocking(box.select, folder)
        except BaseException:
            if was_selected:
                self._send(
                    self.core.untagged_status(
                        "OK", "Previous mailbox closed", ResponseCode("CLOSED")
                    )
                )
            raise
        core = self.core
        if was_selected:
            core_code = ResponseCode("CLOSED")
            self._send(core.untagged_status("OK", "Previous mailbox closed", core_code))
        self.selected = folder
        self.watch_selected(box, folder)
        self.readonly = event.readonly
        self.unloaded = state
        self.modseq = state.highestmodseq
        flags = [Atom(f) for f in FLAGS]
        self._send(core.untagged(state.messages, Atom("EXISTS")))
        if self.rev1:
            first, count = await self._blocking(
                recent_since, box, folder, state.uidnext, not event.readonly
            )
            self.recent.add(first, state.uidnext)
            self._send(core.untagged(count, Atom("RECENT")))
        self._send(core.untagged(Atom("FLAGS"), flags))
        if "IMAP4REV2" not in core.enabled:
            # RFC 3501 §6.3.1: a rev1 client is told the first unseen
            # message; RFC 9051 dropped OK [UNSEEN] (Appendix E).
            unseen = await self._blocking(box.index.first_unseen, folder.imap(), state.uidnext)
            if unseen is not None:
                self._send(
                    core.untagged_status("OK", "First unseen", ResponseCode("UNSEEN", (unseen,)))
                )
        permanent: list[Value] = [] if event.readonly else [*flags, Atom("\\*")]
        send = core.untagged_status
        self._send(send("OK", "Flags permitted", ResponseCode("PERMANENTFLAGS", (permanent,))))
        self._send(send("OK", "UIDs valid", ResponseCode("UIDVALIDITY", (state.uidvalidity,))))
        self._send(send("OK", "Predicted next UID", ResponseCode("UIDNEXT", (state.uidnext,))))
        code = ResponseCode("HIGHESTMODSEQ", (state.highestmodseq,))
        self._send(send("OK", "Highest", code))
        if event.qresync is not None and event.qresync.uidvalidity == state.uidvalidity:
            await self.load_view(box)
            await self._resync(box, folder, event.qresync)
        mode = "READ-ONLY" if event.readonly else "READ-WRITE"
        self._ok(f"{'EXAMINE' if event.readonly else 'SELECT'} completed", ResponseCode(mode))

    async def _resync(self, box: ImapMailbox, folder: FolderName, qr: ev.QresyncParams) -> None:
        """RFC 7162 §3.2.5.1: what changed since the client's ``modseq``: the
        expunged UIDs as VANISHED (EARLIER), the changed messages as FETCH;
        only among ``known_uids`` when given.  Every expunge is kept in the
        index with its mod-sequence, so the seq-match hint is not needed."""
        largest = self.uids[-1] if self.uids else 0
        known = qr.known_uids

        def wanted(uid: int) -> bool:
            return known is None or known.contains(uid, max(largest, uid))

        vanished = await self._blocking(box.index.vanished_since, folder.imap(), qr.modseq)
        gone = [u for u in vanished if wanted(u) and u not in self.records]
        if gone:
            self._send(self.core.untagged(Atom("VANISHED"), [Atom("EARLIER")], Atom(uid_set(gone))))
        for uid in self.uids:
            record = self.records[uid]
            if record.modseq > qr.modseq and wanted(uid) and uid not in self.ghosts:
                self._send(
                    self.core.untagged(self.seq_of(uid), Atom("FETCH"), self.flag_values(record))
                )

    # --- APPEND -------------------------------------------------------------------
    async def _append(self, box: ImapMailbox, event: ev.Append) -> None:
        folder = self._name(event.mailbox)
        if folder is None:
            return
        if not await self._blocking(box.folders.exists, folder):
            self._no("No such mailbox", "TRYCREATE")
            return
        if await self._over_quota(box, len(event.message)):
            return
        when = event.internal_date
        stamp = int(when.timestamp()) if when is not None else _now()
        validity, uid = await self._blocking(box.append, folder, event.message, event.flags, stamp)
        if self.selected == folder:
            await self._report_changes()
        self._ok("APPEND completed", ResponseCode("APPENDUID", (validity, uid)))

    # --- FETCH, STORE, SEARCH -----------------------------------------------------
    async def _fetch(self, box: ImapMailbox, event: ev.Fetch) -> None:
        targets = self._targets(event.uid, event.sequence)
        if targets is None or self.selected is None:
            return
        folder = self.selected
        fetch = event.items
        if event.uid and not any(i.name == "UID" for i in fetch):
            fetch = (ev.FetchItem("UID"), *fetch)  # RFC 9051 §6.4.9: UID FETCH includes UID
        if event.changed_since is not None or any(i.name == "MODSEQ" for i in fetch):
            self.condstore_on()
        if event.vanished and "QRESYNC" not in self.core.enabled:
            self._bad("ENABLE QRESYNC first")  # RFC 7162 §3.2.6
            return
        if event.changed_since is not None:
            targets = [r for r in targets if r.modseq > event.changed_since]
            if event.vanished:
                await self._vanished_earlier(box, event.sequence, event.changed_since)
        if any(i.name == "INTERNALDATE" for i in fetch):
            targets = await self._dated(box, targets)
        if items.sets_seen(fetch) and not self.readonly:
            unseen = [r for r in targets if "\\Seen" not in r.flags]
            if unseen:
                result = await self._blocking(box.store, folder, unseen, StoreMode.ADD, ["\\Seen"])
                for record in result.changed:
                    self.records[record.uid] = record
                if not any(i.name == "FLAGS" for i in fetch):
                    fetch = (*fetch, ev.FetchItem("FLAGS"))
                targets = [self.records[r.uid] for r in targets]
        # RFC 7162 §3.1.4.1: CHANGEDSINCE implies MODSEQ; §3.1.4: with
        # CONDSTORE on, so does FLAGS.
        names = {i.name for i in fetch}
        with_flags = "CONDSTORE" in self.core.enabled and "FLAGS" in names
        if "MODSEQ" not in names and (event.changed_since is not None or with_flags):
            fetch = (*fetch, ev.FetchItem("MODSEQ"))
        structural = items.structural(fetch)
        # Bodies are held per batch: a small batch bounds memory; answers
        # from the index alone (flags, cached structures) go in big ones.
        reads = items.needs_body(fetch, _NO_RECORD, _NO_STRUCTURE)
        utf8 = self.core.utf8
        recent = self.recent
        whole = items.retrieves(fetch)
        one = reads and not structural and len(targets) == 1  # mbsync's way: see _load_one
        for batch in _batches(targets, reads):
            loaded = _NOTHING_LOADED
            if one:
                loaded = await self._load_one(box, folder, fetch, batch[0])
            elif structural or any(items.needs_body(fetch, r) for r in batch):
                loaded = await self._blocking(_load, box, folder, fetch, batch, structural)
            bodies, structures = loaded.bodies, loaded.structures
            send = self._send
            for record in batch:
                message = bodies.get(record.uid)
                if record.uid in bodies and message is None:
                    continue  # expunged by someone else: reported at the next NOOP
                held = bool(recent) and record.uid in recent
                for chunk in items.fetch_response(
                    self.seq_of(record.uid),
                    fetch,
                    record,
                    message,
                    structures.get(record.uid),
                    utf8=utf8,
                    recent=held,
                ):
                    send(chunk)
            if whole:  # the mail log: which messages were downloaded (maillog.py)
                sent = [r.stem for r in batch if bodies.get(r.uid) is not None]
                maillog.retrieved("imap", user=self.user, client=self.client_ip, files=sent)
            await self._flush()
        self._ok("FETCH completed")

    async def _load_one(
        self,
        box: ImapMailbox,
        folder: FolderName,
        fetch: tuple[ev.FetchItem, ...],
        record: MessageRecord,
    ) -> _Loaded:
        """The one message a FETCH needs the text of, through the session's
        read-ahead (net/imap_readahead.py): held already, or read in one
        executor hop with the messages a client going through the folder in
        order asks for next."""
        held = self.read_ahead.take(record.uid, self.uids)
        if held is not None:
            return _Loaded({record.uid: held}, {})
        along = self.read_ahead.plan(record.uid, self.uids, self.records, self.ghosts)
        loaded = await self._blocking(_load, box, folder, fetch, [record, *along], False)
        self.read_ahead.keep({r.uid: loaded.bodies.get(r.uid) for r in along})
        return loaded

    async def _dated(self, box: ImapMailbox, records: list[MessageRecord]) -> list[MessageRecord]:
        """``records`` with their INTERNALDATEs read (the first sync of a
        folder leaves them to be read when first needed), in the view too."""
        if self.selected is None or all(r.internaldate for r in records):
            return records
        dated = await self._blocking(box.with_dates, self.selected, records)
        for record in dated:
            if record.uid in self.records:
                self.records[record.uid] = record
        return dated

    async def _vanished_earlier(self, box: ImapMailbox, uids: SequenceSet, since: int) -> None:
        """UID FETCH (CHANGEDSINCE n VANISHED): the UIDs of ``uids`` expunged
        after ``since``, as VANISHED (EARLIER), before the FETCHes (§3.2.6)."""
        assert self.selected is not None
        found = await self._blocking(box.index.vanished_since, self.selected.imap(), since)
        largest = self.uids[-1] if self.uids else 0
        gone = [u for u in found if uids.contains(u, max(largest, u))]
        if gone:
            self._send(self.core.untagged(Atom("VANISHED"), [Atom("EARLIER")], Atom(uid_set(gone))))

    async def _store(self, box: ImapMailbox, event: ev.Store) -> None:
        targets = self._targets(event.uid, event.sequence)
        if targets is None or self.selected is None:
            return
        if self.readonly:
            self._no("The mailbox is read-only", "READ-ONLY")  # not an RFC 5530 code, but clear
            return
        if event.unchanged_since is not None:
            self.condstore_on()
        mode = _STORE_MODES[event.mode]
        result = await self._blocking(
            box.store, self.selected, targets, mode, event.flags, event.unchanged_since
        )
        for record in result.changed:
            self.records[record.uid] = record
        modified = set(result.modified)
        changed = {r.uid for r in result.changed}
        condstore = "CONDSTORE" in self.core.enabled
        for record in targets:
            if record.uid in modified:
                continue  # RFC 7162 §3.1.3: no FETCH for what failed the test
            now = self.records[record.uid]
            values: list[Value]
            if not event.silent:
                values = self.flag_values(now, event.uid)
            elif condstore and now.uid in changed:
                # RFC 7162 §3.1.3: .SILENT still tells the new MODSEQ.
                values = [Atom("MODSEQ"), [now.modseq]]
                if event.uid:
                    values = [Atom("UID"), now.uid, *values]
            else:
                continue
            self._send(self.core.untagged(self.seq_of(now.uid), Atom("FETCH"), values))
        code = None
        if modified:
            # RFC 7162 §3.1.3: sequence numbers for STORE, UIDs for UID STORE.
            failed = modified if event.uid else {self.seq_of(u) for u in modified}
            code = ResponseCode("MODIFIED", (Atom(uid_set(failed)),))
        self._ok("STORE completed", code)

    async def _search(self, box: ImapMailbox, event: ev.Search) -> None:
        if self.selected is None:
            self._bad("No mailbox selected")
            return
        if event.charset not in (None, "UTF-8", "US-ASCII"):
            self._no("Unsupported charset", ResponseCode("BADCHARSET", ([Atom("UTF-8")],)))
            return
        if _uses_internaldate(event.criteria):
            present = [self.records[u] for u in self.uids if u not in self.ghosts]
            await self._dated(box, present)
        numbered = [
            (seq, self.records[u]) for seq, u in enumerate(self.uids, 1) if u not in self.ghosts
        ]
        hits = await self._blocking(
            _search_all, box, self.selected, event.criteria, numbered, len(self.uids), self.recent
        )
        numbers = hits if event.uid else [self.seq_of(u) for u in hits]
        # RFC 7162 §3.1.5: SEARCH MODSEQ answers the highest mod-sequence found.
        highest: list[Value] = []
        if _uses_modseq(event.criteria):
            self.condstore_on()
            if hits:
                highest = [Atom("MODSEQ"), max(self.records[u].modseq for u in hits)]
        esearch = event.return_options is not None or "IMAP4REV2" in self.core.enabled
        if not esearch:
            tail: list[Value] = [highest] if highest else []
            self._send(self.core.untagged(Atom("SEARCH"), *numbers, *tail))
        else:
            values: list[Value] = [Atom("ESEARCH"), [Atom("TAG"), event.tag]]
            if event.uid:
                values.append(Atom("UID"))
            options = event.return_options or ("ALL",)
            if numbers and "MIN" in options:
                values += [Atom("MIN"), min(numbers)]
            if numbers and "MAX" in options:
                values += [Atom("MAX"), max(numbers)]
            if "COUNT" in options:
                values += [Atom("COUNT"), len(numbers)]
            if numbers and ("ALL" in options or not options):
                values += [Atom("ALL"), Atom(uid_set(numbers))]
            values += highest  # RFC 7162 §3.1.5 with RFC 4731 ESEARCH
            self._send(self.core.untagged(*values))
        self._ok("SEARCH completed")

    # --- EXPUNGE, COPY, MOVE ------------------------------------------------------
    async def _expunge(self, box: ImapMailbox, uids: SequenceSet | None) -> None:
        if self.selected is None:
            return
        if self.readonly:
            self._no("The mailbox is read-only", "READ-ONLY")
            return
        doomed = [r for r in self.records.values() if "\\Deleted" in r.flags]
        if uids is not None and self.uids:
            doomed = [r for r in doomed if uids.contains(r.uid, self.uids[-1])]
        if doomed:
            result = await self._expunged(box, self.selected, doomed)
            self.forget_all(result.expunged)
        await self._report_changes()
        self._ok("EXPUNGE completed")

    async def _expunged(
        self, box: ImapMailbox, folder: FolderName, doomed: list[MessageRecord]
    ) -> ExpungeResult:
        """EXPUNGE (or CLOSE) ``doomed``: one mail log record per message removed."""
        result = await self._blocking(box.expunge, folder, doomed)
        gone = set(result.expunged)
        stems = [r.stem for r in doomed if r.uid in gone]
        maillog.deleted("imap", user=self.user, client=self.client_ip, files=stems)
        return result

    async def _copy(self, box: ImapMailbox, event: ev.Copy) -> None:
        targets = self._targets(event.uid, event.sequence)
        target = self._name(event.mailbox)
        if targets is None or target is None or self.selected is None:
            return
        if not await self._blocking(box.folders.exists, target):
            self._no("No such mailbox", "TRYCREATE")
            return
        if event.move and self.readonly:
            self._no("The mailbox is read-only", "READ-ONLY")
            return
        if event.move and target == self.selected:
            self._no("Cannot move into the same mailbox", "CANNOT")
            return
        # MOVE stays within the user's one quota root: only COPY adds usage.
        if not event.move and await self._over_quota(box, sum(r.size for r in targets)):
            return
        learner, kind = self.s.spam_learner, None
        if learner is not None:
            kind = learn_kind(special_use_of(self.selected), special_use_of(target))
        # Opened before a MOVE renames them; read and sent in the background.
        files = await self._blocking(_open_all, box, self.selected, targets) if kind else []
        copy = partial(box.copy, move=event.move)
        try:
            result = await self._blocking(copy, self.selected, target, targets)
        except BaseException:
            for f in files:
                f.close()
            raise
        if learner is not None and kind is not None:
            learner.learn(kind, files)
        code = None
        if result.pairs:
            sources = Atom(uid_set(a for a, _b in result.pairs))
            created = Atom(uid_set(b for _a, b in result.pairs))
            code = ResponseCode("COPYUID", (result.uidvalidity, sources, created))
        if event.move:
            if code is not None:  # RFC 6851 §4.3: COPYUID before the EXPUNGEs
                self._send(self.core.untagged_status("OK", "Moved", code))
                code = None
            self.forget_all(result.expunged)
        self._ok("MOVE completed" if event.move else "COPY completed", code)

    # --- QUOTA (RFC 9208) ---------------------------------------------------------
    def _quota_limit(self) -> int:
        """The user's quota in octets, 0 for none ([limits] mailbox_quota or
        the user's own, as SMTP and POP3 apply it)."""
        tracker = self.s.quota
        if tracker is None or self.user is None:
            return 0
        return tracker.limit(self.user)

    async def _quota(self, box: ImapMailbox, event: ev.GetQuotaRoot | ev.GetQuota) -> None:
        limit = self._quota_limit()
        if isinstance(event, ev.GetQuotaRoot):
            folder = self._name(event.mailbox)
            if folder is None:
                return
            if not await self._blocking(box.folders.exists, folder):
                self._no("No such mailbox", "NONEXISTENT")
                return
            roots = [""] if limit else []  # RFC 9208 §4.3: no root, no limit
            self._send(self.core.untagged(Atom("QUOTAROOT"), Mailbox(folder.imap()), *roots))
        elif event.root != "" or not limit:
            self._no("No such quota root", "NONEXISTENT")
            return
        if limit:
            usage = await self._blocking(quota.usage_blocking, box.maildir, limit)
            # RFC 9208 §5.1: STORAGE in units of 1024 octets.
            storage: list[Value] = [Atom("STORAGE"), usage.bytes // 1024, limit // 1024]
            self._send(self.core.untagged(Atom("QUOTA"), "", storage))
        self._ok("GETQUOTA completed")

    async def _over_quota(self, box: ImapMailbox, size: int) -> bool:
        """Would ``size`` more octets pass the quota?  Then answered NO
        [OVERQUOTA] (RFC 9208 §4.2, RFC 5530)."""
        limit = self._quota_limit()
        if not limit:
            return False
        usage = await self._blocking(quota.usage_blocking, box.maildir, limit)
        if usage.bytes + size <= limit:
            return False
        self._no("Over quota", "OVERQUOTA")
        return True


def _uses_internaldate(key: ev.SearchKey) -> bool:
    """BEFORE, ON, SINCE compare the INTERNALDATE (RFC 9051 §6.4.4)."""
    if key.op in ("BEFORE", "ON", "SINCE"):
        return True
    return any(isinstance(a, ev.SearchKey) and _uses_internaldate(a) for a in key.args)


def _uses_modseq(key: ev.SearchKey) -> bool:
    if key.op == "MODSEQ":
        return True
    return any(isinstance(a, ev.SearchKey) and _uses_modseq(a) for a in key.args)


def _now() -> int:
    return int(time.time())


def _batches(records: Sequence[MessageRecord], reads: bool) -> Iterable[Sequence[MessageRecord]]:
    """``records`` cut into FETCH's batches (see FETCH_BATCH)."""
    if not reads:
        for start in range(0, len(records), INDEX_BATCH):
            yield records[start : start + INDEX_BATCH]
        return
    # The first batches are small: the client starts reading while the
    # next, larger ones are read from disk.
    start = size = 0
    limit = 16
    for end, record in enumerate(records):
        if end > start and (end - start >= limit or size + record.size > FETCH_BATCH_BYTES):
            yield records[start:end]
            start, size = end, 0
            limit = min(2 * limit, FETCH_BATCH)
        size += record.size
    if start < len(records):
        yield records[start:]


# Placeholders asking ``needs_body`` whether items need a file at all.
_NO_RECORD = MessageRecord(0, "", "", frozenset(), 0, 0, 0)
_NO_STRUCTURE = None


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What one executor hop of FETCH read for a batch."""

    bodies: dict[int, FetchMessage | None]  # parsed messages; None: gone
    structures: dict[int, Structure]


_NOTHING_LOADED = _Loaded({}, {})


def _load(
    box: ImapMailbox,
    folder: FolderName,
    fetch: tuple[ev.FetchItem, ...],
    records: Sequence[MessageRecord],
    structural: bool,
) -> _Loaded:
    """The cached structures of ``records`` (``structural``: an item needs
    them), built and kept for those that had none, and the parsed messages
    the other items need.  Blocking: the parsing (attacker input) runs in
    the executor too, not on the loop."""
    structures: dict[int, Structure] = {}
    if structural:
        structures = box.index.structures(folder.imap(), {r.uid for r in records})
    bodies: dict[int, FetchMessage | None] = {}
    built: list[Structure] = []
    with box.reader(folder) as read:
        for record in records:
            cached = structures.get(record.uid)
            need_body = items.needs_body(fetch, record, cached)
            if not need_body and (cached is not None or not structural):
                continue
            try:
                message = FetchMessage(read(record))
            except MessageGone:
                bodies[record.uid] = None
                continue
            if not structural:  # read because an item needs the body
                bodies[record.uid] = message
                continue
            if cached is None:
                structure = items.structure_of(record.uid, message)
                structures[record.uid] = structure
                built.append(structure)
            if items.needs_body(fetch, record, structures.get(record.uid)):
                bodies[record.uid] = message
    box.index.remember_structures(folder.imap(), built)
    return _Loaded(bodies, structures)


def recent_since(box: ImapMailbox, folder: FolderName, below: int, claim: bool) -> tuple[int, int]:
    """The first UID a session holds as \\Recent among those below
    ``below`` (claimed for it if ``claim``: SELECT; EXAMINE only looks,
    RFC 3501 §6.3.2), and how many messages that makes."""
    name = folder.imap()
    first = box.index.claim_recent(name, below) if claim else box.index.first_recent(name)
    first = min(first, below)
    return first, box.index.recent_count(name, first, below) if first < below else 0


def _search_all(
    box: ImapMailbox,
    folder: FolderName,
    key: ev.SearchKey,
    numbered: Sequence[tuple[int, MessageRecord]],
    largest_seq: int,
    recent: RecentUids,
) -> list[int]:
    """UIDs of the (sequence number, record)s matching ``key``, ascending.
    Blocking (reads messages only when a key needs their text)."""
    hits: list[int] = []
    largest_uid = numbered[-1][1].uid if numbered else 0
    for seq, record in numbered:
        cache: list[FetchMessage] = []

        def message(
            record: MessageRecord = record, cache: list[FetchMessage] = cache
        ) -> FetchMessage:
            if not cache:
                try:
                    cache.append(FetchMessage(box.read(folder, record)))
                except MessageGone:
                    cache.append(FetchMessage(b""))
            return cache[0]

        held = record.uid in recent
        if items.search_matches(key, record, seq, largest_seq, largest_uid, message, held):
            hits.append(record.uid)
    return hits


def _open_all(
    box: ImapMailbox, folder: FolderName, records: Sequence[MessageRecord]
) -> list[BinaryIO]:
    """Open the files of the first messages to learn from (gone ones skipped)."""
    files: list[BinaryIO] = []
    for record in records[:MAX_LEARN_PER_COMMAND]:
        try:
            files.append(box.open_message(folder, record))
        except MessageGone:
            continue
    return files
