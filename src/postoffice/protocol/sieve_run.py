"""Running a parsed Sieve script against one message: tree + message -> actions.

The interpreter is pure: it reads a ``SieveMessage`` (headers, envelope,
size, body text, spam score) the delivery layer built, and returns the
actions to take (``SieveResult``); storing, redirecting and replying are the
caller's job.  So one script run cannot touch a file or a socket, and tests
feed it plain values.

``check_script`` validates a tree once, at upload and before each run:
known commands and tests, each extension ``require``d (RFC 5228 §3.2),
if/elsif/else order.  A script that passes may still fail while running
(a bad regex-free glob cannot, but too many actions can); that raises
``SieveRuntimeError`` and the caller keeps the message in INBOX (§2.10.6).

Extensions: fileinto, envelope, imap4flags, body (:text, :raw, :content), variables (set,
match variables), copy, mailbox (:create; mailboxexists through a callable),
subaddress, relational, comparator-i;ascii-numeric, spamtest, reject,
ereject, vacation (the action only: dedupe is the caller's), date and
currentdate (RFC 5260; without :zone, UTC is the local zone).  Sieve has no
loops, so a run is bounded by the script's size, plus ``max_actions``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import getaddresses, parsedate_to_datetime

from postoffice.protocol.sieve_parse import Argument, Command, Tag, Test

EXTENSIONS = frozenset(
    {
        "fileinto", "envelope", "imap4flags", "body", "variables", "copy", "mailbox",
        "subaddress", "relational", "comparator-i;ascii-numeric", "spamtest", "reject",
        "ereject", "vacation", "date",
    }
)  # fmt: skip

# Which extension each command or test needs (None: core RFC 5228).
_COMMANDS: dict[str, str | None] = {
    "require": None, "if": None, "elsif": None, "else": None, "stop": None,
    "keep": None, "discard": None, "fileinto": "fileinto", "redirect": None,
    "reject": "reject", "ereject": "ereject", "vacation": "vacation",
    "setflag": "imap4flags", "addflag": "imap4flags", "removeflag": "imap4flags",
    "set": "variables",
}  # fmt: skip
_TESTS: dict[str, str | None] = {
    "address": None, "header": None, "exists": None, "size": None, "allof": None,
    "anyof": None, "not": None, "true": None, "false": None, "envelope": "envelope",
    "body": "body", "hasflag": "imap4flags", "mailboxexists": "mailbox",
    "spamtest": "spamtest", "string": "variables", "date": "date", "currentdate": "date",
}  # fmt: skip
_RELATIONS = {"gt", "ge", "lt", "le", "eq", "ne"}
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*|[0-9]+)\}")


class SieveRuntimeError(Exception):
    """The script failed while running; the message goes to INBOX."""


@dataclass(frozen=True, slots=True)
class SieveMessage:
    """What a script may look at; headers already unfolded and RFC 2047-decoded."""

    headers: tuple[tuple[str, str], ...]
    size: int
    envelope_from: str
    envelope_to: str
    body_text: str = ""  # RFC 5173 :text, the text/* parts decoded
    body_raw: str = ""  # :raw, the body as it came
    # :content, each MIME part's type and tested text (§5.2: a leaf's decoded
    # content, a multipart's prologue and epilogue, a message/rfc822's header).
    body_parts: tuple[tuple[str, str], ...] = ()
    spam_score: float | None = None
    now: float = 0.0  # seconds since the epoch, for currentdate (RFC 5260 §5)
    mailbox_exists: Callable[[str], bool] = field(default=lambda _name: False)

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]


@dataclass(frozen=True, slots=True)
class Keep:
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileInto:
    mailbox: str
    flags: tuple[str, ...] = ()
    create: bool = False


@dataclass(frozen=True, slots=True)
class Redirect:
    address: str


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str
    extended: bool  # ereject (RFC 5429): refuse at SMTP time when possible


@dataclass(frozen=True, slots=True)
class Vacation:
    reason: str
    days: int
    subject: str | None
    from_address: str | None
    addresses: tuple[str, ...]
    handle: str
    mime: bool


Action = Keep | FileInto | Redirect | Reject | Vacation


@dataclass(frozen=True, slots=True)
class SieveResult:
    """The actions to take; an implicit keep is already in ``actions`` as ``Keep``."""

    actions: tuple[Action, ...]
    discarded: bool


@dataclass(frozen=True, slots=True)
class RunLimits:
    max_actions: int = 32
    max_redirects: int = 4


class SieveCheckError(ValueError):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.reason = message
        self.line = line
        self.column = column


def check_script(commands: Sequence[Command]) -> frozenset[str]:
    """Validate names, ``require`` and if/elsif/else order; returns the required extensions."""
    required: set[str] = set()
    _check_block(commands, required, top=True)
    return frozenset(required)


def _check_block(commands: Sequence[Command], required: set[str], top: bool) -> None:
    previous = ""
    for index, cmd in enumerate(commands):
        if cmd.name not in _COMMANDS:
            raise SieveCheckError(f"unknown command {cmd.name!r}", cmd.line, cmd.column)
        if cmd.name == "require":
            if not top or any(c.name != "require" for c in commands[:index]):
                raise SieveCheckError("require must come first", cmd.line, cmd.column)
            names = cmd.arguments[0] if len(cmd.arguments) == 1 else None
            if not isinstance(names, tuple):
                raise SieveCheckError("require takes a string list", cmd.line, cmd.column)
            for name in names:
                if name.lower() not in EXTENSIONS:
                    raise SieveCheckError(f"unsupported extension {name!r}", cmd.line, cmd.column)
                required.add(name.lower())
        need = _COMMANDS[cmd.name]
        if need is not None and need not in required:
            raise SieveCheckError(f"{cmd.name} needs require {need!r}", cmd.line, cmd.column)
        if cmd.name in ("elsif", "else") and previous not in ("if", "elsif"):
            raise SieveCheckError(f"{cmd.name} without if", cmd.line, cmd.column)
        is_control = cmd.name in ("if", "elsif", "else")
        if is_control != (cmd.block is not None):
            raise SieveCheckError(f"{cmd.name} block misplaced", cmd.line, cmd.column)
        if cmd.name in ("if", "elsif") and len(cmd.tests) != 1:
            raise SieveCheckError(f"{cmd.name} needs one test", cmd.line, cmd.column)
        _check_arity(cmd.name, cmd.arguments, len(cmd.tests), cmd.line, cmd.column)
        for test in cmd.tests:
            _check_test(test, required)
        if cmd.block is not None:
            _check_block(cmd.block, required, top=False)
        previous = cmd.name


def _check_test(test: Test, required: set[str]) -> None:
    if test.name not in _TESTS:
        raise SieveCheckError(f"unknown test {test.name!r}", test.line, test.column)
    need = _TESTS[test.name]
    if need is not None and need not in required:
        raise SieveCheckError(f"{test.name} needs require {need!r}", test.line, test.column)
    for tag in (a for a in test.arguments if isinstance(a, Tag)):
        if tag.name in ("count", "value") and "relational" not in required:
            raise SieveCheckError(":count/:value need 'relational'", test.line, test.column)
        if tag.name in ("user", "detail") and "subaddress" not in required:
            raise SieveCheckError(f":{tag.name} needs 'subaddress'", test.line, test.column)
    _check_arity(test.name, test.arguments, len(test.tests), test.line, test.column)
    for sub in test.tests:
        _check_test(sub, required)


# name -> (positional arguments at least, at most; nested tests at least, at most)
_ARITY: dict[str, tuple[int, int, int, int]] = {
    "require": (1, 1, 0, 0), "if": (0, 0, 1, 1), "elsif": (0, 0, 1, 1), "else": (0, 0, 0, 0),
    "stop": (0, 0, 0, 0), "keep": (0, 0, 0, 0), "discard": (0, 0, 0, 0),
    "fileinto": (1, 1, 0, 0), "redirect": (1, 1, 0, 0), "reject": (1, 1, 0, 0),
    "ereject": (1, 1, 0, 0), "vacation": (1, 1, 0, 0), "setflag": (1, 2, 0, 0),
    "addflag": (1, 2, 0, 0), "removeflag": (1, 2, 0, 0), "set": (2, 2, 0, 0),
    "address": (2, 2, 0, 0), "header": (2, 2, 0, 0), "envelope": (2, 2, 0, 0),
    "string": (2, 2, 0, 0), "exists": (1, 1, 0, 0), "size": (1, 1, 0, 0),
    "body": (1, 1, 0, 0), "hasflag": (1, 2, 0, 0), "mailboxexists": (1, 1, 0, 0),
    "spamtest": (1, 1, 0, 0), "date": (3, 3, 0, 0), "currentdate": (2, 2, 0, 0),
    "not": (0, 0, 1, 1), "allof": (0, 0, 1, 64), "anyof": (0, 0, 1, 64),
    "true": (0, 0, 0, 0), "false": (0, 0, 0, 0),
}  # fmt: skip
_TAKES_VALUE = {"flags", "days", "subject", "from", "addresses", "handle", "zone", "content"}


def _check_arity(
    name: str, arguments: Sequence[Argument], tests: int, line: int, column: int
) -> None:
    try:
        m = _split_arguments(arguments, _TAKES_VALUE)
    except SieveRuntimeError as exc:
        raise SieveCheckError(str(exc), line, column) from None
    for tag, given in m.other.items():
        if tag in _TAKES_VALUE and not isinstance(given, tuple | int):
            raise SieveCheckError(f":{tag} needs a value", line, column)
    low, high, tests_low, tests_high = _ARITY[name]
    if not low <= len(m.positional) <= high:
        raise SieveCheckError(f"{name}: wrong number of arguments", line, column)
    if not tests_low <= tests <= tests_high:
        raise SieveCheckError(f"{name}: wrong number of tests", line, column)
    if name == "size" and not isinstance(m.positional[0], int):
        raise SieveCheckError("size takes a number", line, column)
    if name != "size" and any(isinstance(p, int) for p in m.positional):
        raise SieveCheckError(f"{name}: a number where a string belongs", line, column)


# ---- matching ---------------------------------------------------------------


@dataclass(slots=True)
class _Match:
    kind: str = "is"
    relation: str = "eq"
    comparator: str = "i;ascii-casemap"
    address_part: str = "all"
    other: dict[str, Argument] = field(default_factory=dict)
    positional: list[tuple[str, ...] | int] = field(default_factory=list)


def _split_arguments(args: Sequence[Argument], takes_value: set[str]) -> _Match:
    m = _Match()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not isinstance(arg, Tag):
            m.positional.append(arg)
            continue
        name = arg.name
        if name in ("is", "contains", "matches"):
            m.kind = name
        elif name in ("count", "value"):
            m.kind = name
            rel = args[i] if i < len(args) else None
            i += 1
            if not isinstance(rel, tuple) or len(rel) != 1 or rel[0].lower() not in _RELATIONS:
                raise SieveRuntimeError(f':{name} needs a relation such as "gt"')
            m.relation = rel[0].lower()
        elif name == "comparator":
            comp = args[i] if i < len(args) else None
            i += 1
            if not isinstance(comp, tuple) or len(comp) != 1:
                raise SieveRuntimeError(":comparator needs a string")
            m.comparator = comp[0].lower()
            if m.comparator not in ("i;ascii-casemap", "i;octet", "i;ascii-numeric"):
                raise SieveRuntimeError(f"unsupported comparator {comp[0]!r}")
        elif name in ("all", "localpart", "domain", "user", "detail"):
            m.address_part = name
        elif name in takes_value:
            m.other[name] = args[i] if i < len(args) else ()
            i += 1
        else:
            m.other[name] = Tag(name)
    return m


def _numeric(value: str) -> int | None:
    # RFC 4790 §9.1: the leading digits; none means "positive infinity".
    digits = re.match(r"[0-9]*", value)
    text = digits.group(0) if digits else ""
    return int(text) if text else None


def _order_key(value: str, comparator: str) -> tuple[int, int, bytes]:
    if comparator == "i;ascii-numeric":
        number = _numeric(value)
        # No digits sorts after every number (RFC 4790 §9.1.1).
        return (1, 0, b"") if number is None else (0, number, b"")
    if comparator == "i;octet":
        return (0, 0, value.encode())
    return (0, 0, value.lower().encode())


def _compare(relation: str, left: str, right: str, comparator: str) -> bool:
    a, b = _order_key(left, comparator), _order_key(right, comparator)
    if relation == "gt":
        return a > b
    if relation == "ge":
        return a >= b
    if relation == "lt":
        return a < b
    if relation == "le":
        return a <= b
    if relation == "ne":
        return a != b
    return a == b


def _glob(pattern: str, casefold: bool) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append("(.*?)" if ch == "*" else "(.)" if ch == "?" else re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL | (re.IGNORECASE if casefold else 0))


class _Runner:
    def __init__(self, message: SieveMessage, required: frozenset[str], limits: RunLimits) -> None:
        self.message = message
        self.required = required
        self.limits = limits
        self.actions: list[Action] = []
        self.cancel_keep = False
        self.discarded = False
        self.flags: list[str] = []
        self.variables: dict[str, str] = {}
        self.match_vars: list[str] = []
        self.redirects = 0

    def expand(self, text: str) -> str:
        if "variables" not in self.required or "${" not in text:
            return text

        def repl(found: re.Match[str]) -> str:
            name = found.group(1)
            if name.isdigit():
                index = int(name)
                return self.match_vars[index] if index < len(self.match_vars) else ""
            return self.variables.get(name.lower(), "")

        return _VAR_REF.sub(repl, text)

    def strings(self, value: tuple[str, ...] | int) -> list[str]:
        if isinstance(value, int):
            raise SieveRuntimeError("expected a string, got a number")
        return [self.expand(s) for s in value]

    def matches(self, m: _Match, values: list[str], keys: list[str]) -> bool:
        if m.kind == "count":
            count = str(len(values))
            return any(_compare(m.relation, count, key, m.comparator) for key in keys)
        for value in values:
            for key in keys:
                if m.kind == "value":
                    if _compare(m.relation, value, key, m.comparator):
                        return True
                elif m.kind == "is":
                    if _compare("eq", value, key, m.comparator):
                        return True
                elif m.kind == "contains":
                    if m.comparator == "i;octet":
                        if key in value:
                            return True
                    elif key.lower() in value.lower():
                        return True
                else:
                    found = _glob(key, m.comparator != "i;octet").fullmatch(value)
                    if found:
                        self.match_vars = [value, *found.groups()]
                        return True
        return False

    def address_values(self, m: _Match, raw: list[str]) -> list[str]:
        out: list[str] = []
        for _name, addr in getaddresses(raw):
            out.append(self.address_part(m.address_part, addr))
        return out

    def address_part(self, part: str, addr: str) -> str:
        local, _, domain = addr.rpartition("@") if "@" in addr else (addr, "", "")
        if part == "localpart":
            return local
        if part == "domain":
            return domain
        if part in ("user", "detail"):
            user, plus, detail = local.partition("+")
            return user if part == "user" else detail if plus else ""
        return addr

    def test(self, t: Test) -> bool:
        name = t.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self.test(t.tests[0])
        if name == "allof":
            return all(self.test(sub) for sub in t.tests)
        if name == "anyof":
            return any(self.test(sub) for sub in t.tests)
        m = _split_arguments(t.arguments, set())
        if name == "exists":
            return all(self.message.header_values(h) for h in self.strings(m.positional[0]))
        if name == "size":
            limit = m.positional[0] if m.positional else 0
            if not isinstance(limit, int):
                raise SieveRuntimeError("size needs a number")
            over = "over" in m.other
            return self.message.size > limit if over else self.message.size < limit
        if name in ("header", "address"):
            if len(m.positional) != 2:
                raise SieveRuntimeError(f"{name} needs a header list and a key list")
            headers, keys = self.strings(m.positional[0]), self.strings(m.positional[1])
            values = [v for h in headers for v in self.message.header_values(h)]
            if name == "address":
                values = self.address_values(m, values)
            return self.matches(m, values, keys)
        if name == "envelope":
            parts, keys = self.strings(m.positional[0]), self.strings(m.positional[1])
            raw = {"from": self.message.envelope_from, "to": self.message.envelope_to}
            found = [
                self.address_part(m.address_part, raw[part.lower()])
                for part in parts
                if part.lower() in raw
            ]
            return self.matches(m, found, keys)
        if name == "body":
            return self.body_test(t.arguments)
        if name == "string":
            sources = self.strings(m.positional[0])
            return self.matches(m, sources, self.strings(m.positional[1]))
        if name == "hasflag":
            return self.matches(m, list(self.flags), self.strings(m.positional[-1]))
        if name == "mailboxexists":
            return all(self.message.mailbox_exists(n) for n in self.strings(m.positional[0]))
        if name in ("date", "currentdate"):
            return self.date_test(name, t.arguments)
        if name == "spamtest":
            # RFC 5235: 0 = not tested, 1..10 scaled; we map rspamd's score
            # (>= 15 is "reject" by default) onto 1..10 as Dovecot's
            # sieve_spamtest_max_value does.
            score = self.message.spam_score
            level = "0" if score is None else str(max(1, min(10, 1 + int(score * 9 / 15))))
            return self.matches(m, [level], self.strings(m.positional[0]))
        raise SieveRuntimeError(f"unknown test {name!r}")

    def body_test(self, arguments: Sequence[Argument]) -> bool:
        # RFC 5173 §5: :raw, :content "type" or (the default) :text.
        m = _split_arguments(arguments, {"content"})
        if len(m.positional) != 1:
            raise SieveRuntimeError("body needs a key list")
        keys = self.strings(m.positional[0])
        if "raw" in m.other:
            values = [self.message.body_raw]
        elif "content" in m.other:
            given = m.other["content"]
            if not isinstance(given, tuple):
                raise SieveRuntimeError(":content needs a string list")
            types = [self.expand(t) for t in given]
            values = [
                text
                for ctype, text in self.message.body_parts
                if any(_content_matches(ctype, t) for t in types)
            ]
        else:
            values = [self.message.body_text]
        return self.matches(m, values, keys)

    def date_test(self, name: str, arguments: Sequence[Argument]) -> bool:
        # RFC 5260 §4-5: a date part of a header's date, or of now, in :zone.
        m = _split_arguments(arguments, {"zone"})
        zone = m.other.get("zone")
        tz: timezone | None = UTC
        if isinstance(zone, tuple) and zone:
            tz = _zone(zone[0])
        elif "originalzone" in m.other:
            tz = None
        if name == "currentdate":
            if len(m.positional) != 2:
                raise SieveRuntimeError("currentdate needs a date part and a key list")
            when = datetime.fromtimestamp(self.message.now, tz or UTC)
            part_arg, keys_arg = m.positional
        else:
            if len(m.positional) != 3:
                raise SieveRuntimeError("date needs a header, a date part and a key list")
            header = self.strings(m.positional[0])[0]
            values = self.message.header_values(header)
            if not values:
                return False
            try:
                when = parsedate_to_datetime(values[0])
            except (TypeError, ValueError, IndexError):
                return False
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            if tz is not None:
                when = when.astimezone(tz)
            part_arg, keys_arg = m.positional[1], m.positional[2]
        part = self.strings(part_arg)[0].lower()
        value = _date_part(when, part)
        return self.matches(m, [value], self.strings(keys_arg))

    def add(self, action: Action) -> None:
        if len(self.actions) >= self.limits.max_actions:
            raise SieveRuntimeError("too many actions")
        self.actions.append(action)

    def block(self, commands: Sequence[Command]) -> bool:
        """Run commands; False once ``stop`` ran."""
        taken = False
        for cmd in commands:
            name = cmd.name
            if name in ("if", "elsif", "else"):
                if name == "if":
                    taken = False
                if taken:
                    continue
                if name == "else" or self.test(cmd.tests[0]):
                    taken = True
                    assert cmd.block is not None
                    if not self.block(cmd.block):
                        return False
                continue
            if not self.command(cmd):
                return False
        return True

    def command(self, cmd: Command) -> bool:
        name = cmd.name
        m = _split_arguments(
            cmd.arguments, {"flags", "days", "subject", "from", "addresses", "handle"}
        )
        copy = "copy" in m.other
        if name == "require":
            return True
        if name == "stop":
            return False
        if name == "keep":
            self.add(Keep(self.current_flags(m)))
            self.cancel_keep = True
        elif name == "discard":
            self.cancel_keep = True
            self.discarded = True
        elif name == "fileinto":
            (folder,) = self.strings(m.positional[0])[:1] or [""]
            self.add(FileInto(folder, self.current_flags(m), "create" in m.other))
            self.cancel_keep = self.cancel_keep or not copy
        elif name == "redirect":
            self.redirects += 1
            if self.redirects > self.limits.max_redirects:
                raise SieveRuntimeError("too many redirects")
            (target,) = self.strings(m.positional[0])[:1] or [""]
            self.add(Redirect(target))
            self.cancel_keep = self.cancel_keep or not copy
        elif name in ("reject", "ereject"):
            (reason,) = self.strings(m.positional[0])[:1] or [""]
            self.add(Reject(reason, name == "ereject"))
            self.cancel_keep = True
        elif name == "vacation":
            self.add(self.vacation(m))
        elif name in ("setflag", "addflag", "removeflag"):
            flags = [f for s in self.strings(m.positional[-1]) for f in s.split()]
            if name == "setflag":
                self.flags = []
            if name == "removeflag":
                lowered = {f.lower() for f in flags}
                self.flags = [f for f in self.flags if f.lower() not in lowered]
            else:
                self.flags += [f for f in flags if f.lower() not in {x.lower() for x in self.flags}]
        elif name == "set":
            var, value = self.strings(m.positional[0])[0], self.strings(m.positional[1])[0]
            for mod in ("lower", "upper", "lowerfirst", "upperfirst", "quotewildcard", "length"):
                if mod in m.other:
                    value = _modify(mod, value)
            self.variables[var.lower()] = value
        return True

    def current_flags(self, m: _Match) -> tuple[str, ...]:
        if "flags" in m.other:
            given = m.other["flags"]
            if not isinstance(given, tuple):
                raise SieveRuntimeError(":flags needs a string list")
            return tuple(f for s in given for f in self.expand(s).split())
        return tuple(self.flags)

    def vacation(self, m: _Match) -> Vacation:
        def one(key: str) -> str | None:
            value = m.other.get(key)
            return self.expand(value[0]) if isinstance(value, tuple) and value else None

        days = m.other.get("days", 7)
        if not isinstance(days, int):
            raise SieveRuntimeError(":days needs a number")
        addresses = m.other.get("addresses", ())
        reason = self.strings(m.positional[-1])[0] if m.positional else ""
        return Vacation(
            reason=reason,
            days=max(1, min(days, 90)),
            subject=one("subject"),
            from_address=one("from"),
            addresses=tuple(addresses) if isinstance(addresses, tuple) else (),
            handle=one("handle") or reason,
            mime="mime" in m.other,
        )


def _content_matches(ctype: str, wanted: str) -> bool:
    """RFC 5173 §5.2: "" is every type, "type" any of its subtypes,
    "type/subtype" that one; a leading, trailing or second slash none."""
    wanted = wanted.lower()
    if wanted.startswith("/") or wanted.endswith("/") or wanted.count("/") > 1:
        return False
    if not wanted:
        return True
    if "/" in wanted:
        return ctype == wanted
    return ctype.partition("/")[0] == wanted


def _zone(text: str) -> timezone:
    found = re.fullmatch(r"([+-])([0-9]{2})([0-9]{2})", text.strip())
    if not found:
        raise SieveRuntimeError(f"bad :zone {text!r}")
    minutes = int(found.group(2)) * 60 + int(found.group(3))
    return timezone(timedelta(minutes=-minutes if found.group(1) == "-" else minutes))


def _date_part(when: datetime, part: str) -> str:
    offset = when.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    zone = f"{sign}{minutes // 60:02d}{minutes % 60:02d}"
    parts = {
        "year": f"{when.year:04d}",
        "month": f"{when.month:02d}",
        "day": f"{when.day:02d}",
        "date": when.strftime("%Y-%m-%d"),
        # Modified Julian Day (RFC 5260 §4.2): days since 1858-11-17.
        "julian": str((when.date() - datetime(1858, 11, 17).date()).days),
        "hour": f"{when.hour:02d}",
        "minute": f"{when.minute:02d}",
        "second": f"{when.second:02d}",
        "time": when.strftime("%H:%M:%S"),
        "iso8601": when.strftime("%Y-%m-%dT%H:%M:%S") + zone[:3] + ":" + zone[3:],
        "std11": when.strftime("%a, %d %b %Y %H:%M:%S ") + zone,
        "zone": zone,
        "weekday": str((when.weekday() + 1) % 7),  # 0 is Sunday
    }
    if part not in parts:
        raise SieveRuntimeError(f"unknown date part {part!r}")
    return parts[part]


def _modify(mod: str, value: str) -> str:
    if mod == "lower":
        return value.lower()
    if mod == "upper":
        return value.upper()
    if mod == "lowerfirst":
        return value[:1].lower() + value[1:]
    if mod == "upperfirst":
        return value[:1].upper() + value[1:]
    if mod == "quotewildcard":
        return re.sub(r"([*?\\])", r"\\\1", value)
    return str(len(value))


def run_script(
    commands: Sequence[Command], message: SieveMessage, limits: RunLimits | None = None
) -> SieveResult:
    """Run a checked script (``check_script``) against ``message``."""
    required = check_script(commands)
    runner = _Runner(message, required, limits or RunLimits())
    try:
        runner.block(commands)
    except (IndexError, TypeError, ValueError, re.error) as exc:
        # A shape check_script let through: still only the script's failure.
        raise SieveRuntimeError(f"script failed: {exc}") from exc
    actions = list(runner.actions)
    # RFC 5228 §2.10.2: keep unless an action cancelled it.
    if not runner.cancel_keep:
        actions.append(Keep(tuple(runner.flags)))
    return SieveResult(tuple(actions), runner.discarded and not actions)
