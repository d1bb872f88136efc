"""Users' Sieve scripts at local delivery: deciding, then filing the stored copy.

``MaildirStore.after_delivery`` is a ``SieveDelivery``, for both paths that
store in mailboxes (the SMTP session and the queue's local courier).  A
message held in memory is judged before it is stored (``prepare``), so the
script runs once and the store knows whether the file will stay where it
is put: one that moves (fileinto, discard, reject) skips the delivery
journal, whose crash recovery would otherwise bring back a copy in INBOX
new/.  A large message is judged from its stored file.  Either way the
script (protocol/sieve_run.py) runs in the executor on a bounded view of
the message (delivery/sieve_view.py), and its result is
applied to the stored file: fileinto links it into the Maildir++ folder
(imap4flags as the ``:2,`` letters), a cancelled keep unlinks it, redirect
and vacation go out through the outbound queue (redirect with SRS, as
aliases forward), a reject after the SMTP transaction is a DSN
(delivery/dsn.py).  Whatever fails, the message stays where it was stored
and the reason is logged (RFC 5228 §2.10.6).  Messages the filters filed in
Junk run the script too (its keep leaves them there) but get no automatic
reply.

Vacation (RFC 5230) keeps its de-duplication on disk per user, in the
user's script directory (``.vacation/``), and never answers the null
sender, mailing lists, auto-submitted or bulk mail (§4.5, RFC 3834 §2), so
two users on vacation cannot loop: each reply is itself auto-submitted and
sent from the null sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path
from typing import Protocol

from postoffice.delivery.content import header_section
from postoffice.delivery.dsn import DsnContext, DsnRecipient, build_dsn, summary_headers
from postoffice.delivery.sieve_view import (
    LoadedMessage,
    load_message,
    parse_folder,
    read_stored,
    sieve_message,
)
from postoffice.mail.address import Address, parse_address
from postoffice.policy.srs import Srs, forwarding_sender
from postoffice.protocol.sieve_parse import Command, SieveLimits, SieveSyntaxError, parse_script
from postoffice.protocol.sieve_run import (
    FileInto,
    Keep,
    Redirect,
    Reject,
    RunLimits,
    SieveCheckError,
    SieveResult,
    SieveRuntimeError,
    Vacation,
    check_script,
    run_script,
)
from postoffice.storage import folder_names
from postoffice.storage.folders import FolderError, Folders
from postoffice.storage.maildir import DeliveryFacts, DeliveryWriter, Prepared, mailbox_path
from postoffice.storage.maildir_flags import INFO, keyword_letters, system_letters
from postoffice.storage.safeio import fsync_dir
from postoffice.storage.sieve_scripts import SieveScripts
from postoffice.storage.sink import MessageSink

log = logging.getLogger("postoffice.sieve")

ROOT_RECHECK = 1.0  # seconds between looks for data_dir/sieve while it is absent
COPY_CHUNK = 64 * 1024  # a redirect of a large message is streamed from its file
_SYSTEM_FLAGS = {"\\seen", "\\answered", "\\flagged", "\\deleted", "\\draft"}


def compile_script(data: bytes, limits: SieveLimits | None = None) -> tuple[Command, ...]:
    """Parse and check; raises SieveSyntaxError or SieveCheckError (both with line/column)."""
    commands = parse_script(data, limits)
    check_script(commands)
    return commands


class OutboundQueue(Protocol):
    def writer(self, sender: Address | None, recipients: Sequence[Address]) -> MessageSink[str]: ...


def _letters(folder: Path, flags: Sequence[str]) -> str:
    system = [f for f in flags if f.lower() in _SYSTEM_FLAGS]
    keywords = [f for f in flags if f.lower() not in _SYSTEM_FLAGS and not f.startswith("\\")]
    letters = system_letters(system)
    with contextlib.suppress(Exception):  # no letter left: the keyword is dropped
        letters += keyword_letters(folder, keywords)
    return "".join(sorted(set(letters)))


def _place(path: Path, folder: Path, flags: Sequence[str], move: bool) -> Path:
    """Link (or move) the stored file into ``folder``; flags put it in cur/."""
    letters = _letters(folder, flags) if flags else ""
    name = path.name
    target = folder / ("cur" if letters else "new") / (name + INFO + letters if letters else name)
    if target == path:
        return path
    if move:
        os.rename(path, target)
    else:
        os.link(path, target)
    fsync_dir(target.parent)
    return target


def _folder_path(maildir: Path, name: str, create: bool) -> Path:
    folder = parse_folder(name)
    if folder.is_inbox:
        return maildir
    folders = Folders(maildir)
    if folders.exists(folder):
        return folders.path(folder)
    if not create:
        # RFC 5228 §4.1 lets a server refuse a missing mailbox; RFC 5490's
        # :create is how a script asks for one.
        raise FileNotFoundError(f"no folder {name!r} (use fileinto :create)")
    try:
        return folders.create(folder)
    except FolderError:
        if not folders.exists(folder):  # not made meanwhile by another delivery
            raise
        return folders.path(folder)


def _apply_storage(
    path: Path, maildir: Path, result: SieveResult, keep_dir: Path | None = None
) -> Path | None:
    """Blocking: file the stored copy (in INBOX, or ``keep_dir``: the folder
    the filters chose, where a keep leaves it) as the actions say; its final
    place or None."""
    placements: list[tuple[Path, tuple[str, ...]]] = []
    for action in result.actions:
        if isinstance(action, Keep):
            placements.append((keep_dir or maildir, action.flags))
        elif isinstance(action, FileInto):
            placements.append((_folder_path(maildir, action.mailbox, action.create), action.flags))
    if not placements:
        os.unlink(path)
        fsync_dir(path.parent)
        return None
    # One copy per folder (the first action's flags); every folder but the
    # last gets a link, the last takes the INBOX file itself.
    unique = list({f: fl for f, fl in reversed(placements)}.items())[::-1]
    for folder, flags in unique[:-1]:
        _place(path, folder, flags, move=False)
    folder, flags = unique[-1]
    return _place(path, folder, flags, move=True)


class _Vacations:
    """RFC 5230 §4.2: one reply per sender and handle within :days, on disk."""

    def __init__(self, user_dir: Path) -> None:
        self.dir = user_dir / ".vacation"

    def due(self, sender: Address, handle: str, days: int, now: float) -> bool:
        key = hashlib.sha256(f"{str(sender).lower()}\0{handle}".encode()).hexdigest()
        marker = self.dir / key
        try:
            if now - marker.stat().st_mtime < days * 86400:
                return False
        except FileNotFoundError:
            pass
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker.touch()
        os.utime(marker, (now, now))
        return True


_LIST_HEADERS = ("list-id", "list-post", "list-unsubscribe", "list-help", "list-owner")


def _auto_reply_allowed(
    loaded: LoadedMessage, mailbox: Address, original: Address, aliases: Sequence[str]
) -> bool:
    """RFC 5230 §4.5 and RFC 3834 §2: who must never get an automatic reply."""
    sender = loaded.sender
    if sender is None:
        return False
    local = sender.local.lower()
    if (
        local in ("mailer-daemon", "postmaster", "listserv", "majordomo")
        or local.startswith("owner-")
        or local.endswith("-request")
    ):
        return False
    message = loaded.parsed
    if any(h in message for h in _LIST_HEADERS):
        return False
    if str(message.get("Auto-Submitted", "no")).strip().lower() != "no":
        return False
    if str(message.get("Precedence", "")).strip().lower() in ("bulk", "junk", "list"):
        return False
    if str(sender).lower() == str(mailbox).lower():
        return False
    # §4.5: only when the user is named in To/Cc/Bcc (or :addresses).
    mine = {str(mailbox).lower(), str(original).lower(), *(a.lower() for a in aliases)}
    named = getaddresses(
        [
            str(v)
            for h in ("to", "cc", "bcc", "resent-to", "resent-cc")
            for v in message.get_all(h, [])
        ]
    )
    return any(addr.lower() in mine for _name, addr in named)


def _vacation_reply(
    action: Vacation, loaded: LoadedMessage, mailbox: Address, hostname: str
) -> bytes:
    original = loaded.parsed
    reply = EmailMessage(policy=policy.SMTP.clone(linesep="\n"))
    from_address = action.from_address or str(mailbox)
    reply["From"] = from_address
    reply["To"] = str(loaded.sender)
    subject = action.subject or "Auto: " + str(original.get("Subject", "")).strip()
    reply["Subject"] = subject
    reply["Date"] = formatdate(localtime=False)
    reply["Message-ID"] = make_msgid(domain=hostname)
    reply["Auto-Submitted"] = "auto-replied (vacation)"  # RFC 3834 §5, RFC 5230 §5.1
    msgid = str(original.get("Message-ID", "")).strip()
    if msgid:
        reply["In-Reply-To"] = msgid
        references = str(original.get("References", "")).strip()
        reply["References"] = f"{references} {msgid}".strip()
    reply.set_content(action.reason)
    return reply.as_bytes()


@dataclass(frozen=True, slots=True)
class _Decision:
    """One mailbox's script run: what it saw and what it asked for."""

    mailbox: Address
    original: Address
    loaded: LoadedMessage
    result: SieveResult | None  # None: the script failed, the message stays

    @property
    def moves(self) -> bool:
        """The stored file will not simply stay where it was put."""
        if self.result is None:
            return False
        stored = [a for a in self.result.actions if isinstance(a, Keep | FileInto)]
        return stored != [Keep()]


@dataclass(frozen=True, slots=True)
class SievePlan:
    """``AfterDelivery.prepare``'s answer: each mailbox's decision (None: no script)."""

    decisions: tuple[_Decision | None, ...]

    @property
    def moves(self) -> bool:
        return any(d is not None and d.moves for d in self.decisions)

    def reject_reason(self) -> str | None:
        """The first reject's reason, one line, for an SMTP reply."""
        for decision in self.decisions:
            for action in (
                () if decision is None or decision.result is None else decision.result.actions
            ):
                if isinstance(action, Reject):
                    # An SMTP reply line: printable ASCII only (RFC 5321 §4.2).
                    text = " ".join(action.reason.split())[:200]
                    reason = "".join(c if " " <= c <= "~" else "?" for c in text)
                    return reason or "Rejected by the recipient's filter"
        return None


class SieveDelivery:
    """``MaildirStore.after_delivery``: runs each mailbox's active script.

    A small message is judged from its content before it is stored
    (``prepare``), a large one from its stored file; either way the script
    runs once, in the executor (parsing, MIME decoding and matching are
    bounded, delivery/sieve_view.py, and never block the event loop), and
    its actions are applied to the stored file."""

    def __init__(
        self,
        scripts: SieveScripts,
        mail_dir: Path,
        executor: Executor,
        queue: OutboundQueue | None,
        *,
        hostname: str,
        srs: Srs | None = None,
        is_local_domain: Callable[[str], bool] = lambda _d: False,
        limits: RunLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scripts = scripts
        self._mail_dir = mail_dir
        self._executor = executor
        self.queue = queue
        self._hostname = hostname
        self._srs = srs
        self._is_local_domain = is_local_domain
        self._limits = limits or RunLimits()
        self._clock = clock
        self._root_seen = False
        self._next_look = 0.0

    async def prepare(self, writer: DeliveryWriter) -> Prepared | None:
        facts = writer.facts
        if facts is None or not writer.in_memory or not self._any_scripts():
            return None  # nobody has a script: the delivery is as it was
        content = writer.buffered()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._decide_all, facts, content, None)

    async def __call__(
        self, facts: DeliveryFacts, paths: list[Path], prepared: Prepared | None
    ) -> list[Path]:
        if prepared is None:
            if not self._any_scripts():
                return paths
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(
                self._executor, self._decide_all, facts, None, paths
            )
        assert isinstance(prepared, SievePlan)
        out = list(paths)
        for index, (decision, path) in enumerate(zip(prepared.decisions, paths, strict=True)):
            if decision is None or decision.result is None:
                continue
            try:
                placed = await self._apply(decision, decision.result, path, facts.keep_folder)
            except Exception:  # never lose or refuse a stored message over a script
                log.exception("sieve: mailbox %s: left in %s", decision.mailbox, facts.keep_folder)
                continue
            if placed is not None:
                out[index] = placed
        return out

    async def ereject(self, writer: DeliveryWriter) -> str | None:
        """RFC 5429 §2.1: the reason to refuse at SMTP time when the one
        recipient's script rejects the message ``writer`` holds in memory;
        None to accept.  The decision stays on the writer: its commit
        applies it, so the script runs once."""
        plan = writer.prepared = await self.prepare(writer)
        return plan.reject_reason() if isinstance(plan, SievePlan) else None

    def _any_scripts(self) -> bool:
        """Whether data_dir/sieve exists, looked at most once a second while it
        does not (a script put with the CLI counts from the next second)."""
        if self._root_seen:
            return True
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + ROOT_RECHECK
        self._root_seen = self.scripts.root.is_dir()
        return self._root_seen

    # --- in the executor ---------------------------------------------------------------
    def _decide_all(
        self, facts: DeliveryFacts, content: bytes | None, paths: list[Path] | None
    ) -> SievePlan:
        """Each mailbox's script, on the message parsed once for all of them."""
        scripts: list[tuple[tuple[Command, ...] | None, frozenset[str]] | None] = []
        for mailbox in facts.mailboxes:
            try:
                scripts.append(self._compiled(mailbox, facts.keep_folder))
            except Exception:  # an unreadable script: the message stays
                log.exception("sieve: mailbox %s: left in %s", mailbox, facts.keep_folder)
                scripts.append(None)
        first = next((i for i, s in enumerate(scripts) if s is not None), None)
        if first is None:
            return SievePlan((None,) * len(facts.mailboxes))
        ours = facts.mailboxes[0] if len(facts.mailboxes) == 1 else None
        wants_body = any(s is not None and "body" in s[1] for s in scripts)
        try:
            if content is not None:
                loaded = load_message(content, ours, wants_body=wants_body)
            else:
                assert paths is not None
                data, size = read_stored(paths[first])
                loaded = load_message(
                    data, ours, size=size, path=paths[first], wants_body=wants_body
                )
        except Exception:  # an unreadable file, a parser bug: the message stays
            log.exception(
                "sieve: %s: left in %s", ",".join(map(str, facts.mailboxes)), facts.keep_folder
            )
            return SievePlan((None,) * len(facts.mailboxes))
        decisions: list[_Decision | None] = []
        for mailbox, original, script in zip(
            facts.mailboxes, facts.originals, scripts, strict=True
        ):
            if script is None:
                decisions.append(None)
                continue
            commands, _required = script
            result = None
            if commands is not None:
                view = sieve_message(loaded, original, mailbox_path(self._mail_dir, mailbox))
                try:
                    result = run_script(commands, view, self._limits)
                except SieveRuntimeError as exc:
                    log.error(
                        "sieve: mailbox %s: script error, delivered to %s: %s",
                        mailbox, facts.keep_folder, exc,
                    )  # fmt: skip
            decisions.append(_Decision(mailbox, original, loaded, result))
        return SievePlan(tuple(decisions))

    def _compiled(
        self, mailbox: Address, keep_folder: str
    ) -> tuple[tuple[Command, ...] | None, frozenset[str]] | None:
        """The mailbox's active script checked (None: no script; no commands:
        it does not compile, which is logged, and the message stays)."""
        script = self.scripts.active_script(mailbox)
        if script is None:
            return None
        try:
            commands = parse_script(script)
            return commands, check_script(commands)
        except (SieveSyntaxError, SieveCheckError) as exc:
            log.error(
                "sieve: mailbox %s: script error, delivered to %s: %s", mailbox, keep_folder, exc
            )
            return None, frozenset()

    # --- applying a decision -----------------------------------------------------------
    async def _apply(
        self, decision: _Decision, result: SieveResult, path: Path, keep_folder: str
    ) -> Path | None:
        mailbox, loaded = decision.mailbox, decision.loaded
        # Mail the filters judged spam gets no automatic answer: its sender
        # is most likely forged (backscatter).
        replies = keep_folder != "Junk"
        for action in result.actions:
            if isinstance(action, Redirect):
                await self._redirect(action, loaded, mailbox)
            elif isinstance(action, Vacation) and replies:
                await self._vacation(action, loaded, mailbox, decision.original)
            elif isinstance(action, Reject) and replies:
                await self._reject(action, loaded, mailbox, decision.original)
        maildir = mailbox_path(self._mail_dir, mailbox)
        keep_dir = path.parent.parent
        loop = asyncio.get_running_loop()
        try:
            placed = await loop.run_in_executor(
                self._executor, _apply_storage, path, maildir, result, keep_dir
            )
        except (OSError, FolderError, folder_names.FolderNameError) as exc:
            log.error(
                "sieve: mailbox %s: cannot file message, kept in %s: %s", mailbox, keep_folder, exc
            )
            return None
        log.info(
            "sieve: mailbox %s: %s",
            mailbox,
            ", ".join(type(a).__name__.lower() for a in result.actions) or "discard",
        )
        return placed

    async def _send(
        self, sender: Address | None, to: Address, data: bytes, loaded: LoadedMessage | None = None
    ) -> None:
        """Queue ``data`` to ``to``; with ``loaded``, followed by that message
        (streamed from its file when it was not held in memory)."""
        if self.queue is None:
            raise RuntimeError("no outbound queue")
        writer = self.queue.writer(sender, [to])
        loop = asyncio.get_running_loop()
        try:
            await writer.write(data)
            if loaded is not None and loaded.content is not None:
                await writer.write(loaded.content[loaded.offset :])
            elif loaded is not None:
                assert loaded.path is not None
                f = await loop.run_in_executor(self._executor, open, loaded.path, "rb")
                try:
                    await loop.run_in_executor(self._executor, f.seek, loaded.offset)
                    while chunk := await loop.run_in_executor(self._executor, f.read, COPY_CHUNK):
                        await writer.write(chunk)
                finally:
                    await loop.run_in_executor(self._executor, f.close)
            await writer.commit()
        except BaseException:
            await writer.discard()
            raise

    async def _redirect(self, action: Redirect, loaded: LoadedMessage, mailbox: Address) -> None:
        target = parse_address(action.address.strip().strip("<>"), utf8=True)
        if str(target).lower() == str(mailbox).lower():
            return  # to oneself: the keep (or fileinto) already has it
        # As an alias forwards (policy/srs.py): the original sender, SRS-rewritten.
        sender = forwarding_sender(self._srs, loaded.sender, mailbox.domain, self._is_local_domain)
        head = f"Delivered-To: {mailbox}\n".encode()
        delivered = [str(v).strip().lower() for v in loaded.parsed.get_all("Delivered-To", [])]
        if str(mailbox).lower() in delivered:  # it went through this redirect before
            log.warning("sieve: mailbox %s: redirect loop, not redirected", mailbox)
            return
        await self._send(sender, target, head, loaded)

    async def _vacation(
        self, action: Vacation, loaded: LoadedMessage, mailbox: Address, original: Address
    ) -> None:
        if not _auto_reply_allowed(loaded, mailbox, original, action.addresses):
            return
        assert loaded.sender is not None
        loop = asyncio.get_running_loop()
        vacations = _Vacations(self.scripts.user_dir(mailbox))
        due = await loop.run_in_executor(
            self._executor, vacations.due, loaded.sender, action.handle, action.days, self._clock()
        )
        if not due:
            return
        data = _vacation_reply(action, loaded, mailbox, self._hostname)
        # RFC 5230 §5.1 / RFC 3834 §3.3: sent from the null sender.
        await self._send(None, loaded.sender, data)

    async def _reject(
        self, action: Reject, loaded: LoadedMessage, mailbox: Address, original: Address
    ) -> None:
        """RFC 5429 §2.1.2: already accepted, so the refusal goes back as a
        DSN (delivery/dsn.py: multipart/report, Action: failed, 5.7.1, from
        the null sender, auto-replied) to the envelope sender; never to the
        null sender nor in answer to automatic mail (RFC 3834 §2)."""
        sender = loaded.sender
        if sender is None or not _bounce_allowed(loaded):
            return
        now = self._clock()
        reason = action.reason.strip() or "Rejected by the recipient's filter"
        context = DsnContext(
            reporting_mta=self._hostname,
            queue_id=secrets.token_hex(6),
            sender=sender,
            arrival=now,
            # The sender may be forged: quote only what identifies the message.
            original_headers=summary_headers(header_section(loaded.head)),
        )
        recipient = DsnRecipient(
            address=mailbox,
            status="5.7.1",  # RFC 5429 §2.1.2: delivery not authorized, message refused
            diagnostic=f"rejected by the recipient's Sieve filter: {reason}",
            smtp_reply=False,
            remote="",
            last_attempt=now,
            original_recipient="" if original == mailbox else f"rfc822; {original}",
        )
        await self._send(None, sender, build_dsn(context, [recipient], now=now))


def _bounce_allowed(loaded: LoadedMessage) -> bool:
    if loaded.sender is None or loaded.sender.local.lower() == "mailer-daemon":
        return False
    return str(loaded.parsed.get("Auto-Submitted", "no")).strip().lower() == "no"
