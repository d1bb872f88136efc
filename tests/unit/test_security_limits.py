"""SECURITY.md's "Limits" table stays true: every numeric field of [limits]
and [auth] is in it exactly once with its default, and so are the fixed
limits that code constants set."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from postoffice.config.settings import AuthSettings, LimitSettings
from postoffice.logsetup import QUEUE_LINES
from postoffice.mail.headers import MAX_HEADER_BLOCK
from postoffice.net.imap_session import MAX_AUTH_FAILURES as IMAP_MAX_AUTH_FAILURES
from postoffice.net.listener import HANDSHAKE_SECONDS
from postoffice.net.pop3_session import MAX_AUTH_FAILURES
from postoffice.net.smtp_session import MAX_HOPS
from postoffice.policy.auth import HASH_WAITING_PER_WORKER
from postoffice.policy.dkim_verify import MAX_SIGNATURES, VERIFY_TIMEOUT
from postoffice.policy.mailauth import CHECK_TIMEOUT
from postoffice.policy.memory_budget import MAX_HELD_BYTES
from postoffice.policy.passwords import MIN_LENGTH
from postoffice.policy.srs import MAX_AGE_DAYS
from postoffice.policy.throttle import MAX_ENTRIES
from postoffice.protocol.imap import MAX_COMMAND as IMAP_MAX_COMMAND
from postoffice.protocol.imap import MAX_LINE as IMAP_MAX_LINE
from postoffice.protocol.imap_parse import Limits as ImapLimits
from postoffice.protocol.pop3 import MAX_LINE as POP3_MAX_LINE
from postoffice.storage.folder_names import MAX_LEVELS as IMAP_NAME_LEVELS
from postoffice.storage.maildir import UNAVAILABLE_SECONDS

SECURITY = Path(__file__).parents[2] / "SECURITY.md"
UNITS = {"": 1, "KiB": 1024, "MiB": 1024 * 1024}


def limits_table() -> list[tuple[str, str]]:
    """(limit, default) of each row of the table under "## Limits"."""
    section = SECURITY.read_text().split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("limit", "---"):
            rows.append((cells[0], cells[1]))
    return rows


def leading_value(cell: str) -> float | bool:
    """The value a default cell starts with: 26214400, "30 s", "256 KiB", "false"."""
    if cell.split()[0] in ("true", "false"):
        return cell.split()[0] == "true"
    match = re.match(r"([\d,]+(?:\.\d+)?)(?: (KiB|MiB)\b)?", cell)
    assert match, f"no number at the start of {cell!r}"
    return float(match.group(1).replace(",", "")) * UNITS[match.group(2) or ""]


CONFIG_FIELDS = [
    (section, f.name, f.default)
    for section, kind in (("limits", LimitSettings), ("auth", AuthSettings))
    for f in dataclasses.fields(kind)
    if isinstance(f.default, int | float)  # bool too: allow_plaintext_loopback
]


def test_the_table_is_there_and_lists_nothing_twice() -> None:
    rows = limits_table()
    assert len(rows) > 40
    names = [name for name, _default in rows]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]


@pytest.mark.parametrize(("section", "name", "default"), CONFIG_FIELDS)
def test_every_config_limit_is_listed_with_its_default(
    section: str, name: str, default: float
) -> None:
    rows = dict(limits_table())
    key = f"`[{section}] {name}`"
    assert key in rows, f"SECURITY.md's Limits table has no row {key}"
    assert leading_value(rows[key]) == default, (key, rows[key], default)


FIXED = {
    "POP3 login failures per connection": MAX_AUTH_FAILURES,
    "POP3 command line": POP3_MAX_LINE,
    "IMAP login failures per connection": IMAP_MAX_AUTH_FAILURES,
    "IMAP command line": IMAP_MAX_LINE,
    "IMAP command": IMAP_MAX_COMMAND,
    "IMAP nesting (parentheses, NOT, OR)": ImapLimits().max_depth,
    "IMAP sequence set": ImapLimits().max_ranges,
    "IMAP mailbox name": IMAP_NAME_LEVELS,
    "password length (`user add`, `user passwd`)": MIN_LENGTH,
    "TLS handshake (STARTTLS, STLS, 465, 993, 995)": HANDSHAKE_SECONDS,
    "Received: fields (hops)": MAX_HOPS,
    "message header section": MAX_HEADER_BLOCK,
    "messages held whole for inbound checks": MAX_HELD_BYTES,
    "password checks waiting": HASH_WAITING_PER_WORKER,
    "throttle tables": MAX_ENTRIES,
    "DKIM: signatures verified per message": MAX_SIGNATURES,
    "SPF, DKIM and DMARC of one message": CHECK_TIMEOUT,
    "a Maildir that failed a delivery": UNAVAILABLE_SECONDS,
    "SRS address age": MAX_AGE_DAYS,
    "log lines waiting per destination (`[log] file`, `[log] syslog`)": QUEUE_LINES,
}


@pytest.mark.parametrize(("name", "value"), sorted(FIXED.items()))
def test_fixed_limits_say_what_the_code_does(name: str, value: float) -> None:
    rows = dict(limits_table())
    assert name in rows, f"SECURITY.md's Limits table has no row {name!r}"
    assert leading_value(rows[name]) == value, (name, rows[name], value)


def test_the_dkim_deadline_row() -> None:
    assert f", {VERIFY_TIMEOUT:.0f} s per message" in dict(limits_table())["DKIM: verification"]
