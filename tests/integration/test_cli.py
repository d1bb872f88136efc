"""The real ``postoffice`` command in a subprocess, as an administrator runs it."""

from __future__ import annotations

import os
import smtplib
import sqlite3
import subprocess
import sys
from pathlib import Path

import argon2
import pytest

from postoffice.config.settings import CONFIG_ENV
from tests.support.server import write_config


def run(
    *args: str,
    cwd: Path,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    return subprocess.run(
        [sys.executable, "-m", "postoffice", *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        # No controlling terminal: getpass must not open /dev/tty and wait for a human.
        start_new_session=True,
    )


def make_config(root: Path, name: str = "postoffice.toml", **top: object) -> Path:
    values: dict[str, object] = {
        "hostname": "mail.example.test",
        "data_dir": "data",
        "domains": ["example.test"],
    }
    values.update(top)
    sections = values.pop("sections", {})
    path = root / name
    write_config(path, values, sections)  # type: ignore[arg-type]
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return make_config(tmp_path)


def po(cfg: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return run("-c", str(cfg), *args, cwd=cfg.parent, input=input)


def ok(cfg: Path, *args: str, input: str | None = None) -> str:
    result = po(cfg, *args, input=input)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(cfg: Path, *args: str, code: int = 1, input: str | None = None) -> str:
    result = po(cfg, *args, input=input)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("postoffice: "), result.stderr
    return result.stderr


def stored_hash(cfg: Path, address: str) -> str:
    conn = sqlite3.connect(cfg.parent / "data" / "accounts.sqlite3")
    try:
        row = conn.execute("SELECT password_hash FROM users WHERE address = ?", (address,))
        return str(row.fetchone()[0])
    finally:
        conn.close()


# --- help --------------------------------------------------------------------------------


def test_top_level_help(tmp_path: Path) -> None:
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0
    for word in ("serve", "user", "domain", "alias", "check", "-c PATH", "first steps"):
        assert word in result.stdout
    assert run("--version", cwd=tmp_path).stdout.startswith("postoffice ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["user", "--help"], ["add", "passwd", "remove", "list", "examples:"]),
        (["user", "add", "--help"], ["--password-stdin", "ADDRESS", "examples:", "-c PATH"]),
        (["user", "passwd", "--help"], ["--password-stdin", "example"]),
        (["domain", "--help"], ["add", "remove", "list", "examples:"]),
        (["alias", "--help"], ["@domain", "postmaster", "examples:"]),
        (["alias", "add", "--help"], ["ALIAS", "TARGET", "catch-all"]),
        (["serve", "--help"], ["SIGTERM", "example"]),
        (["check", "--help"], ["Exit status", "example"]),
    ],
)
def test_every_level_has_help(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for word in expected:
        assert word in result.stdout


@pytest.mark.parametrize("args", [[], ["user"], ["domain"], ["alias"]])
def test_bare_command_or_group_prints_its_help(tmp_path: Path, args: list[str]) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: postoffice" in result.stderr
    assert "COMMAND" in result.stderr


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run("frobnicate", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


# --- users -------------------------------------------------------------------------------


def test_user_add_with_password_stdin(cfg: Path) -> None:
    out = ok(cfg, "user", "add", "Alice@Example.TEST", "--password-stdin", input="s3cret pw\n")
    assert "added user alice@example.test" in out
    maildir = cfg.parent / "data" / "mail" / "example.test" / "alice"
    assert all((maildir / sub).is_dir() for sub in ("tmp", "new", "cur"))
    assert (cfg.parent / "data").stat().st_mode & 0o777 == 0o700
    hashed = stored_hash(cfg, "alice@example.test")
    assert hashed.startswith("$argon2id$")
    # Only the newline ended the line; the space is part of the password.
    assert argon2.PasswordHasher().verify(hashed, "s3cret pw")
    assert ok(cfg, "user", "list") == "alice@example.test\n"


def test_user_add_refusals(cfg: Path) -> None:
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="pw\n")
    assert "exists already" in fails(
        cfg, "user", "add", "ALICE@example.test", "--password-stdin", input="pw\n"
    )
    assert "empty password" in fails(
        cfg, "user", "add", "bob@example.test", "--password-stdin", input="\n"
    )
    assert "line breaks" in fails(
        cfg, "user", "add", "bob@example.test", "--password-stdin", input="a\nb\n"
    )
    assert "not a local domain" in fails(
        cfg, "user", "add", "bob@elsewhere.test", "--password-stdin", input="pw\n"
    )
    for bad in ("../x@example.test", "bob", '"bob"@example.test', "bob@[127.0.0.1]"):
        fails(cfg, "user", "add", bad, "--password-stdin", input="pw\n")
    assert not (cfg.parent / "data" / "mail" / "example.test" / "bob").exists()
    assert ok(cfg, "user", "list") == "alice@example.test\n"


def test_user_passwd_and_remove(cfg: Path) -> None:
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="old\n")
    ok(cfg, "user", "passwd", "alice@example.test", "--password-stdin", input="new\n")
    hasher = argon2.PasswordHasher()
    assert hasher.verify(stored_hash(cfg, "alice@example.test"), "new")
    assert "no such user" in fails(
        cfg, "user", "passwd", "nobody@example.test", "--password-stdin", input="x\n"
    )
    out = ok(cfg, "user", "remove", "alice@example.test")
    assert "kept" in out
    assert (cfg.parent / "data" / "mail" / "example.test" / "alice" / "new").is_dir()
    assert ok(cfg, "user", "list") == ""
    assert "no such user" in fails(cfg, "user", "remove", "alice@example.test")


def test_user_add_and_passwd_prompt_twice(cfg: Path) -> None:
    # Without --password-stdin and without a terminal getpass reads stdin; a
    # mismatch between the two entries is refused.
    result = po(cfg, "user", "add", "bob@example.test", input="one\ntwo\n")
    assert result.returncode == 1
    assert "do not match" in result.stderr
    assert ok(cfg, "user", "list") == ""
    result = po(cfg, "user", "add", "bob@example.test", input="same pw\nsame pw\n")
    assert result.returncode == 0, result.stderr
    assert "Password for bob@example.test" in result.stderr  # the prompt
    assert argon2.PasswordHasher().verify(stored_hash(cfg, "bob@example.test"), "same pw")
    ok(cfg, "user", "passwd", "bob@example.test", input="newer\nnewer\n")
    assert argon2.PasswordHasher().verify(stored_hash(cfg, "bob@example.test"), "newer")


def test_list_commands_on_a_fresh_config_create_nothing(cfg: Path) -> None:
    assert ok(cfg, "user", "list") == ""
    assert ok(cfg, "alias", "list") == ""
    assert ok(cfg, "domain", "list") == "example.test  (config file)\n"
    assert not (cfg.parent / "data").exists()


# --- domains and aliases -------------------------------------------------------------------


def test_domains(cfg: Path) -> None:
    assert ok(cfg, "domain", "add", "Other.TEST") == "added domain other.test\n"
    assert ok(cfg, "domain", "list") == "example.test  (config file)\nother.test\n"
    assert "exists already" in fails(cfg, "domain", "add", "other.test")
    assert "config file" in fails(cfg, "domain", "add", "example.test")
    assert "config file" in fails(cfg, "domain", "remove", "example.test")
    assert "invalid domain" in fails(cfg, "domain", "add", "bad..test")
    ok(cfg, "user", "add", "carol@other.test", "--password-stdin", input="pw\n")
    assert "remove them first" in fails(cfg, "domain", "remove", "other.test")
    ok(cfg, "user", "remove", "carol@other.test")
    ok(cfg, "domain", "remove", "other.test")
    assert "no such domain" in fails(cfg, "domain", "remove", "other.test")
    assert ok(cfg, "domain", "list") == "example.test  (config file)\n"


def test_aliases(cfg: Path) -> None:
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="pw\n")
    ok(cfg, "alias", "add", "postmaster@example.test", "alice@example.test")
    assert "is an alias" in fails(
        cfg, "user", "add", "postmaster@example.test", "--password-stdin", input="pw\n"
    )
    result = po(cfg, "alias", "add", "team@example.test", "alice@example.test", "Bob@Remote.test")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    ok(cfg, "alias", "add", "@example.test", "alice@example.test")
    assert ok(cfg, "alias", "list") == (
        "@example.test -> alice@example.test\n"
        "postmaster@example.test -> alice@example.test\n"
        "team@example.test -> alice@example.test, Bob@remote.test\n"
    )
    assert "exists already" in fails(cfg, "alias", "add", "team@example.test", "x@y.test")
    assert "must not shadow" in fails(cfg, "alias", "add", "alice@example.test", "x@y.test")
    assert "not a local domain" in fails(cfg, "alias", "add", "x@remote.test", "alice@example.test")
    assert "not a local domain" in fails(cfg, "alias", "add", "@remote.test", "alice@example.test")
    fails(cfg, "alias", "add", "x@example.test", "not-an-address")
    ok(cfg, "alias", "remove", "team@example.test")
    assert "no such alias" in fails(cfg, "alias", "remove", "team@example.test")
    assert "team@" not in ok(cfg, "alias", "list")


def test_alias_to_unknown_local_target_warns(cfg: Path) -> None:
    result = po(cfg, "alias", "add", "x@example.test", "ghost@example.test")
    assert result.returncode == 0
    assert "warning: ghost@example.test is not a user or alias" in result.stderr


def test_alias_needs_a_target(cfg: Path) -> None:
    result = po(cfg, "alias", "add", "x@example.test")
    assert result.returncode == 2
    assert "TARGET" in result.stderr


# --- config: -c position, discovery, errors -----------------------------------------------


def test_config_option_before_or_after_the_subcommand(tmp_path: Path) -> None:
    a = make_config(tmp_path, "a.toml", domains=["a.test"])
    b = make_config(tmp_path, "b.toml", domains=["b.test"])
    assert run("-c", str(a), "domain", "list", cwd=tmp_path).stdout.startswith("a.test")
    assert run("domain", "list", "-c", str(a), cwd=tmp_path).stdout.startswith("a.test")
    assert run("domain", "-c", str(a), "list", cwd=tmp_path).stdout.startswith("a.test")
    # Given twice, the later one wins.
    assert run("-c", str(a), "domain", "list", "-c", str(b), cwd=tmp_path).stdout.startswith(
        "b.test"
    )


def test_config_discovery_order(tmp_path: Path) -> None:
    explicit = make_config(tmp_path, "explicit.toml", domains=["explicit.test"])
    from_env = make_config(tmp_path, "env.toml", domains=["env.test"])
    env = {CONFIG_ENV: str(from_env)}

    def domains(*args: str, env: dict[str, str] | None = None) -> str:
        result = run(*args, "domain", "list", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()[0]

    assert domains() == "localhost"  # nothing found: the built-in defaults
    make_config(tmp_path, "postoffice.toml", domains=["local.test"])
    assert domains() == "local.test"  # ./postoffice.toml
    assert domains(env=env) == "env.test"  # $POSTOFFICE_CONFIG beats ./postoffice.toml
    assert domains("-c", str(explicit), env=env) == "explicit.test"  # -c beats both


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('hostname = "x.test"\nbogus = 1\n', "bogus", "unknown key"),
        ("[listen]\nsmtp = ['127.0.0.1:99999']\n", "listen.smtp[0]", "out of range"),
        ("[limits]\nmax_message_size = 'big'\n", "limits.max_message_size", "integer"),
        ("[tls]\ncert = 'nope.pem'\nkey = 'nope.pem'\n", "tls.cert", "file not found"),
        ("this is not toml\n", "-", "not valid TOML"),
    ],
)
@pytest.mark.parametrize("command", [["check"], ["user", "list"], ["serve"]])
def test_config_errors_exit_2_with_file_and_key(
    tmp_path: Path, text: str, key: str, reason: str, command: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run("-c", str(path), *command, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"postoffice: {path}: {key}: ")
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = run("-c", str(tmp_path / "missing.toml"), "user", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.toml'}: -: file not found" in result.stderr
    env = {CONFIG_ENV: str(tmp_path / "gone.toml")}
    result = run("user", "list", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "gone.toml" in result.stderr


# --- check -------------------------------------------------------------------------------


def test_check_good_config(cfg: Path) -> None:
    out = ok(cfg, "check")
    assert out.endswith("ok\n")
    assert str(cfg) in out
    assert not (cfg.parent / "data").exists()  # check changes nothing
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="pw\n")
    out = ok(cfg, "check")
    assert "1 user(s)" in out
    assert "nobody receives postmaster@example.test" in out
    ok(cfg, "alias", "add", "postmaster@example.test", "alice@example.test")
    assert "postmaster" not in ok(cfg, "check")


def test_check_warns_without_local_domains(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, domains=[])
    assert "no local domains" in ok(cfg, "check")
    ok(cfg, "domain", "add", "example.test")
    assert "no local domains" not in ok(cfg, "check")


def test_check_with_real_tls_files(tmp_path: Path) -> None:
    from postoffice.net.tls import ensure_self_signed

    cert, key = ensure_self_signed(tmp_path / "tls", "mail.example.test")
    cfg = make_config(tmp_path, sections={"tls": {"cert": str(cert), "key": str(key)}})
    assert "loads" in ok(cfg, "check")


def test_check_reports_bad_tls_files(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    cfg = make_config(tmp_path, sections={"tls": {"cert": "cert.pem", "key": "key.pem"}})
    assert "do not load" in fails(cfg, "check")


def test_check_reports_unusable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "datafile").write_text("I am a file")
    cfg = make_config(tmp_path, data_dir="datafile")
    assert "is not a directory" in fails(cfg, "check")
    cfg = make_config(tmp_path, data_dir="datafile/below")
    assert "cannot be created" in fails(cfg, "check")


def test_check_reports_a_broken_accounts_database(cfg: Path) -> None:
    (cfg.parent / "data").mkdir()
    (cfg.parent / "data" / "accounts.sqlite3").write_bytes(b"garbage" * 1000)
    assert "accounts database" in fails(cfg, "check")
    # The other commands refuse it too, with a message instead of a traceback.
    assert "accounts database" in fails(cfg, "user", "list")


def test_check_reports_listeners_sharing_a_port(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        sections={"listen": {"smtp": ["127.0.0.1:2525"], "pop3": ["127.0.0.1:2525"]}},
    )
    assert "more than one listener" in fails(cfg, "check")


# --- changes while the server runs -----------------------------------------------------------


def test_changes_take_effect_in_a_running_server(tmp_path: Path) -> None:
    from tests.support.server import PostofficeServer

    srv = PostofficeServer(tmp_path)
    srv.start()

    def rcpt(address: str) -> int:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as smtp:
            smtp.ehlo("client.example.net")
            smtp.mail("sender@example.net")
            return smtp.rcpt(address)[0]

    try:
        assert rcpt("late@example.test") == 550
        srv.add_user("late@example.test", "late-password-1")
        assert rcpt("late@example.test") == 250
        assert rcpt("late+tag@example.test") == 250
        # Nobody was made postmaster yet: deferred, as RFC 5321 §4.5.1 requires
        # the mailbox (policy/relay.py).
        assert rcpt("postmaster") == 451
        srv.cli("alias", "add", "postmaster@example.test", "late@example.test")
        assert rcpt("postmaster") == 250  # the bare <postmaster> of RFC 5321 §4.1.1.3
        srv.cli("domain", "add", "new.test")
        srv.cli("alias", "add", "@new.test", "late@example.test")
        assert rcpt("anyone@new.test") == 250
        srv.cli("user", "remove", "late@example.test")
        assert rcpt("late@example.test") == 550
        assert rcpt("anyone@new.test") == 550  # its only target is gone
    finally:
        srv.stop()


def test_queue_group_is_hooked_in_and_takes_config_anywhere(cfg: Path) -> None:
    assert "queue" in run("--help", cwd=cfg.parent).stdout
    after = run("queue", "list", "-c", str(cfg), cwd=cfg.parent)
    before = run("-c", str(cfg), "queue", "list", cwd=cfg.parent)
    assert after.returncode == before.returncode == 0, after.stderr + before.stderr
    assert after.stdout == before.stdout
    bare = run("queue", cwd=cfg.parent)
    assert bare.returncode == 2
    assert "usage: postoffice queue" in bare.stderr
