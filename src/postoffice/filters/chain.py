"""Runs the configured filters in config order for one SMTP connection.

Why: the SMTP session asks one question per stage and wants one answer;
combining several filters' answers, and making a broken filter (exception,
timeout, unreachable) give its ``default_action`` instead of an error that
could take the session or the server down, is done once, here.

Combining: the first Reject, Tempfail or Discard ends the stage (later
filters are not asked); Quarantine is remembered and the next filters are
still asked; modifications (message stage only) are concatenated in
config order.  Every filter sees the message as received.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from postoffice.filters.interface import (
    DeliveryReport,
    Filter,
    FilterSession,
    SessionFacts,
    SpooledMessage,
)
from postoffice.filters.verdicts import (
    ACCEPTED,
    Accept,
    FilterResult,
    Modification,
    Quarantine,
    Verdict,
    default_verdict,
)

log = logging.getLogger("postoffice.filters")


@dataclass(slots=True)
class _Member:
    filter: Filter
    session: FilterSession | None  # None: open() failed


class FilterChain:
    """The configured filters; ``open`` one ``ChainSession`` per connection."""

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def __bool__(self) -> bool:
        return bool(self.filters)

    async def open(self, facts: SessionFacts) -> ChainSession:
        members = []
        for f in self.filters:
            try:
                session: FilterSession | None = await f.open(facts)
            except Exception:
                log.error("filter %s: could not open a session", f.name, exc_info=True)
                session = None
            members.append(_Member(f, session))
        return ChainSession(members)

    async def aclose(self) -> None:
        for f in self.filters:
            try:
                await f.aclose()
            except Exception:
                log.error("filter %s: error at shutdown", f.name, exc_info=True)


class ChainSession:
    """All filters' sessions for one connection, asked stage by stage."""

    def __init__(self, members: list[_Member]) -> None:
        self._members = members

    async def _ask(
        self,
        stage: str,
        call: Callable[[FilterSession], Awaitable[FilterResult]],
        *,
        modifications_allowed: bool = False,
    ) -> FilterResult:
        quarantine: Quarantine | None = None
        mods: list[Modification] = []
        for m in self._members:
            result = await self._one(stage, m, call)
            if result.modifications and not modifications_allowed:
                log.warning(
                    "filter %s: modifications at the %s stage ignored (message stage only)",
                    m.filter.name,
                    stage,
                )
            elif result.modifications:
                mods.extend(result.modifications)
            verdict = result.verdict
            if isinstance(verdict, Quarantine):
                quarantine = quarantine or verdict
            elif not isinstance(verdict, Accept):
                log.info("filter %s: %s at %s", m.filter.name, verdict, stage)
                return FilterResult(verdict, tuple(mods))
        final: Verdict = quarantine if quarantine is not None else Accept()
        return FilterResult(final, tuple(mods))

    async def _one(
        self,
        stage: str,
        m: _Member,
        call: Callable[[FilterSession], Awaitable[FilterResult]],
    ) -> FilterResult:
        if m.session is None:
            return FilterResult(default_verdict(m.filter.default_action, m.filter.name))
        try:
            result = await call(m.session)
            if not isinstance(result, FilterResult):
                raise TypeError(f"returned {result!r}, not a FilterResult")
            return result
        except Exception:
            # Exceptions only: CancelledError (the session is closing) must
            # go through, and KeyboardInterrupt/SystemExit are not ours.
            log.error(
                "filter %s: failed at %s, default_action %s applies",
                m.filter.name,
                stage,
                m.filter.default_action,
                exc_info=True,
            )
            return FilterResult(default_verdict(m.filter.default_action, m.filter.name))

    async def connect(self, facts: SessionFacts) -> FilterResult:
        return await self._ask("connect", lambda s: s.connect(facts))

    async def helo(self, facts: SessionFacts, name: str) -> FilterResult:
        return await self._ask("helo", lambda s: s.helo(facts, name))

    async def mail(self, facts: SessionFacts, sender: str, args: str) -> FilterResult:
        return await self._ask("mail", lambda s: s.mail(facts, sender, args))

    async def rcpt(self, facts: SessionFacts, recipient: str, args: str) -> FilterResult:
        return await self._ask("rcpt", lambda s: s.rcpt(facts, recipient, args))

    async def message(self, facts: SessionFacts, message: SpooledMessage) -> FilterResult:
        return await self._ask(
            "message", lambda s: s.message(facts, message), modifications_allowed=True
        )

    async def delivered(self, facts: SessionFacts, report: DeliveryReport) -> None:
        for m in self._members:
            if m.session is None:
                continue
            try:
                await m.session.delivered(facts, report)
            except Exception:
                log.error("filter %s: failed at delivered", m.filter.name, exc_info=True)

    async def abort(self) -> None:
        await self._each("abort")

    async def close(self) -> None:
        await self._each("close")

    async def _each(self, what: str) -> None:
        for m in self._members:
            if m.session is None:
                continue
            try:
                await (m.session.abort() if what == "abort" else m.session.close())
            except Exception:
                log.error("filter %s: failed at %s", m.filter.name, what, exc_info=True)


__all__ = ["ACCEPTED", "ChainSession", "FilterChain"]
