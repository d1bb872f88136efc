"""MTA-STS (RFC 8461) for outbound mail, the pure part: the ``_mta-sts`` TXT
record, the policy file and its MX patterns.

Strict on purpose: a policy we read wrongly could send mail to the wrong
host (too lax) or hold it back (too strict), and the RFC says what to do
with anything it does not describe: a malformed TXT record means "no
policy" (§3.1), a malformed policy file is a fetch failure (§3.2, §5.1:
a cached policy stays in use).  Fetching and caching: delivery/mta_sts_fetch.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STS_VERSION = "STSv1"
MAX_MAX_AGE = 31_557_600  # §3.2: at most one year
MODES = ("enforce", "testing", "none")

# §3.1 ABNF: sts-id = "id=" 1*32(ALPHA / DIGIT); extensions name=value.
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# §3.2: sts-policy-ext-name as for the TXT record, values of VCHAR and WSP.
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_POLICY_VALUE = re.compile(r"[\x21-\x7e](?:[ \t\x21-\x7e]*[\x21-\x7e])?")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
# §3.2: sts-policy-mx-value = ["*."] Domain (RFC 5321 §4.1.2 Domain: LDH labels).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")


class StsPolicyError(ValueError):
    """The policy file is not a valid RFC 8461 §3.2 policy."""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: str  # "enforce", "testing" or "none"
    max_age: int  # seconds
    mx: tuple[str, ...]  # MX patterns, lower case, as listed
    text: tuple[str, ...]  # the policy's lines as served (TLS-RPT policy-string, RFC 8460 §4.3)

    def allows(self, host: str) -> bool:
        """Whether MX host ``host`` matches one of the patterns (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the ``_mta-sts`` TXT records, or None: no policy.

    §3.1: records not starting with ``v=STSv1;`` are discarded; anything but
    exactly one left, or one that does not parse, means no policy."""
    candidates = [r for r in records if r.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # the optional trailing delimiter
    policy_id: str | None = None
    for position, item in enumerate(fields):
        name, eq, value = item.partition("=")
        if position == 0:
            continue  # "v=STSv1", already checked
        if not eq:
            return None
        if name == "id":
            if not _TXT_ID.fullmatch(value) or policy_id is not None:
                return None
            policy_id = value
        elif not (_TXT_EXT_NAME.fullmatch(name) and _TXT_EXT_VALUE.fullmatch(value)):
            return None
    return policy_id


def parse_policy(body: bytes) -> StsPolicy:
    """The policy file (§3.2): ``key: value`` lines ending in CRLF or LF.

    version, mode and max_age must each appear once; mx one or more times
    (none allowed only in mode "none"); unknown keys are ignored (§3.2)."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise StsPolicyError("policy is not ASCII") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the optional final line end
    clean = [line[:-1] if line.endswith("\r") else line for line in lines]
    seen: dict[str, str] = {}
    mx: list[str] = []
    for line in clean:
        key, colon, rest = line.partition(":")
        value = rest.strip(" \t")
        if not colon or not _POLICY_KEY.fullmatch(key) or not _POLICY_VALUE.fullmatch(value):
            raise StsPolicyError(f"malformed policy line {line[:80]!r}")
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise StsPolicyError(f"malformed mx pattern {value[:80]!r}")
            mx.append(value.lower())
        elif key in ("version", "mode", "max_age"):
            if key in seen:
                raise StsPolicyError(f"{key} given twice")
            seen[key] = value
    if seen.get("version") != STS_VERSION:
        raise StsPolicyError("version is not STSv1")
    mode = seen.get("mode")
    if mode not in MODES:
        raise StsPolicyError(f"bad mode {mode!r}")
    age = seen.get("max_age", "")
    if not _MAX_AGE.fullmatch(age) or int(age) > MAX_MAX_AGE:
        raise StsPolicyError(f"bad max_age {age!r}")
    if not mx and mode != "none":
        raise StsPolicyError("no mx pattern")
    return StsPolicy(mode, int(age), tuple(mx), tuple(clean))


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: a pattern matches the MX host name exactly, or ``*.`` matches
    exactly one leftmost label ("*.example.com" matches "mx.example.com",
    not "example.com" nor "a.mx.example.com").  Case-insensitive; a
    trailing dot on the host is the same name."""
    pattern, host = pattern.lower(), host.lower().removesuffix(".")
    if not pattern.startswith("*."):
        return pattern == host
    first, dot, rest = host.partition(".")
    return bool(first) and bool(dot) and rest == pattern[2:]
