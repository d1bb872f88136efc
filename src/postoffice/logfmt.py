"""Values from clients in ``key=value`` log lines: one line, one record, no forged fields.

Every log line of a session is a record of ``key=value`` fields (Postfix's
style), and admins and their tools split it on spaces.  A value the client
chose -- a quoted local part such as ``"x client=evil"@example.test``, a
HELO name with a ``"``, a Message-ID -- would otherwise add fields of its own
or end the record early.  ``field`` leaves ordinary values as they are and
quotes anything else as a JSON string: ``"`` and ``\\`` escaped, every
control and non-ASCII character as ``\\uXXXX``, so a quoted value is always
printable ASCII on one line.  A logfmt or JSON parser reads it back exactly.

The rule for "ordinary": printable (``str.isprintable``: no C0/C1 controls,
no line or paragraph separators, no other Unicode spaces, no lone
surrogates from undecodable bytes) and free of the three characters that
structure a record: space, ``=`` and ``"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

_STRUCTURE = frozenset(' ="')


def field(value: object) -> str:
    """``value`` as one log field value: as is if ordinary, else a JSON string."""
    text = str(value)
    if text and text.isprintable() and _STRUCTURE.isdisjoint(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def path(address: object | None) -> str:
    """An envelope address as Postfix logs it, ``<local@domain>`` (``<>`` for
    None, the null sender), quoted as one field when it needs to be."""
    return field(f"<{address if address is not None else ''}>")


def paths(addresses: Iterable[object]) -> str:
    """Several envelope addresses, ``<a>,<b>``, as one field."""
    return field(",".join(f"<{a}>" for a in addresses))


def parse(message: str) -> tuple[list[str], dict[str, str]]:
    """Read back a record ``field`` wrote: its bare words (an event name, a
    Postfix-style prefix) and its ``key=value`` fields, quoted values decoded.
    A key given twice keeps its first value (a later one could only be forged)."""
    words: list[str] = []
    fields: dict[str, str] = {}
    at, end = 0, len(message)
    while at < end:
        if message[at] == " ":
            at += 1
            continue
        token = _TOKEN.match(message, at)
        assert token is not None  # the pattern matches any non-space run
        at = token.end()
        key, value = token.group("key"), token.group("value")
        if key is None:
            words.append(token.group(0))
        elif key not in fields:
            fields[key] = _decoded(value)
    return words, fields


def _decoded(value: str) -> str:
    if value.startswith('"'):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


# A field is key=value (the value a JSON string, or a run without spaces);
# anything else up to the next space is a bare word.
_TOKEN = re.compile(r'(?P<key>[A-Za-z_][\w.-]*)=(?P<value>"(?:[^"\\]|\\.)*"|[^ ]*)|[^ ]+')
