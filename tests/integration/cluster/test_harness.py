"""The test PostgreSQL itself: reachable on loopback, one fresh database per test."""

from __future__ import annotations

import psycopg

from tests.support.postgres import PostgresServer


def test_server_answers_on_loopback(postgres: PostgresServer, pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT inet_server_addr()::text, current_setting('port')").fetchone()
    assert row == ("127.0.0.1/32", str(postgres.port))


def test_each_test_gets_an_empty_database(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        conn.execute("CREATE TABLE scratch (x int)")
    assert tables == (0,)


def test_and_the_next_one_too(pg_url: str) -> None:
    test_each_test_gets_an_empty_database(pg_url)
