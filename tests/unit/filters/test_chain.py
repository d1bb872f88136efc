"""filters/chain.py and filters/hooks.py: order, combining, failures -> default_action."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from postoffice.filters.chain import FilterChain
from postoffice.filters.hooks import HookFilter, HookLoadError, load_hook, result_of
from postoffice.filters.interface import SessionFacts
from postoffice.filters.verdicts import (
    Accept,
    AddHeader,
    Discard,
    FilterResult,
    Quarantine,
    Reject,
    Tempfail,
    default_verdict,
)
from postoffice.net.smtp_filtering import stage_reply

FACTS = SessionFacts("192.0.2.1", 1234, "", "mx.example", "smtp")


class Calls:
    def __init__(self, answer: Any, log: list[str], name: str) -> None:
        self.answer, self.log, self.name = answer, log, name

    async def rcpt(self, facts: SessionFacts, recipient: str, args: str) -> Any:
        self.log.append(self.name)
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer == "hang":
            await asyncio.sleep(60)
        return self.answer


def chain(
    *answers: Any, default: str = "tempfail", timeout: float = 5.0
) -> tuple[FilterChain, list[str]]:
    log: list[str] = []
    filters = [
        HookFilter(f"h{i}", Calls(a, log, f"h{i}"), timeout, default) for i, a in enumerate(answers)
    ]
    return FilterChain(filters), log


def rcpt(c: FilterChain) -> FilterResult:
    async def go() -> FilterResult:
        session = await c.open(FACTS)
        try:
            return await session.rcpt(FACTS, "a@b", "")
        finally:
            await session.close()

    return asyncio.run(go())


def test_first_refusal_wins_and_stops_the_chain() -> None:
    c, log = chain(None, Reject(550, "no"), Tempfail())
    assert rcpt(c).verdict == Reject(550, "no")
    assert log == ["h0", "h1"]


def test_quarantine_is_kept_while_the_rest_are_asked() -> None:
    c, log = chain(Quarantine("q"), None, Discard())
    assert rcpt(c).verdict == Discard()
    c, log = chain(Quarantine("q"), None)
    assert rcpt(c).verdict == Quarantine("q") and log == ["h0", "h1"]


def test_modifications_only_at_the_message_stage() -> None:
    c, _ = chain([AddHeader("X", "1")])
    assert rcpt(c) == FilterResult(Accept(), ())


@pytest.mark.parametrize("default", ["tempfail", "accept", "reject"])
@pytest.mark.parametrize("answer", [RuntimeError("boom"), "hang", "not a verdict"])
def test_failures_give_default_action(
    default: str, answer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c, _ = chain(answer, default=default, timeout=0.05)
    assert rcpt(c).verdict == default_verdict(default, "hook h0")
    assert "default_action" in caplog.text and "Traceback" in caplog.text


def test_result_of() -> None:
    assert result_of(None) == FilterResult()
    assert result_of(Reject()) == FilterResult(Reject())
    assert result_of([AddHeader("X", "1"), Quarantine()]) == FilterResult(
        Quarantine(), (AddHeader("X", "1"),)
    )
    with pytest.raises(TypeError):
        result_of([Reject(), Tempfail()])
    with pytest.raises(TypeError):
        result_of(42)


def test_load_hook_refusals() -> None:
    with pytest.raises(HookLoadError, match="cannot import"):
        load_hook("no_such_module_here:X")
    with pytest.raises(HookLoadError, match="has no"):
        load_hook("asyncio:NoSuchThing")
    with pytest.raises(HookLoadError, match="defines none"):
        load_hook("collections:OrderedDict")


def test_verdict_codes_are_checked() -> None:
    with pytest.raises(ValueError):
        Reject(450)
    with pytest.raises(ValueError):
        Tempfail(550)


def test_stage_reply() -> None:
    assert stage_reply(Accept(), "rcpt") is None
    reply = stage_reply(Reject(553, "x", "5.7.27"), "rcpt")
    assert reply is not None and (reply.code, reply.enhanced) == (553, "5.7.27")
    reply = stage_reply(Reject(553, "x", "4.7.1"), "rcpt")  # class contradicts: dropped
    assert reply is not None and reply.enhanced is None
    reply = stage_reply(Tempfail(451, "x", "4.x"), "rcpt")
    assert reply is not None and reply.enhanced is None
