"""DKIM keys on disk (policy/dkim_keys.py) and the signer (policy/dkim_sign.py)."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import stat
from pathlib import Path

import dkim
import pytest

from postoffice.policy.dkim_keys import (
    ED25519,
    RSA,
    DkimKeyError,
    KeyStore,
    generate,
    load_keys,
    public_key_data,
    txt_record,
    zone_txt,
)
from postoffice.policy.dkim_sign import DkimSigner

MESSAGE = (
    b"From: Alice <alice@example.test>\nTo: bob@remote.test\nSubject: hi\n"
    b"List-Unsubscribe: <mailto:u@example.test>\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
    b"\nBody line\n"
)
JAN = datetime.datetime(2025, 1, 15, tzinfo=datetime.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_makes_two_private_keys_with_safe_permissions(tmp_path: Path) -> None:
    keys = generate(tmp_path, "Example.TEST", now=JAN)
    assert [(k.domain, k.selector, k.algorithm) for k in keys] == [
        ("example.test", "202501r", RSA),
        ("example.test", "202501e", ED25519),
    ]
    directory = tmp_path / "dkim" / "example.test"
    assert mode(tmp_path / "dkim") == 0o700 and mode(directory) == 0o700
    for key in keys:
        assert mode(key.path) == 0o600
    assert mode(directory / "keys.json") == 0o600
    assert load_keys(tmp_path, "example.test") == keys
    # RSA 2048 (RFC 8301 §3.2: at least 1024, 2048 recommended); Ed25519 raw 32 bytes.
    rsa_der = base64.b64decode(public_key_data(keys[0]))
    assert len(rsa_der) == 294  # SubjectPublicKeyInfo of a 2048-bit key
    assert len(base64.b64decode(public_key_data(keys[1]))) == 32
    assert txt_record(keys[0]).startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    assert txt_record(keys[1]).startswith("v=DKIM1; k=ed25519; p=")


def test_generate_refuses_existing_keys_unless_rotating(tmp_path: Path) -> None:
    first = generate(tmp_path, "example.test", now=JAN)
    with pytest.raises(DkimKeyError, match="--rotate"):
        generate(tmp_path, "example.test", now=JAN)
    second = generate(tmp_path, "example.test", rotate=True, now=JAN)
    # Same month: new names, never a reused selector.
    assert [k.selector for k in second] == ["202501r2", "202501e2"]
    assert load_keys(tmp_path, "example.test") == second
    assert all(k.path.exists() for k in first)  # old keys stay until removed by hand
    index = json.loads((tmp_path / "dkim" / "example.test" / "keys.json").read_text())
    assert index["previous"] == ["202501r", "202501e"]


def test_bad_names_and_broken_index_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DkimKeyError):
        generate(tmp_path, "../etc")
    with pytest.raises(DkimKeyError):
        generate(tmp_path, "[127.0.0.1]")
    generate(tmp_path, "example.test", now=JAN)
    index = tmp_path / "dkim" / "example.test" / "keys.json"
    index.write_text('{"keys": [{"selector": "../../x", "algorithm": "rsa-sha256"}]}')
    with pytest.raises(DkimKeyError):
        load_keys(tmp_path, "example.test")
    index.write_text("not json")
    with pytest.raises(DkimKeyError):
        load_keys(tmp_path, "example.test")


def test_zone_txt_splits_long_values_into_255_character_strings() -> None:
    line = zone_txt("s._domainkey.example.test", "v=DKIM1; p=" + "A" * 400)
    assert line.startswith('s._domainkey.example.test. IN TXT ( "v=DKIM1; p=AAA')
    strings = line.split('"')[1::2]
    assert [len(s) for s in strings] == [255, 156]
    assert zone_txt("example.test", "v=spf1 -all") == 'example.test. IN TXT "v=spf1 -all"'


def test_key_store_sees_new_and_rotated_keys_without_restart(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    assert store.keys_for("example.test") == []
    generate(tmp_path, "example.test", now=JAN)
    first = store.keys_for("example.test")
    assert [k.key.selector for k in first] == ["202501r", "202501e"]
    assert store.keys_for("example.test") is first  # unchanged: cached
    generate(tmp_path, "example.test", rotate=True, now=JAN)
    assert [k.key.selector for k in store.keys_for("example.test")] == ["202501r2", "202501e2"]


def verify_all(signed: bytes, records: dict[str, str]) -> list[bool]:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    d = dkim.DKIM(signed)
    count = signed.count(b"DKIM-Signature:")
    return [bool(d.verify(i, dnsfunc=dnsfunc)) for i in range(count)]


def test_signer_signs_with_both_keys_relaxed_and_oversigns_from(tmp_path: Path) -> None:
    keys = generate(tmp_path, "example.test", now=JAN)
    fields = DkimSigner(KeyStore(tmp_path)).sign_blocking(MESSAGE)
    assert fields.count(b"DKIM-Signature:") == 2
    assert b"\r" not in fields and fields.endswith(b"\n")
    tags = dkim.util.parse_tag_value(fields.split(b"DKIM-Signature:")[1])
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.test"
    signed_headers = [h.strip() for h in tags[b"h"].split(b":")]
    assert signed_headers.count(b"from") == 2  # one more than present: oversigned
    assert b"list-unsubscribe-post" in signed_headers  # RFC 8058 §4
    assert b"received" not in signed_headers
    records = {k.dns_name: txt_record(k) for k in keys}
    assert verify_all(fields + MESSAGE, records) == [True, True]
    # The same message with CRLF line ends (as it travels) verifies too.
    crlf = (fields + MESSAGE).replace(b"\n", b"\r\n")
    assert verify_all(crlf, records) == [True, True]


def test_signer_skips_domains_without_keys_and_survives_broken_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer = DkimSigner(KeyStore(tmp_path))
    assert signer.sign_blocking(MESSAGE) == b""  # no keys: unsigned
    assert signer.sign_blocking(b"Subject: no from\n\nx\n") == b""
    keys = generate(tmp_path, "example.test", now=JAN)
    keys[0].path.write_bytes(b"garbage")
    (keys[0].path.parent / "keys.json").touch()  # a new mtime: reload
    with caplog.at_level(logging.ERROR, "postoffice.dkim"):
        assert signer.sign_blocking(MESSAGE) == b""
        assert "cannot load keys" in caplog.text
