"""Sieve's delivery step and script store, on real files: filing, flags, names, spam scores."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice.delivery.sieve import SieveDelivery, _apply_storage, compile_script
from postoffice.delivery.sieve_view import (
    BODY_LIMIT,
    MAX_PARTS,
    load_message,
    sieve_message,
    spam_score,
)
from postoffice.mail.address import Address
from postoffice.protocol.sieve_parse import SieveSyntaxError
from postoffice.protocol.sieve_run import FileInto, Keep, SieveResult
from postoffice.storage.maildir import DeliveryFacts, ensure_maildir
from postoffice.storage.sieve_scripts import ScriptError, SieveScripts, check_name

ALICE = Address("alice", "example.test")


def stored(tmp_path: Path) -> tuple[Path, Path]:
    maildir = tmp_path / "example.test" / "alice"
    ensure_maildir(maildir)
    path = maildir / "new" / "1.M1P1.host,S=5,W=5"
    path.write_bytes(b"Subject: x\n\nhi\n")
    return maildir, path


def test_fileinto_with_flags_and_keep(tmp_path: Path) -> None:
    maildir, path = stored(tmp_path)
    result = SieveResult((FileInto("Work", ("\\Seen", "$Label1"), create=True), Keep()), False)
    placed = _apply_storage(path, maildir, result)
    assert placed == maildir / "new" / path.name  # the keep took the INBOX file itself
    (filed,) = (maildir / ".Work" / "cur").iterdir()
    assert filed.name == path.name + ":2,Sa"  # \\Seen and the first keyword letter
    assert "$Label1" in (maildir / ".Work" / "dovecot-keywords").read_text()


def test_fileinto_missing_folder_without_create_fails(tmp_path: Path) -> None:
    maildir, path = stored(tmp_path)
    with pytest.raises(FileNotFoundError):
        _apply_storage(path, maildir, SieveResult((FileInto("Nope"),), False))
    assert path.exists()


def test_discard_removes_the_inbox_copy(tmp_path: Path) -> None:
    maildir, path = stored(tmp_path)
    assert _apply_storage(path, maildir, SieveResult((), True)) is None
    assert not path.exists()


def test_spam_score_reads_rspamd_and_spamassassin_headers() -> None:
    assert spam_score([("X-Spamd-Result", "default: False [3.40 / 15.00]; FOO(1)")]) == 3.4
    assert spam_score([("X-Spam-Score", " 7.5 ")]) == 7.5
    assert spam_score([("X-Spam-Score", "junk")]) is None
    assert spam_score([]) is None


def test_script_store(tmp_path: Path) -> None:
    scripts = SieveScripts(tmp_path / "sieve", max_bytes=100)
    assert scripts.active_script(ALICE) is None
    scripts.put(ALICE, "one", b"keep;")
    scripts.put(ALICE, "two", b"discard;")
    scripts.activate(ALICE, "two")
    assert [(i.name, i.active) for i in scripts.list(ALICE)] == [("one", False), ("two", True)]
    assert scripts.active_script(ALICE) == b"discard;"
    with pytest.raises(ScriptError, match="active script cannot be deleted"):
        scripts.delete(ALICE, "two")
    scripts.rename(ALICE, "two", "three")
    assert scripts.active_name(ALICE) == "three"
    scripts.activate(ALICE, None)
    assert scripts.active_script(ALICE) is None
    with pytest.raises(ScriptError, match="larger than 100"):
        scripts.put(ALICE, "big", b"#" * 101)
    assert (tmp_path / "sieve" / "example.test" / "alice" / "one.sieve").read_bytes() == b"keep;"


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a\\b", "tab\there", "x" * 129])
def test_unsafe_script_names_are_refused(name: str) -> None:
    with pytest.raises(ScriptError):
        check_name(name)


def test_compile_script_refuses_with_position() -> None:
    with pytest.raises(SieveSyntaxError) as info:
        compile_script(b"keep;\nif true {")
    assert (info.value.line, info.value.column) == (2, 10)


def mime(parts: str, boundary: str = "b") -> bytes:
    return (
        f'Return-Path: <a@example.org>\nSubject: m\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="{boundary}"\n\n'
        f"prologue\n{parts}--{boundary}--\nepilogue\n"
    ).encode()


def test_view_decodes_parts_and_bounds_them(tmp_path: Path) -> None:
    part = "--b\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\nPGI+aGk8L2I+\n"
    nested = (
        "--b\nContent-Type: message/rfc822\n\nSubject: inner\nFrom: x@example.org\n\ninner body\n"
    )
    loaded = load_message(mime(part + nested), None)
    parts = dict(loaded.body_parts)
    assert parts["text/html"] == "<b>hi</b>"
    assert "prologue" in parts["multipart/mixed"] and "epilogue" in parts["multipart/mixed"]
    assert "Subject: inner" in parts["message/rfc822"]
    assert "<b>hi</b>" in loaded.body_text
    assert "PGI+aGk8L2I+" in loaded.body_raw and str(loaded.sender) == "a@example.org"
    many = "".join(f"--b\nContent-Type: text/plain\n\npart {i}\n" for i in range(500))
    assert len(load_message(mime(many), None).body_parts) == MAX_PARTS
    big = "--b\nContent-Type: text/plain\n\n" + ("z" * 1000 + "\n") * 600
    loaded = load_message(mime(big), None)
    assert len(loaded.body_raw) == BODY_LIMIT
    assert sum(len(t) for _c, t in loaded.body_parts) <= BODY_LIMIT
    # Not asked for: nothing decoded.
    assert load_message(mime(part), None, wants_body=False).body_parts == ()


def test_envelope_to_is_the_original_recipient(tmp_path: Path) -> None:
    original = Address("alice+lists", "example.test")
    loaded = load_message(
        b"Return-Path: <>\nDelivered-To: alice@example.test\nSubject: x\n\nhi\n", ALICE
    )
    assert loaded.headers == (("Subject", "x"),)  # our own lines are not the message's
    view = sieve_message(loaded, original, tmp_path)
    assert view.envelope_to == "alice+lists@example.test" and view.envelope_from == ""


def test_one_parse_serves_every_mailbox_of_a_delivery(tmp_path: Path) -> None:
    scripts = SieveScripts(tmp_path / "sieve")
    script = b'require ["envelope", "fileinto"];\nif envelope :is "to" "team@example.test" { fileinto "T"; }\n'
    mailboxes = tuple(Address(n, "example.test") for n in ("a", "b", "c"))
    for mailbox in mailboxes[:2]:  # c has no script
        scripts.put(mailbox, "s", script)
        scripts.activate(mailbox, "s")
    with ThreadPoolExecutor(1) as executor:
        sieve = SieveDelivery(scripts, tmp_path / "mail", executor, None, hostname="h.test")
        team = Address("team", "example.test")
        facts = DeliveryFacts(mailboxes, (team, mailboxes[1], team))
        plan = sieve._decide_all(facts, b"Return-Path: <x@y.test>\nSubject: s\n\nhi\n", None)
    first, second, third = plan.decisions
    assert first is not None and second is not None and third is None
    assert first.loaded is second.loaded  # parsed once, not once per mailbox
    assert first.result is not None and first.result.actions == (FileInto("T"),)
    assert second.result is not None and second.result.actions == (Keep(),)
    assert plan.moves and plan.reject_reason() is None


def test_reject_reason_is_one_printable_ascii_line(tmp_path: Path) -> None:
    scripts = SieveScripts(tmp_path / "sieve")
    scripts.put(
        ALICE, "r", 'require "reject";\nreject "Nein,\r\n  danke \u2013 später";\n'.encode()
    )
    scripts.activate(ALICE, "r")
    with ThreadPoolExecutor(1) as executor:
        sieve = SieveDelivery(scripts, tmp_path / "mail", executor, None, hostname="h.test")
        plan = sieve._decide_all(DeliveryFacts((ALICE,), (ALICE,)), b"Subject: s\n\nhi\n", None)
    assert plan.reject_reason() == "Nein, danke ? sp?ter"
    assert plan.moves  # the copy is not kept: the store skips the journal
