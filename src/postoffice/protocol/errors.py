"""The two ways a sans-I/O protocol core can fail, shared by every core.

h11's split: a ``LocalProtocolError`` is our own code driving a core out of
sequence (answering an event twice, asking for the next event before
answering this one): a bug, never the peer's doing.  A
``RemoteProtocolError`` is the peer breaking the protocol so badly that the
connection cannot go on (a reply line that is not ``ddd text``).  Peers'
ordinary mistakes are not errors: the server cores turn them into events
(``Rejected``, ``BadCommand``) that the session answers.
"""

from __future__ import annotations


class LocalProtocolError(Exception):
    """Our session used a core out of sequence (a bug in our code)."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol's syntax or limits: the connection is unusable."""
