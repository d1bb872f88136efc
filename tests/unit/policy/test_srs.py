"""SRS (policy/srs.py): the addresses forwarded mail leaves with, and their checks.

The expected forms follow Shevek's SRS paper and libsrs2/Mail::SRS; the
interop test (tests/interop/test_srs_reference.py) checks the same hashes
against Mail::SRS itself.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from postoffice.mail.address import Address, parse_path
from postoffice.policy.srs import (
    HASH_LENGTH,
    MAX_AGE_DAYS,
    SECRETS_FILE,
    Srs,
    SrsError,
    forwarding_sender,
    is_srs,
    load_secrets,
)

KEY = b"0123456789abcdef0123"
DAY = 86400.0
NOW = 1_780_000_000.0
ALICE = Address("Alice", "orig.example")


def srs(*keys: bytes, now: float = NOW) -> Srs:
    return Srs(keys or (KEY,), clock=lambda: now)


def test_srs0_form_and_reverse() -> None:
    fwd = srs().forward(ALICE, "fwd.example")
    assert fwd is not None
    m = re.fullmatch(r"SRS0=([A-Za-z0-9+/]{6})=([A-Z2-7]{2})=orig\.example=Alice", fwd.local)
    assert m, fwd
    assert fwd.domain == "fwd.example"
    day = int(NOW // DAY) % 1024
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    assert m.group(2) == alphabet[day >> 5] + alphabet[day & 31]
    assert srs().reverse(fwd) == ALICE


def test_second_hop_makes_srs1_and_reverses_to_the_first_hop() -> None:
    first = srs(b"first-hop-secret-123").forward(ALICE, "hop1.example")
    assert first is not None
    second = srs().forward(first, "hop2.example")
    assert second is not None
    opaque = first.local[4:]  # "=HHHHHH=TT=orig.example=Alice"
    assert re.fullmatch(rf"SRS1=[A-Za-z0-9+/]{{6}}=hop1\.example={re.escape(opaque)}", second.local)
    # We bounce to the first hop's SRS0 address; it checks its own hash.
    assert srs().reverse(second) == first
    # A third hop keeps the first hop and its opaque part, with its own hash.
    third = srs(b"third-hop-secret-12").forward(second, "hop3.example")
    assert third is not None
    assert third.local.endswith(f"=hop1.example={opaque}")
    assert third.local.split("=")[1] != second.local.split("=")[1]
    assert srs(b"third-hop-secret-12").reverse(third) == first


def test_hash_is_case_insensitive_like_libsrs2() -> None:
    fwd = srs().forward(ALICE, "fwd.example")
    assert fwd is not None
    assert srs().reverse(Address(fwd.local.lower(), fwd.domain)) == Address("alice", "orig.example")
    assert srs().reverse(Address(fwd.local.upper(), fwd.domain)) == Address("ALICE", "orig.example")


def test_forged_and_truncated_hashes_are_refused() -> None:
    fwd = srs().forward(ALICE, "fwd.example")
    assert fwd is not None
    _tag, hashed, rest = fwd.local.split("=", 2)
    flipped = ("A" if hashed[0] != "A" else "B") + hashed[1:]
    for bad_hash in (flipped, hashed[:4], hashed[:1], hashed + "x", ""):
        with pytest.raises(SrsError):
            srs().reverse(Address(f"SRS0={bad_hash}={rest}", "fwd.example"))
    # Another secret: not ours.
    with pytest.raises(SrsError, match="bad hash"):
        srs(b"some-other-secret-99").reverse(fwd)
    # The hash covers the original address: changing it breaks the hash.
    with pytest.raises(SrsError, match="bad hash"):
        srs().reverse(Address(fwd.local.replace("=Alice", "=Mallory"), "fwd.example"))


def test_age_limit() -> None:
    fwd = srs().forward(ALICE, "fwd.example")
    assert fwd is not None
    assert srs(now=NOW + MAX_AGE_DAYS * DAY).reverse(fwd) == ALICE
    with pytest.raises(SrsError, match="expired"):
        srs(now=NOW + (MAX_AGE_DAYS + 1) * DAY).reverse(fwd)
    # A time stamp from the future counts as ~1024 days old (libsrs2).
    with pytest.raises(SrsError, match="expired"):
        srs(now=NOW - 2 * DAY).reverse(fwd)
    # The stamp wraps every 1024 days: the check is modular, not absolute.
    assert srs(now=NOW + 1024 * DAY).reverse(fwd) == ALICE
    # Our own queue may skip the age check (its messages are trusted).
    assert srs(now=NOW + 100 * DAY).reverse(fwd, check_age=False) == ALICE


def test_rotated_secret_still_verifies() -> None:
    old = srs(b"old-secret-0123456789").forward(ALICE, "fwd.example")
    assert old is not None
    rotated = srs(b"new-secret-0123456789", b"old-secret-0123456789")
    assert rotated.reverse(old) == ALICE
    new = rotated.forward(ALICE, "fwd.example")
    assert new is not None and new != old  # signed with the first secret
    with pytest.raises(SrsError):
        srs(b"old-secret-0123456789").reverse(new)


def test_malformed_addresses() -> None:
    for local in ("SRS0=abcdef=AA=x", "SRS0==AA=x=y", "SRS1=abcdef=host", "SRS1=abcdef=host=x"):
        with pytest.raises(SrsError):
            srs().reverse(Address(local, "fwd.example"))
    with pytest.raises(SrsError, match="not an SRS"):
        srs().reverse(Address("alice", "fwd.example"))
    # A valid hash over a time stamp outside the alphabet is still malformed.
    with pytest.raises(SrsError):
        srs().reverse(Address("SRS0=abcdef=11=orig.example=a", "fwd.example"))


def test_is_srs_never_matches_an_account_name() -> None:
    assert is_srs("SRS0=abc=AA=d=l") and is_srs("srs1+x=y") and is_srs("SRS0-h=t=d=l")
    for name in ("srs0-team", "srs0", "srs1_x", "alice", "SRS2=a=b"):
        assert not is_srs(name)


def test_a_quoted_dot_atom_is_rewritten_as_the_atom() -> None:
    """``"someone"`` is ``someone`` (RFC 5322 §3.4.1): the same SRS address."""
    plain = srs().forward(Address("someone", "orig.example"), "fwd.example")
    quoted = srs().forward(Address('"someone"', "orig.example"), "fwd.example")
    assert plain is not None and quoted == plain
    assert srs().reverse(quoted) == Address("someone", "orig.example")


@pytest.mark.parametrize(
    "local", ['"a b"', '"x client=203.0.113.9 user=admin"', '"a\\"b\\\\c"', '"(x)"', '"a..b"']
)
def test_a_quoted_local_part_makes_a_quoted_srs_address_that_reverses(local: str) -> None:
    sender = Address(local, "orig.example")
    fwd = srs().forward(sender, "fwd.example")
    assert fwd is not None
    assert fwd.local.startswith('"SRS0=') and fwd.local.endswith('"')
    assert parse_path(f"<{fwd}>") == fwd  # one valid local part
    assert is_srs(fwd.local)
    assert srs().reverse(fwd) == sender
    # A second hop keeps it reversible to the first hop's (quoted) address.
    second = srs(b"second-hop-secret-1").forward(fwd, "hop2.example")
    assert second is not None and second.local.startswith('"SRS1=')
    assert parse_path(f"<{second}>") == second
    assert srs(b"second-hop-secret-1").reverse(second) == fwd
    # Forged: a changed character in the quoted part fails the hash.
    with pytest.raises(SrsError):
        srs().reverse(Address(fwd.local.replace("orig.example", "orig.exampla"), fwd.domain))


def test_a_sender_too_long_to_rewrite_is_forwarded_as_null(
    caplog: pytest.LogCaptureFixture,
) -> None:
    long_sender = Address("a" * 230, "orig.example")  # fits a path; its SRS form not
    assert srs().forward(long_sender, "fwd.example") is None
    # Never kept (it would fail SPF downstream and draw backscatter): <>.
    assert forwarding_sender(srs(), long_sender, "fwd.example", lambda d: False) is None
    forged = Address('"x client=203.0.113.9 user=admin' + "y" * 200 + '"', "orig.example")
    assert forwarding_sender(srs(), forged, "fwd.example", lambda d: False) is None
    (record,) = [r for r in caplog.records if "x client" in r.getMessage()]
    # The client's text is one JSON-quoted value, never fields of its own.
    assert record.getMessage().startswith('srs: cannot rewrite from="<\\"x client=203.0.113.9')


def test_forwarding_sender_policy() -> None:
    local_domains = {"fwd.example", "other.example"}.__contains__
    s = srs()
    # The null sender stays null: a bounce never gets a return path.
    assert forwarding_sender(s, None, "fwd.example", local_domains) is None
    # Our own domains pass SPF as they are.
    own = Address("bob", "other.example")
    assert forwarding_sender(s, own, "fwd.example", local_domains) == own
    rewritten = forwarding_sender(s, ALICE, "fwd.example", local_domains)
    assert rewritten is not None and rewritten.local.startswith("SRS0=")
    assert rewritten.domain == "fwd.example"
    assert forwarding_sender(None, ALICE, "fwd.example", local_domains) == ALICE
    # The result is a valid SMTP path.
    assert parse_path(f"<{rewritten}>") == rewritten


def test_secrets_file(tmp_path: Path) -> None:
    keys = load_secrets(tmp_path)
    path = tmp_path / SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(keys) == 1 and len(keys[0]) == 64
    assert load_secrets(tmp_path) == keys  # made once, then kept
    assert [p.name for p in tmp_path.iterdir()] == [SECRETS_FILE]  # no temporary left
    # Rotation: a new first line signs, the old one still verifies.
    path.write_text("# rotated\nnew-secret-0123456789abcdef\n\n" + keys[0].decode() + "\n")
    os.chmod(path, 0o644)
    assert load_secrets(tmp_path) == [b"new-secret-0123456789abcdef", keys[0]]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened
    path.write_text("short\n")
    with pytest.raises(OSError, match="at least 16"):
        load_secrets(tmp_path)
    path.write_text("# nothing\n")
    with pytest.raises(OSError, match="no SRS secret"):
        load_secrets(tmp_path)


def test_hash_length_is_six() -> None:
    assert HASH_LENGTH == 6
