"""Fixtures for the abuse tests: one server per module, with empty mailboxes per test.

A module shares one server (starting one and hashing two passwords costs
about a second); tests that change limits or count failed logins make their
own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.helpers import empty_mailboxes, make_server
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    """One server for the module: example.test with alice and bob."""
    srv = make_server(tmp_path_factory.mktemp("abuse"))
    yield srv
    while RawSmtp.opened:
        RawSmtp.opened.pop().close()
    srv.stop()


@pytest.fixture
def server(shared: PostofficeServer) -> Iterator[PostofficeServer]:
    """The module's server with empty mailboxes, checked to be still running."""
    assert shared.proc is not None and shared.proc.poll() is None, shared.log()
    empty_mailboxes(shared)
    yield shared
    assert shared.proc is not None and shared.proc.poll() is None, shared.log()
