"""Property-based fuzzing of config loading: anything in the file gives Settings or a ConfigError.

An administrator's typo must never crash ``postoffice serve`` with a
traceback, nor be half-accepted: ``load_settings`` returns valid Settings
or raises ConfigError naming the file, the key and the reason.  Documents
are built from the real schema (every section and key of the Settings
dataclasses) with values of every TOML type, plausible and not, plus raw
bytes.  The number of examples comes from ``POSTOFFICE_FUZZ_EXAMPLES``
(see README, "Test groups").
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postoffice.config.settings import (
    AuthSettings,
    CheckSettings,
    ConfigError,
    LimitSettings,
    ListenSettings,
    RelaySettings,
    Settings,
    TlsSettings,
    load_settings,
)

EXAMPLES = int(os.environ.get("POSTOFFICE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SECTIONS: dict[str, type] = {
    "listen": ListenSettings,
    "tls": TlsSettings,
    "limits": LimitSettings,
    "auth": AuthSettings,
    "relay": RelaySettings,
    "checks": CheckSettings,
}
TOP_KEYS = [f.name for f in dataclasses.fields(Settings) if f.name not in SECTIONS]


def keys_of(kind: type) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_PLAUSIBLE_TEXT = st.sampled_from(
    ["127.0.0.1:2525", "[::1]:25", "0.0.0.0:0", "127.0.0.1:99999", "host:25", ":25", "127.0.0.1",
     "example.test", "EXAMPLE.TEST", "b\u00fccher.test", "-bad-.test", "a..b", "", " ",
     "/tmp/x", "relative/dir", "127.0.0.0/8", "::1/128", "10.0.0.0/33", "not a network"]
)  # fmt: skip
_SCALAR = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 25, 65535, 65536, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXT,
    _PLAUSIBLE_TEXT,
)
_VALUE = st.one_of(
    _SCALAR,
    st.lists(_SCALAR, max_size=4),
    st.lists(_PLAUSIBLE_TEXT, max_size=4),
    st.dictionaries(st.sampled_from(["a", "host", "port"]), _SCALAR, max_size=2),
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines = []
    for key in draw(st.lists(st.sampled_from([*TOP_KEYS, "unknown_key"]), max_size=3, unique=True)):
        lines.append(f"{key} = {toml_value(draw(_VALUE))}")
    names = draw(st.lists(st.sampled_from([*SECTIONS, "nosuchsection"]), max_size=4, unique=True))
    for name in names:
        lines.append(f"[{name}]")
        known = keys_of(SECTIONS[name]) if name in SECTIONS else ["x"]
        for key in draw(st.lists(st.sampled_from([*known, "typo"]), max_size=4, unique=True)):
            lines.append(f"{key} = {toml_value(draw(_VALUE))}")
    return "\n".join(lines) + "\n"


def load(text: bytes) -> Settings | ConfigError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "postoffice.toml"
        path.write_bytes(text)
        try:
            return load_settings(path)
        except ConfigError as exc:
            assert str(path) in str(exc)  # says which file
            return exc


def check_valid(result: Settings) -> None:
    limits = result.limits
    for name in ("max_recipients", "max_connections", "max_connections_per_ip", "max_errors"):
        assert getattr(limits, name) > 0, name
    for name in ("smtp_timeout", "smtp_data_timeout", "pop3_timeout"):
        value = getattr(limits, name)
        assert value > 0 and value == value and value != float("inf"), name
    for field in dataclasses.fields(ListenSettings):
        for address in getattr(result.listen, field.name):
            assert 0 <= address.port <= 65535
    assert result.data_dir.is_absolute()
    for domain in result.domains:
        assert domain == domain.lower() and domain.isascii()


@FUZZ
@given(documents())
def test_any_document_gives_settings_or_a_config_error(text: str) -> None:
    result = load(text.encode("utf-8"))
    if isinstance(result, Settings):
        check_valid(result)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_give_settings_or_a_config_error(data: bytes) -> None:
    result = load(data)
    if isinstance(result, Settings):
        check_valid(result)


@FUZZ
@given(
    size=st.integers(1, 2**40),
    recipients=st.integers(1, 10_000),
    timeout=st.floats(0.001, 1e6),
    port=st.integers(1, 65535),
    domain=st.from_regex(r"[a-z](?:[a-z0-9-]{0,8}[a-z0-9])?\.(test|example)", fullmatch=True),
)
def test_valid_values_are_taken_as_written(
    size: int, recipients: int, timeout: float, port: int, domain: str
) -> None:
    text = (
        f'domains = ["{domain}"]\n[listen]\nsmtp = ["127.0.0.1:{port}"]\n'
        f"[limits]\nmax_message_size = {size}\nmax_recipients = {recipients}\n"
        f"smtp_timeout = {timeout!r}\n"
    )
    result = load(text.encode())
    assert isinstance(result, Settings), result
    assert result.domains == (domain,)
    assert [(a.host, a.port) for a in result.listen.smtp] == [("127.0.0.1", port)]
    assert result.limits.max_message_size == size
    assert result.limits.max_recipients == recipients
    assert result.limits.smtp_timeout == timeout
