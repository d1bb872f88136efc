"""Python hooks: filters written as plain Python objects, run in-process.

Why: the one filter kind no other mail server has.  ``[filters] hooks =
["package.module:Class"]`` names a class the server imports and
instantiates (no arguments) once at start; each SMTP connection then calls
whichever of its coroutines it defines, in SMTP order:

    async def connect(self, facts) -> ...
    async def helo(self, facts, name) -> ...
    async def mail(self, facts, sender, args) -> ...
    async def rcpt(self, facts, recipient, args) -> ...
    async def message(self, facts, message) -> ...     # a SpooledMessage
    async def delivered(self, facts, report) -> None    # a DeliveryReport

each returning None (accept), a verdict (``Reject(550, "...")``), a
modification (``AddHeader(...)``), a ``FilterResult``, or a list of
verdicts and modifications (docs/filters.md).  Every call is bounded by
``[filters] hook_timeout``; an exception or timeout becomes
``default_action`` with the traceback in the log (filters/chain.py).

The object is shared by all connections of a process (with [limits]
smtp_processes > 1 each process has its own): state kept across messages
belongs in a file or database, not in the object, if it must be shared.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Iterable
from typing import Any

from postoffice.filters.interface import DeliveryReport, SessionFacts, SpooledMessage
from postoffice.filters.verdicts import (
    ACCEPT,
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    DeliverToFolder,
    Discard,
    FilterResult,
    Modification,
    Quarantine,
    Redirect,
    Reject,
    ReplaceBody,
    Tempfail,
    Verdict,
)

STAGES = ("connect", "helo", "mail", "rcpt", "message", "delivered")
_VERDICTS = (Accept, Reject, Tempfail, Discard, Quarantine)
_MODIFICATIONS = (
    AddHeader,
    ChangeHeader,
    ReplaceBody,
    AddRecipient,
    DeleteRecipient,
    ChangeSender,
    Redirect,
    DeliverToFolder,
)


class HookLoadError(Exception):
    """A hook named in [filters] hooks cannot be used; ``str()`` says why."""


def load_hook(spec: str) -> object:
    """Import "package.module:Class" and make the hook object."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own code failing
        raise HookLoadError(
            f"[filters] hooks: cannot import {module_name!r} for {spec!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    target = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HookLoadError(f"[filters] hooks: {module_name!r} has no {attr!r}") from None
    if inspect.isclass(target):
        try:
            target = target()
        except Exception as exc:
            raise HookLoadError(
                f"[filters] hooks: {spec!r} could not be made: {type(exc).__name__}: {exc}"
            ) from exc
    stages = [s for s in STAGES if callable(getattr(target, s, None))]
    if not stages:
        raise HookLoadError(f"[filters] hooks: {spec!r} defines none of {', '.join(STAGES)}")
    for stage in stages:
        if not inspect.iscoroutinefunction(getattr(target, stage)):
            raise HookLoadError(f"[filters] hooks: {spec}.{stage} must be an async def")
    return target


def result_of(value: Any) -> FilterResult:
    """What a hook returned, as a FilterResult; TypeError for anything else."""
    if value is None:
        return FilterResult()
    if isinstance(value, FilterResult):
        return value
    items: Iterable[Any] = value if isinstance(value, list | tuple) else (value,)
    verdict: Verdict = ACCEPT
    mods: list[Modification] = []
    for item in items:
        if isinstance(item, _VERDICTS):
            if not isinstance(verdict, Accept):
                raise TypeError(f"two verdicts returned: {verdict!r} and {item!r}")
            verdict = item
        elif isinstance(item, _MODIFICATIONS):
            mods.append(item)
        else:
            raise TypeError(f"not a verdict or modification: {item!r}")
    return FilterResult(verdict, tuple(mods))


class HookFilter:
    """A loaded hook as a ``Filter`` (filters/interface.py)."""

    def __init__(self, spec: str, hook: object, timeout: float, default_action: str) -> None:
        self._name = f"hook {spec}"
        self._hook = hook
        self._timeout = timeout
        self._default_action = default_action

    @property
    def name(self) -> str:
        return self._name

    @property
    def default_action(self) -> str:
        return self._default_action

    async def open(self, facts: SessionFacts) -> HookSession:
        return HookSession(self._hook, self._timeout)

    async def aclose(self) -> None:
        close = getattr(self._hook, "aclose", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await asyncio.wait_for(close(), self._timeout)


class HookSession:
    """One connection's calls into a hook, each bounded by the timeout."""

    def __init__(self, hook: object, timeout: float) -> None:
        self._hook = hook
        self._timeout = timeout

    async def _call(self, stage: str, *args: Any) -> FilterResult:
        method = getattr(self._hook, stage, None)
        if method is None:
            return FilterResult()
        async with asyncio.timeout(self._timeout):
            value = await method(*args)
        return result_of(value)

    async def connect(self, facts: SessionFacts) -> FilterResult:
        return await self._call("connect", facts)

    async def helo(self, facts: SessionFacts, name: str) -> FilterResult:
        return await self._call("helo", facts, name)

    async def mail(self, facts: SessionFacts, sender: str, args: str) -> FilterResult:
        return await self._call("mail", facts, sender, args)

    async def rcpt(self, facts: SessionFacts, recipient: str, args: str) -> FilterResult:
        return await self._call("rcpt", facts, recipient, args)

    async def message(self, facts: SessionFacts, message: SpooledMessage) -> FilterResult:
        return await self._call("message", facts, message)

    async def delivered(self, facts: SessionFacts, report: DeliveryReport) -> None:
        method = getattr(self._hook, "delivered", None)
        if method is not None:
            async with asyncio.timeout(self._timeout):
                await method(facts, report)

    async def abort(self) -> None:
        return None

    async def close(self) -> None:
        return None
