"""cluster/db.py: per-component schema versions, migrations that fail whole,
and a clear word when the driver is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from postoffice.cluster.db import ClusterError, connect, migrate
from tests.support.server import PostofficeServer


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_a_failing_step_leaves_the_old_schema_whole(pg_url: str) -> None:
    with connect(pg_url, autocommit=True) as conn:
        assert migrate(conn, "demo", ["CREATE TABLE one (x int)"]) == 1
        with pytest.raises(ClusterError, match="demo schema"):
            migrate(
                conn,
                "demo",
                ["CREATE TABLE one (x int)", "CREATE TABLE two (x int); CREATE TABLE bad (x nope)"],
            )
        assert tables(pg_url) == {"postoffice_schema", "one"}  # no "two": rolled back
        row = conn.execute("SELECT version FROM postoffice_schema WHERE component = 'demo'")
        assert row.fetchone() == (1,)
        # Components are versioned apart.
        assert migrate(conn, "other", ["CREATE TABLE three (x int)"]) == 1
        assert migrate(conn, "demo", ["CREATE TABLE one (x int)"]) == 1


def test_without_the_driver_the_cli_says_what_to_install(tmp_path: Path, pg_url: str) -> None:
    blocker = tmp_path / "blocker" / "psycopg"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    node = PostofficeServer(tmp_path / "node", sections={"cluster": {"database": pg_url}})
    result = subprocess.run(
        [sys.executable, "-m", "postoffice", "-c", str(node.config), "user", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(blocker.parent)},
    )
    assert result.returncode != 0
    assert "pip install 'postoffice[cluster]'" in result.stderr
