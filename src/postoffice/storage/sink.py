"""The seam between a session and storage: one message, written, then committed or discarded.

Why: a session (SMTP DATA today, IMAP APPEND next) streams a message into
storage without knowing where it goes.  Every place a message is stored
has this one shape: ``storage/maildir.py``'s ``DeliveryWriter`` (Maildirs),
``delivery/queue/writer.py``'s ``QueueWriter`` (the outbound queue) and
``policy/dkim_sign.py``'s ``SigningWriter`` (signs, then stores in the
queue).  Crash safety is the contract: when ``commit`` returns, the message
is on stable storage (file and directory fsync'd), so the session may
answer 250; until then, nothing was promised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

_Result_co = TypeVar("_Result_co", covariant=True)


class MessageSink(Protocol[_Result_co]):
    """One message on its way into storage; used once."""

    async def write(self, data: bytes, newlines: int = -1) -> None:
        """Add content (LF line ends).  ``newlines``: its LF count when the
        caller knows it already (-1: the sink counts them if it needs to).
        Storage failing here (a spill to disk) raises DeliveryError too."""
        ...

    async def commit(self) -> _Result_co:
        """Store durably before returning (what is stored: a queue id, the
        Maildir files); raise DeliveryError (storage/errors.py) if not."""
        ...

    async def discard(self) -> None:
        """Abandon the message (refused, or the client went away); leaves nothing."""
        ...


class HeadedSink(MessageSink[str], Protocol):
    """A sink (the outbound queue's) that can also take a whole message at
    once and put a head made from it on top, in the thread that stores it:
    DKIM signing costs no extra thread trip."""

    async def commit_with_head(self, content: bytes, head: Callable[[bytes], bytes]) -> str:
        """Like ``write(head(content))``, ``write(content)``, ``commit()`` on
        a sink nothing was written to; ``head`` sees ``content`` in the form
        that is stored (mail/folding.py)."""
        ...
