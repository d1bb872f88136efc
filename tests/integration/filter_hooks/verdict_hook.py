"""Hooks the filter integration tests load into a real server (not a package:
the tests put this directory on the server's PYTHONPATH).

``Scripted`` does what the message asks: RCPT and MAIL addresses with a
"reject"/"tempfail"/"discard"/"quarantine" local part (or +tag) get that verdict at
that stage; at the message stage each "X-Test-Op:" field is one operation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from postoffice.filters.verdicts import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    DeliverToFolder,
    Discard,
    Quarantine,
    Redirect,
    Reject,
    ReplaceBody,
    Tempfail,
)


def _by_local_part(address: str) -> Any:
    local = address.partition("@")[0].rpartition("+")[2]  # alice+reject: "reject"
    if local.startswith("reject"):
        return Reject(553, f"{local} refused by hook", "5.7.27")
    if local.startswith("tempfail"):
        return Tempfail(452, f"{local} later", "4.2.1")
    if local.startswith("discard"):
        return Discard("asked to")
    if local.startswith("quarantine"):
        return Quarantine("asked to at rcpt")
    return None


class Scripted:
    async def helo(self, facts: Any, name: str) -> Any:
        if name == "refuse.example":
            return Reject(550, "no such HELO here", "5.7.1")
        return None

    async def mail(self, facts: Any, sender: str, args: str) -> Any:
        return _by_local_part(sender)

    async def rcpt(self, facts: Any, recipient: str, args: str) -> Any:
        return _by_local_part(recipient)

    async def message(self, facts: Any, message: Any) -> Any:
        out: list[Any] = []
        for name, value in message.headers:
            if name.lower() != "x-test-op":
                continue
            op, _, arg = value.strip().partition(" ")
            if op == "add":
                out.append(AddHeader("X-Hook-Added", arg or "yes"))
            elif op == "insert":
                out.append(AddHeader("X-Hook-Top", arg or "top", 0))
            elif op == "change":
                out.append(ChangeHeader("Subject", 1, arg))
            elif op == "delete":
                out.append(ChangeHeader("X-Remove-Me", 1, ""))
            elif op == "body":
                out.append(ReplaceBody(arg.encode() + b"\r\n"))
            elif op == "add-rcpt":
                out.append(AddRecipient(arg))
            elif op == "del-rcpt":
                out.append(DeleteRecipient(arg))
            elif op == "sender":
                out.append(ChangeSender(arg))
            elif op == "redirect":
                out.append(Redirect(tuple(arg.split(","))))
            elif op == "folder":
                out.append(DeliverToFolder(arg))
            elif op == "spam":
                out.append(AddHeader("X-Spam", "Yes"))
            elif op == "reject":
                out.append(Reject(554, "content refused by hook", "5.7.28"))
            elif op == "tempfail":
                out.append(Tempfail(451, "content later", "4.7.29"))
            elif op == "discard":
                out.append(Discard("content"))
            elif op == "quarantine":
                out.append(Quarantine("hook said so"))
            elif op == "crash":
                raise RuntimeError("hook crashed on purpose")
            elif op == "hang":
                await asyncio.sleep(3600)
            elif op == "bad-return":
                return "not a verdict"
        return out


class RefuseConnect:
    async def connect(self, facts: Any) -> Any:
        return Tempfail(421, "hook says come back later", "4.7.0")


class CrashEverywhere:
    async def mail(self, facts: Any, sender: str, args: str) -> Any:
        raise ValueError("boom in mail")

    async def message(self, facts: Any, message: Any) -> Any:
        raise ValueError("boom in message")


class ClientName:
    """Shows the hooks' ``facts.client_name`` in the stored message."""

    async def message(self, facts: Any, message: Any) -> Any:
        return AddHeader("X-Client-Name", facts.client_name or "unknown")
