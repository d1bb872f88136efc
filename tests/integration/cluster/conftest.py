"""Fixtures for the [cluster] tests: one PostgreSQL per test session, a fresh
database per test (tests/support/postgres.py).

Without Debian's postgresql (or the psycopg driver) these tests skip outside
CI and fail in CI, as the other tests needing an external program do."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer, postgres_bindir
from tests.support.server import PostofficeServer


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed (scripts/test.sh installs it)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bindir = postgres_bindir()
    if bindir is None:
        _missing("PostgreSQL (initdb)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg (the [cluster] extra)")
    assert bindir is not None
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    name = postgres.create_database()
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


def _nodes(root: Path, pg_url: str, count: int) -> Iterator[tuple[PostofficeServer, ...]]:
    sections = {
        "cluster": {"database": pg_url},
        # Plain USER/PASS from loopback; a login polled before the account
        # reached the node must not slow the next one down.
        "auth": {"allow_plaintext_loopback": True, "throttle_after": 1000},
    }
    nodes = tuple(
        PostofficeServer(root / f"node{i}", sections=sections) for i in range(1, count + 1)
    )
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def two_nodes(tmp_path: Path, pg_url: str) -> Iterator[tuple[PostofficeServer, ...]]:
    """Two postoffice nodes (own data dirs and ports) on one database."""
    yield from _nodes(tmp_path, pg_url, 2)


@pytest.fixture
def three_nodes(tmp_path: Path, pg_url: str) -> Iterator[tuple[PostofficeServer, ...]]:
    yield from _nodes(tmp_path, pg_url, 3)
