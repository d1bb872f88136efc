"""malloc_tuning: glibc takes the thresholds; elsewhere nothing happens."""

from __future__ import annotations

import platform

import pytest

from postoffice import malloc_tuning


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_thresholds() -> None:
    assert malloc_tuning.tune() is True


def test_no_c_library_to_tune_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc_tuning.ctypes.util, "find_library", lambda name: "/nonexistent/libc")
    assert malloc_tuning.tune() is False
