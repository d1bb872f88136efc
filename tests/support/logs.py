"""The server's log as records: the line format and its key=value fields.

A record is ``<time> postoffice[<pid>]: <LEVEL> <logger>: <message>``; the
message is "key=value" fields split on spaces, a value with a space, "=",
'"', a control or non-printable character written as a JSON string
(src/postoffice/logfmt.py).
"""

from __future__ import annotations

import json
import re

from tests.support.server import PostofficeServer

LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d postoffice\[\d+\]: [A-Z]+ postoffice"
)
# The message of a record: after "<time> postoffice[<pid>]: <LEVEL> <logger>: ".
LOG_MESSAGE = re.compile(LOG_LINE.pattern + r"[\w.]*: (.*)$")

_FIELD = re.compile(r'([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|[^ ]*)')


def fields(record: str) -> list[tuple[str, str]]:
    """The key=value fields of a log record, quoted values decoded."""
    match = LOG_MESSAGE.match(record)
    assert match, record
    message = match.group(1)
    out = []
    for key, value in _FIELD.findall(message):
        out.append((key, json.loads(value) if value.startswith('"') else value))
    return out


def records(srv: PostofficeServer, start: str) -> list[dict[str, str]]:
    """Each log record whose message starts with ``start``, as a dict; a key
    that appears twice in one record (a forged field) fails the test."""
    found = []
    for line in srv.log().splitlines():
        match = LOG_MESSAGE.match(line)
        if match and match.group(1).startswith(start):
            pairs = fields(line)
            keys = [k for k, _ in pairs]
            assert len(keys) == len(set(keys)), f"a field appears twice: {line}"
            found.append(dict(pairs))
    return found
