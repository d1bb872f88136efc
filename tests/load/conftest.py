"""The load tests measure as well as check: figures are printed, kept in a
file under pytest's base temp dir, and listed at the end of the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FIGURES: list[str] = []
_FILE: list[Path] = []


@pytest.fixture
def report(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, object, str], None]:
    """``report(name, value, unit)``: record one measured figure."""
    path = tmp_path_factory.getbasetemp() / "load-figures.txt"
    if not _FILE:
        _FILE.append(path)

    def record(name: str, value: object, unit: str) -> None:
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        line = f"{name}: {shown} {unit}"
        FIGURES.append(line)
        print(line)
        with open(path, "a") as fh:
            fh.write(line + "\n")

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("load figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(written to {_FILE[0]})")
