"""AcceptShares: which smtp process's turn it is to accept (net/accept.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.net.accept import AcceptShares


def test_the_least_loaded_process_accepts(tmp_path: Path) -> None:
    server = AcceptShares.create(tmp_path, 3, 1000)
    one, two = AcceptShares.open(tmp_path, 1), AcceptShares.open(tmp_path, 2)
    try:
        assert server.my_turn()  # nobody else accepts yet
        for view in (server, one, two):
            view.accepting(True)
        assert server.my_turn() and one.my_turn() and two.my_turn()  # all at 0
        server.opened()
        assert server.my_turn()  # one ahead: within the slack
        server.opened()
        assert not server.my_turn()  # two ahead of the least loaded
        assert one.my_turn() and two.my_turn()
        for _ in range(2):
            one.opened()
            two.opened()
        assert server.my_turn() and one.my_turn() and two.my_turn()  # 2, 2, 2
        two.closed()
        two.closed()
        assert not server.my_turn() and not one.my_turn() and two.my_turn()  # 2, 2, 0

    finally:
        for view in (server, one, two):
            view.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AcceptShares, AcceptShares]]:
    """The server's view and one extra process's, both accepting, none held."""
    server = AcceptShares.create(tmp_path, 2, 1000)
    extra = AcceptShares.open(tmp_path, 1)
    server.accepting(True)
    extra.accepting(True)
    yield server, extra
    server.close()
    extra.close()


def test_the_slack_grows_with_the_load(pair: tuple[AcceptShares, AcceptShares]) -> None:
    server, extra = pair
    for _ in range(160):
        extra.opened()
    for _ in range(171):  # 160 + 1 + 160 // 16
        server.opened()
    assert server.my_turn()
    server.opened()
    assert not server.my_turn()


def test_processes_that_do_not_accept_are_not_waited_for(
    pair: tuple[AcceptShares, AcceptShares],
) -> None:
    server, extra = pair
    server.opened()
    server.opened()
    assert not server.my_turn()
    server.mark_gone(1)  # it died holding no connections
    assert server.my_turn()
    extra.accepting(True)  # its successor joins
    assert not server.my_turn()
    extra.accepting(False)  # stopping
    assert server.my_turn()


def test_counts_never_go_below_zero(pair: tuple[AcceptShares, AcceptShares]) -> None:
    server, extra = pair
    server.closed()
    extra.opened()
    extra.opened()
    assert server.my_turn() and not extra.my_turn()


def test_an_index_beyond_the_file_is_refused(tmp_path: Path) -> None:
    AcceptShares.create(tmp_path, 2, 1000).close()
    with pytest.raises(ValueError):
        AcceptShares.open(tmp_path, 2)


def test_a_stopping_process_stays_out_while_its_sessions_end(
    pair: tuple[AcceptShares, AcceptShares],
) -> None:
    server, extra = pair
    for _ in range(3):
        server.opened()
        extra.opened()
    extra.accepting(False)  # SIGTERM: it stops accepting, sessions go on
    extra.closed()
    extra.closed()
    assert server.my_turn()  # not held back by a process that takes nobody


def test_creating_the_file_again_leaves_a_running_view_intact(tmp_path: Path) -> None:
    running = AcceptShares.create(tmp_path, 2, 1000)
    try:
        running.accepting(True)
        running.opened()
        AcceptShares.create(tmp_path, 4, 1000).close()  # a second `serve` by mistake
        running.opened()  # its map is the old file's: still usable
        assert running.my_turn()
    finally:
        running.close()
