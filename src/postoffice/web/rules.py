"""The account page's own Sieve script: forwarding and a vacation reply.

A mailbox has one active Sieve script, so forwarding and the vacation reply
set on /account live in one script the page writes (``SCRIPT_NAME``) and
reads back with the Sieve parser (``read``): no second store of settings,
and what the page shows is what delivery runs.  A script the page did not
write (another name, or edited by hand into another shape) reads as no
settings; saving the forms then replaces it as the active script, which
the page says.

    require ["vacation"];
    redirect "bob@example.org";
    keep;
    vacation :days 7 :subject "Away" "I am away until Monday.";
"""

from __future__ import annotations

from dataclasses import dataclass

from postoffice.protocol.sieve_parse import Command, SieveSyntaxError, Tag, parse_script

SCRIPT_NAME = "account-page"
MAX_DAYS = 90  # sieve_run caps :days there too
MAX_REASON = 8192
MAX_SUBJECT = 200


@dataclass(frozen=True, slots=True)
class AccountRules:
    forward: str = ""  # an address, or "" for none
    keep_copy: bool = True  # with forward: a copy stays in the mailbox too
    vacation: bool = False
    days: int = 7
    subject: str = ""
    reason: str = ""

    @property
    def empty(self) -> bool:
        return not self.forward and not self.vacation


def sieve_string(text: str) -> str:
    """``text`` as a Sieve quoted string (RFC 5228 §2.4.2: backslash and
    double quote escaped; line breaks kept, as CRLF)."""
    body = text.replace("\r\n", "\n").replace("\\", "\\\\").replace('"', '\\"')
    return '"' + body.replace("\n", "\r\n") + '"'


def script(rules: AccountRules) -> bytes:
    lines = ['require ["vacation"];'] if rules.vacation else []
    if rules.forward:
        lines.append(f"redirect {sieve_string(rules.forward)};")
        if rules.keep_copy:
            lines.append("keep;")
    if rules.vacation:
        line = f"vacation :days {rules.days}"
        if rules.subject:
            line += f" :subject {sieve_string(rules.subject)}"
        lines.append(f"{line} {sieve_string(rules.reason)};")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _one_string(argument: object) -> str | None:
    if isinstance(argument, tuple) and len(argument) == 1 and isinstance(argument[0], str):
        return argument[0]
    return None


def read(data: bytes) -> AccountRules:
    """The settings of a script ``script`` wrote; defaults for anything else."""
    try:
        commands = parse_script(data)
    except SieveSyntaxError:
        return AccountRules()
    found: dict[str, object] = {"keep_copy": False}
    for command in commands:
        if not _read_command(command, found):
            return AccountRules()
    if not found.get("forward"):
        found["keep_copy"] = True
    try:
        return AccountRules(**found)  # type: ignore[arg-type]
    except TypeError:
        return AccountRules()


def _read_command(command: Command, found: dict[str, object]) -> bool:
    """Fill ``found`` from one command of our shape; False: not ours."""
    args = command.arguments
    if command.block is not None or command.tests:
        return False
    if command.name == "require":
        return True
    if command.name == "redirect" and len(args) == 1:
        address = _one_string(args[0])
        found["forward"] = address or ""
        return address is not None
    if command.name == "keep" and not args:
        found["keep_copy"] = True
        return True
    if command.name == "vacation" and args:
        reason = _one_string(args[-1])
        if reason is None:
            return False
        found |= {"vacation": True, "reason": reason}
        rest = list(args[:-1])
        while rest:
            tag = rest.pop(0)
            if not isinstance(tag, Tag) or not rest:
                return False
            value = rest.pop(0)
            if tag.name == "days" and isinstance(value, int):
                found["days"] = value
            elif tag.name == "subject" and _one_string(value) is not None:
                found["subject"] = _one_string(value)
            else:
                return False
        return True
    return False
