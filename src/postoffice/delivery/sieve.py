"""Users' Sieve scripts at local delivery: the step after a message is in INBOX.

``MaildirStore.after_delivery`` calls ``SieveDelivery`` once a message is
durably stored in its recipients' INBOXes, from both paths that store there
(the SMTP session and the queue's local courier).  For each mailbox with an
active script it runs the script (protocol/sieve_run.py) on the stored file
and applies the result: fileinto links the file into the Maildir++ folder
(with imap4flags as the ``:2,`` letters), a cancelled keep unlinks the
INBOX copy, redirect and vacation go out through the outbound queue
(redirect with SRS, as aliases forward).  Working on the stored file means
the fast path is untouched and nothing is lost: whatever fails, the message
stays in INBOX and the reason is logged (RFC 5228 §2.10.6).

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
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path
from typing import Protocol

from postoffice.mail.address import Address, AddressError, parse_address
from postoffice.policy.srs import Srs, forwarding_sender
from postoffice.protocol.sieve_parse import Command, SieveLimits, SieveSyntaxError, parse_script
from postoffice.protocol.sieve_run import (
    FileInto,
    Keep,
    Redirect,
    Reject,
    RunLimits,
    SieveCheckError,
    SieveMessage,
    SieveResult,
    SieveRuntimeError,
    Vacation,
    check_script,
    run_script,
)
from postoffice.storage import folder_names
from postoffice.storage.folders import Folders
from postoffice.storage.maildir import mailbox_path
from postoffice.storage.maildir_flags import INFO, keyword_letters, system_letters
from postoffice.storage.safeio import fsync_dir
from postoffice.storage.sieve_scripts import SieveScripts
from postoffice.storage.sink import MessageSink

log = logging.getLogger("postoffice.sieve")

# What a script may read of a message: headers whole, the body up to this.
BODY_LIMIT = 256 * 1024
ROOT_RECHECK = 1.0  # seconds between looks for data_dir/sieve while it is absent
_SYSTEM_FLAGS = {"\\seen", "\\answered", "\\flagged", "\\deleted", "\\draft"}
_SPAMD_SCORE = re.compile(r"\[\s*(-?[0-9.]+)\s*/")


def compile_script(data: bytes, limits: SieveLimits | None = None) -> tuple[Command, ...]:
    """Parse and check; raises SieveSyntaxError or SieveCheckError (both with line/column)."""
    commands = parse_script(data, limits)
    check_script(commands)
    return commands


class OutboundQueue(Protocol):
    def writer(self, sender: Address | None, recipients: Sequence[Address]) -> MessageSink[str]: ...


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One stored message as a script sees it, plus what replies need."""

    view: SieveMessage
    raw: bytes  # the stored file without our Return-Path line
    sender: Address | None
    parsed: EmailMessage


def spam_score(headers: Sequence[tuple[str, str]]) -> float | None:
    """rspamd's score: X-Spamd-Result "default: False [3.40 / 15.00]", or X-Spam-Score."""
    for name, value in headers:
        lowered = name.lower()
        try:
            if lowered == "x-spamd-result":
                found = _SPAMD_SCORE.search(value)
                if found:
                    return float(found.group(1))
            elif lowered == "x-spam-score":
                return float(value.strip().split()[0])
        except (ValueError, IndexError):
            continue
    return None


def _load(path: Path, mailbox: Address, maildir: Path) -> _Loaded:
    return _view(path.read_bytes(), mailbox, maildir)


def _view(data: bytes, mailbox: Address, maildir: Path) -> _Loaded:
    sender: Address | None = None
    raw = data
    if data.startswith(b"Return-Path:"):
        line, _, raw = data.partition(b"\n")
        text = line.split(b":", 1)[1].strip().strip(b"<>").decode("utf-8", "replace")
        with contextlib.suppress(AddressError):
            sender = parse_address(text, utf8=True) if text else None
    # The SMTP session's own Delivered-To (one mailbox): not the message's, so
    # a redirect's loop check (which looks for this mailbox) does not see it.
    ours = f"Delivered-To: {mailbox}\n".encode()
    if raw.startswith(ours):
        raw = raw[len(ours) :]
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    headers = tuple((k, str(v)) for k, v in parsed.items())
    body = ""
    with contextlib.suppress(Exception):  # a broken MIME part: no body text
        part = parsed.get_body(("plain", "html"))
        if part is not None:
            body = str(part.get_content())[:BODY_LIMIT]
    folders = Folders(maildir)

    def exists(name: str) -> bool:
        try:
            folder = parse_folder(name)
        except folder_names.FolderNameError:
            return False
        return folder.is_inbox or folders.exists(folder)

    view = SieveMessage(
        headers=headers,
        size=len(raw),
        envelope_from=str(sender) if sender else "",
        envelope_to=str(mailbox),
        body_text=body,
        spam_score=spam_score(headers),
        now=time.time(),
        mailbox_exists=exists,
    )
    return _Loaded(view, raw, sender, parsed)


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


def parse_folder(name: str) -> folder_names.FolderName:
    """A fileinto name as IMAP names it (our "." separator); "/" is taken
    too, the separator scripts written for other servers use."""
    try:
        return folder_names.parse(name)
    except folder_names.FolderNameError:
        if "/" not in name:
            raise
        return folder_names.parse(name, "/")


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
    return folders.create(folder)


def _apply_storage(path: Path, maildir: Path, result: SieveResult) -> Path | None:
    """Blocking: file the INBOX copy as the actions say; its final place or None."""
    placements: list[tuple[Path, tuple[str, ...]]] = []
    for action in result.actions:
        if isinstance(action, Keep):
            placements.append((maildir, action.flags))
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


def _auto_reply_allowed(loaded: _Loaded, mailbox: Address, aliases: Sequence[str]) -> bool:
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
    mine = {str(mailbox).lower(), *(a.lower() for a in aliases)}
    named = getaddresses(
        [
            str(v)
            for h in ("to", "cc", "bcc", "resent-to", "resent-cc")
            for v in message.get_all(h, [])
        ]
    )
    return any(addr.lower() in mine for _name, addr in named)


def _vacation_reply(action: Vacation, loaded: _Loaded, mailbox: Address, hostname: str) -> bytes:
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


class SieveDelivery:
    """``MaildirStore.after_delivery``: runs each mailbox's active script."""

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

    async def __call__(self, mailboxes: tuple[Address, ...], paths: list[Path]) -> list[Path]:
        if not self._any_scripts():
            return paths  # nobody has a script: the delivery is as it was
        out = list(paths)
        for index, (mailbox, path) in enumerate(zip(mailboxes, paths, strict=True)):
            try:
                placed = await self._one(mailbox, path)
            except Exception:  # never lose or refuse a stored message over a script
                log.exception("sieve: mailbox %s: delivered to INBOX", mailbox)
                continue
            if placed is not None:
                out[index] = placed
        return out

    async def ereject(self, mailbox: Address, content: bytes) -> str | None:
        """RFC 5429 §2.1: the reason to refuse at SMTP time when the one
        recipient's script rejects ``content`` (the message as it would be
        stored); None to accept.  The script runs again after delivery when
        it does not reject; running it is free of side effects."""
        if not self._any_scripts():
            return None
        try:
            loop = asyncio.get_running_loop()
            script = await loop.run_in_executor(self._executor, self.scripts.active_script, mailbox)
            if script is None:
                return None
            maildir = mailbox_path(self._mail_dir, mailbox)
            loaded = _view(content, mailbox, maildir)
            result = run_script(compile_script(script), loaded.view, self._limits)
        except Exception as exc:  # judged again after delivery, which logs it
            log.debug("sieve: mailbox %s: no SMTP-time verdict: %s", mailbox, exc)
            return None
        for action in result.actions:
            if isinstance(action, Reject):
                return action.reason.strip().replace("\r", " ").replace("\n", " ")[:200] or (
                    "Rejected by the recipient's filter"
                )
        return None

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

    async def _one(self, mailbox: Address, path: Path) -> Path | None:
        loop = asyncio.get_running_loop()
        script = await loop.run_in_executor(self._executor, self.scripts.active_script, mailbox)
        if script is None:
            return None
        maildir = path.parent.parent
        loaded = await loop.run_in_executor(self._executor, _load, path, mailbox, maildir)
        try:
            result = run_script(compile_script(script), loaded.view, self._limits)
        except (SieveSyntaxError, SieveCheckError, SieveRuntimeError) as exc:
            log.error("sieve: mailbox %s: script error, delivered to INBOX: %s", mailbox, exc)
            return None
        for action in result.actions:
            if isinstance(action, Redirect):
                await self._redirect(action, loaded, mailbox)
            elif isinstance(action, Vacation):
                await self._vacation(action, loaded, mailbox)
            elif isinstance(action, Reject):
                await self._reject(action, loaded, mailbox)
        try:
            placed = await loop.run_in_executor(
                self._executor, _apply_storage, path, maildir, result
            )
        except (OSError, folder_names.FolderNameError) as exc:
            log.error("sieve: mailbox %s: cannot file message, kept in INBOX: %s", mailbox, exc)
            return None
        log.info(
            "sieve: mailbox %s: %s",
            mailbox,
            ", ".join(type(a).__name__.lower() for a in result.actions) or "discard",
        )
        return placed

    async def _send(self, sender: Address | None, to: Address, data: bytes) -> None:
        if self.queue is None:
            raise RuntimeError("no outbound queue")
        writer = self.queue.writer(sender, [to])
        try:
            await writer.write(data)
            await writer.commit()
        except BaseException:
            await writer.discard()
            raise

    async def _redirect(self, action: Redirect, loaded: _Loaded, mailbox: Address) -> None:
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
        await self._send(sender, target, head + loaded.raw)

    async def _vacation(self, action: Vacation, loaded: _Loaded, mailbox: Address) -> None:
        if not _auto_reply_allowed(loaded, mailbox, action.addresses):
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

    async def _reject(self, action: Reject, loaded: _Loaded, mailbox: Address) -> None:
        # Already accepted: RFC 5429 §2.1 asks for a bounce to the sender.
        if not _auto_reply_allowed_for_bounce(loaded):
            return
        assert loaded.sender is not None
        note = EmailMessage(policy=policy.SMTP.clone(linesep="\n"))
        note["From"] = f"MAILER-DAEMON@{self._hostname}"
        note["To"] = str(loaded.sender)
        note["Subject"] = "Rejected: " + str(loaded.parsed.get("Subject", "")).strip()
        note["Date"] = formatdate(localtime=False)
        note["Message-ID"] = make_msgid(domain=self._hostname)
        note["Auto-Submitted"] = "auto-replied (rejected)"
        note.set_content(
            f"Your message to {mailbox} was rejected by the recipient's filter:\n\n"
            f"{action.reason}\n"
        )
        await self._send(None, loaded.sender, note.as_bytes())


def _auto_reply_allowed_for_bounce(loaded: _Loaded) -> bool:
    if loaded.sender is None:
        return False
    return str(loaded.parsed.get("Auto-Submitted", "no")).strip().lower() == "no"
