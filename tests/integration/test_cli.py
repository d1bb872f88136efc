"""The real ``postoffice`` command in a subprocess, as an administrator runs it."""

from __future__ import annotations

import grp
import os
import smtplib
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import argon2
import pytest

from postoffice.config.settings import CONFIG_ENV
from tests.support.ports import free_port
from tests.support.server import LISTENERS, write_config
from tests.support.terminal import on_terminal


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
    # Free ports, not the defaults: `check` tries to bind them.
    sections: dict[str, dict[str, object]] = {
        "listen": {name: [f"127.0.0.1:{free_port()}"] for name in LISTENERS}
    }
    for section, table in values.pop("sections", {}).items():  # type: ignore[attr-defined]
        sections.setdefault(section, {}).update(table)
    path = root / name
    write_config(path, values, sections)  # type: ignore[arg-type]
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A config whose data directory does not exist yet."""
    return make_config(tmp_path)


@pytest.fixture
def cfg(fresh: Path) -> Path:
    """A config with its data directory made by `postoffice init`."""
    ok(fresh, "init")
    return fresh


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
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="alice-pw-1\n")
    assert "exists already" in fails(
        cfg, "user", "add", "ALICE@example.test", "--password-stdin", input="alice-pw-1\n"
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
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="old-password\n")
    ok(cfg, "user", "passwd", "alice@example.test", "--password-stdin", input="new-password\n")
    hasher = argon2.PasswordHasher()
    assert hasher.verify(stored_hash(cfg, "alice@example.test"), "new-password")
    assert "no such user" in fails(
        cfg, "user", "passwd", "nobody@example.test", "--password-stdin", input="x-password\n"
    )
    out = ok(cfg, "user", "remove", "alice@example.test")
    assert "removed user alice@example.test" in out
    assert "moved its Maildir to" in out
    assert not (cfg.parent / "data" / "mail" / "example.test" / "alice").exists()
    assert ok(cfg, "user", "list") == ""
    assert "no such user" in fails(cfg, "user", "remove", "alice@example.test")


def typing(
    require_program: Callable[[str], str], cfg: Path, *args: str, replies: list[bytes]
) -> tuple[int, str]:
    """Run postoffice on a terminal, typing ``replies`` at its prompts."""
    base = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    return on_terminal(
        require_program("setsid"),
        [sys.executable, "-m", "postoffice", "-c", str(cfg), *args],
        replies,
        cwd=cfg.parent,
        env=base,
    )


def test_user_add_and_passwd_prompt_twice_on_a_terminal(
    cfg: Path, require_program: Callable[[str], str]
) -> None:
    code, shown = typing(
        require_program,
        cfg,
        "user",
        "add",
        "bob@example.test",
        replies=[b"one-one-1\n", b"two-two-2\n"],
    )
    assert code == 1, shown
    assert "Password for bob@example.test: " in shown
    assert "(again): " in shown
    assert "do not match" in shown
    assert "one-one-1" not in shown  # not echoed
    assert ok(cfg, "user", "list") == ""
    code, shown = typing(
        require_program, cfg, "user", "add", "bob@example.test", replies=[b"same pw 12\n"] * 2
    )
    assert code == 0, shown
    assert argon2.PasswordHasher().verify(stored_hash(cfg, "bob@example.test"), "same pw 12")
    code, shown = typing(
        require_program, cfg, "user", "passwd", "bob@example.test", replies=[b"newer-pw-3\n"] * 2
    )
    assert code == 0, shown
    assert argon2.PasswordHasher().verify(stored_hash(cfg, "bob@example.test"), "newer-pw-3")


def test_ctrl_d_at_the_password_prompt_is_a_message(
    cfg: Path, require_program: Callable[[str], str]
) -> None:
    for replies in ([b"\x04"], [b"first-try-1\n", b"\x04"]):
        code, shown = typing(
            require_program, cfg, "user", "add", "bob@example.test", replies=replies
        )
        assert code == 1, shown
        assert "no password given" in shown
        assert "Traceback" not in shown
    assert ok(cfg, "user", "list") == ""


def test_no_terminal_and_no_password_stdin_is_a_message(cfg: Path) -> None:
    # No controlling terminal (start_new_session) and nothing on stdin: no
    # prompt can be shown, and the password must not be read from stdin
    # with echo on as getpass would.
    for stdin in ("", "some-password\n"):
        result = po(cfg, "user", "add", "bob@example.test", input=stdin)
        assert result.returncode == 1, result.stderr
        assert "--password-stdin" in result.stderr
        assert "Traceback" not in result.stderr
    assert ok(cfg, "user", "list") == ""


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("a", "shorter than 8"),
        ("   ", "blank"),
        ("\t  \t", "blank"),
        ("seven77", "shorter than 8"),
        ("carolina", "own name"),
        ("Carolina@Example.test", "own name"),
    ],
)
def test_weak_passwords_are_refused(cfg: Path, password: str, why: str) -> None:
    for command in (["user", "add", "carolina@example.test"],):
        err = fails(cfg, *command, "--password-stdin", input=password + "\n")
        assert "weak password" in err and why in err and "--allow-weak" in err
    assert ok(cfg, "user", "list") == ""
    # --allow-weak is for tests that mean a weak password.
    ok(
        cfg,
        "user",
        "add",
        "carolina@example.test",
        "--password-stdin",
        "--allow-weak",
        input=password + "\n",
    )
    assert argon2.PasswordHasher().verify(stored_hash(cfg, "carolina@example.test"), password)
    err = fails(
        cfg, "user", "passwd", "carolina@example.test", "--password-stdin", input=password + "\n"
    )
    assert why in err
    ok(cfg, "user", "passwd", "carolina@example.test", "--password-stdin", input="long enough pw\n")


def test_list_commands_on_an_initialised_data_dir_create_nothing(cfg: Path) -> None:
    (cfg.parent / "data" / "accounts.sqlite3").unlink()
    assert ok(cfg, "user", "list") == ""
    assert ok(cfg, "alias", "list") == ""
    assert ok(cfg, "domain", "list") == "example.test  (config file)\n"
    assert not (cfg.parent / "data" / "accounts.sqlite3").exists()


# --- domains and aliases -------------------------------------------------------------------


def test_domains(cfg: Path) -> None:
    assert ok(cfg, "domain", "add", "Other.TEST") == "added domain other.test\n"
    assert ok(cfg, "domain", "list") == "example.test  (config file)\nother.test\n"
    assert "exists already" in fails(cfg, "domain", "add", "other.test")
    assert "config file" in fails(cfg, "domain", "add", "example.test")
    assert "config file" in fails(cfg, "domain", "remove", "example.test")
    assert "invalid domain" in fails(cfg, "domain", "add", "bad..test")
    ok(cfg, "user", "add", "carol@other.test", "--password-stdin", input="carol-pw-1\n")
    assert "remove them first" in fails(cfg, "domain", "remove", "other.test")
    ok(cfg, "user", "remove", "carol@other.test")
    ok(cfg, "domain", "remove", "other.test")
    assert "no such domain" in fails(cfg, "domain", "remove", "other.test")
    assert ok(cfg, "domain", "list") == "example.test  (config file)\n"


def test_aliases(cfg: Path) -> None:
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="alice-pw-1\n")
    ok(cfg, "alias", "add", "postmaster@example.test", "alice@example.test")
    assert "is an alias" in fails(
        cfg, "user", "add", "postmaster@example.test", "--password-stdin", input="alice-pw-1\n"
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
    (tmp_path / "data").mkdir()
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

    (tmp_path / "postoffice-data").mkdir()  # the built-in default's data_dir
    (tmp_path / "data").mkdir()  # the configs'
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
        ("this is not toml\n", "", "not valid TOML"),
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
    where = f"{path}: {key}: " if key else f"{path}: {reason}"
    assert result.stderr.startswith(f"postoffice: {where}")
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = run("-c", str(tmp_path / "missing.toml"), "user", "list", cwd=tmp_path)
    assert result.returncode == 2
    # The file as a whole is wrong: no key between the file and the reason.
    assert result.stderr == f"postoffice: {tmp_path / 'missing.toml'}: file not found\n"
    env = {CONFIG_ENV: str(tmp_path / "gone.toml")}
    result = run("user", "list", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "gone.toml" in result.stderr


# --- check -------------------------------------------------------------------------------


def test_check_good_config(fresh: Path) -> None:
    cfg = fresh
    out = ok(cfg, "check")
    assert out.endswith("ok\n")
    assert str(cfg) in out
    assert not (cfg.parent / "data").exists()  # check changes nothing
    ok(cfg, "init")
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="alice-pw-1\n")
    out = ok(cfg, "check")
    assert "1 user(s)" in out
    assert "nobody receives postmaster@example.test" in out
    ok(cfg, "alias", "add", "postmaster@example.test", "alice@example.test")
    assert "postmaster" not in ok(cfg, "check")


def test_check_warns_without_local_domains(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, domains=[])
    assert "no local domains" in ok(cfg, "check")
    ok(cfg, "init")
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


def test_check_reports_a_broken_accounts_database(fresh: Path) -> None:
    cfg = fresh
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
        srv.cli("user", "remove", "late@example.test", "--force")  # aliases name it
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


# --- one data directory: refuse to make a second one quietly (#19 item 1) ---------------


@pytest.mark.parametrize(
    "command",
    [
        ["user", "list"],
        ["user", "add", "you@localhost", "--password-stdin"],
        ["domain", "add", "example.test"],
        ["domain", "list"],
        ["alias", "list"],
        ["alias", "add", "a@localhost", "b@localhost"],
        ["queue", "list"],
        ["queue", "flush"],
        ["dkim", "generate", "localhost"],
        ["doctor"],
    ],
)
def test_commands_refuse_a_data_dir_that_does_not_exist(tmp_path: Path, command: list[str]) -> None:
    # Run from a directory with no config: the built-in defaults, ./postoffice-data.
    result = run(*command, cwd=tmp_path, input="a-good-password\n")
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert f"data directory {tmp_path / 'postoffice-data'} does not exist" in err
    # The command by its name, the queue's (from another module) too.
    assert f"`postoffice {' '.join(command[:2])}` does not make one" in err
    assert "config: <built-in defaults>" in err
    assert f"no ./postoffice.toml in {tmp_path}" in err
    assert "/etc/postoffice/postoffice.toml" in err
    assert "-c CONFIG" in err and "postoffice init" in err
    assert "Traceback" not in err
    assert not (tmp_path / "postoffice-data").exists()


def test_the_refusal_names_the_server_running_elsewhere(tmp_path: Path) -> None:
    from tests.support.server import PostofficeServer

    srv = PostofficeServer(tmp_path / "srv")
    srv.start()
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = run("user", "add", "you@example.test", "--password-stdin", cwd=elsewhere)
        assert result.returncode == 1
        assert f"pid {srv.proc.pid if srv.proc else 0} serves data directory {srv.data_dir}" in (
            result.stderr
        )
        assert f"-c {srv.config}" in result.stderr  # how it was started
        # `check` (which needs no data dir) mentions it too.
        checked = run("check", cwd=elsewhere)
        assert f"note: a server is running elsewhere: pid {srv.proc.pid if srv.proc else 0}" in (
            checked.stdout
        )
        # With that server's config, the same command works on its data.
        ok(
            srv.config,
            "user",
            "add",
            "you@example.test",
            "--password-stdin",
            input="a-good-password\n",
        )
    finally:
        srv.stop()


def test_init_makes_the_data_dir_and_is_idempotent(fresh: Path) -> None:
    data = fresh.parent / "data"
    out = ok(fresh, "init")
    assert f"made data directory {data}" in out
    assert f"-c {fresh}" in out
    assert (data / "accounts.sqlite3").is_file() and (data / "mail").is_dir()
    assert data.stat().st_mode & 0o777 == 0o700
    assert "exists already" in ok(fresh, "init")
    ok(fresh, "user", "add", "alice@example.test", "--password-stdin", input="alice-pw-1\n")


def test_the_system_config_comes_after_the_local_one(
    tmp_path: Path, require_program: Callable[[str], str], require_root: None
) -> None:
    """/etc/postoffice/postoffice.toml, seen through an overlay in a private
    mount namespace: nothing outside this test sees the file."""
    unshare = require_program("unshare")
    upper, work = tmp_path / "upper", tmp_path / "work"
    (upper / "postoffice").mkdir(parents=True)
    work.mkdir()
    system = make_config(
        tmp_path, "system.toml", domains=["system.test"], data_dir=str(tmp_path / "sysdata")
    )
    (upper / "postoffice" / "postoffice.toml").write_text(system.read_text())
    (tmp_path / "sysdata").mkdir()
    here = tmp_path / "here"
    here.mkdir()
    script = (
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc"
        f" && cd {here} && {sys.executable} -m postoffice domain list"
        f" && cp {tmp_path / 'local.toml'} ./postoffice.toml && mkdir data"
        f" && {sys.executable} -m postoffice domain list"
    )
    make_config(tmp_path, "local.toml", domains=["local.test"])
    base = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=base,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [
        "system.test  (config file)",
        "local.test  (config file)",
    ]
    assert not Path("/etc/postoffice/postoffice.toml").exists()  # only in that namespace


# --- removing users (#19 item 6) ---------------------------------------------------------


def test_user_remove_names_the_aliases_and_needs_force(cfg: Path) -> None:
    for user in ("alice", "bob"):
        ok(cfg, "user", "add", f"{user}@example.test", "--password-stdin", input=f"{user}-pw-12\n")
    ok(cfg, "alias", "add", "team@example.test", "alice@example.test", "bob@example.test")
    ok(cfg, "alias", "add", "@example.test", "alice+catchall@example.test")
    ok(cfg, "alias", "add", "x@example.test", "carol@remote.test")
    err = fails(cfg, "user", "remove", "alice@example.test")
    assert "@example.test, team@example.test" in err and "--force" in err
    assert "alice@example.test" in ok(cfg, "user", "list")  # nothing changed
    out = ok(cfg, "user", "remove", "alice@example.test", "--force")
    assert "removed it from alias team@example.test (left: bob@example.test)" in out
    assert "removed alias @example.test (it had no other target)" in out
    assert ok(cfg, "alias", "list") == (
        "team@example.test -> bob@example.test\nx@example.test -> carol@remote.test\n"
    )


def test_a_removed_users_mail_is_never_handed_to_the_next(cfg: Path) -> None:
    data = cfg.parent / "data"
    maildir = data / "mail" / "example.test" / "alice"
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="alice-pw-12\n")
    (maildir / "new" / "1.M1P1.host,S=5,W=6").write_text("hi!\n")
    out = ok(cfg, "user", "remove", "alice@example.test")
    moved = [p for p in (data / "removed" / "example.test").iterdir()]
    assert len(moved) == 1 and moved[0].name.startswith("alice-")
    assert f"moved its Maildir to {moved[0]}" in out
    assert (moved[0] / "new" / "1.M1P1.host,S=5,W=6").read_text() == "hi!\n"
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="new-alice-1\n")
    assert list((maildir / "new").iterdir()) == []  # a new alice starts empty
    # --delete-mail deletes it instead.
    (maildir / "new" / "2.M1P1.host,S=5,W=6").write_text("hi!\n")
    assert f"deleted its Maildir {maildir}" in ok(
        cfg, "user", "remove", "alice@example.test", "--delete-mail"
    )
    assert not maildir.exists()
    assert len(list((data / "removed" / "example.test").iterdir())) == 1


def test_user_add_refuses_a_maildir_left_with_mail(cfg: Path) -> None:
    # Left by an older postoffice's `user remove`, or copied in from elsewhere.
    maildir = cfg.parent / "data" / "mail" / "example.test" / "alice"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "cur" / "1.M1P1.host,S=5,W=6:2,S").write_text("old!\n")
    err = fails(cfg, "user", "add", "alice@example.test", "--password-stdin", input="alice-pw-12\n")
    assert "holds 1 message(s)" in err and "--reuse-maildir" in err
    ok(
        cfg,
        "user",
        "add",
        "alice@example.test",
        "--password-stdin",
        "--reuse-maildir",
        input="alice-pw-12\n",
    )
    assert (maildir / "cur" / "1.M1P1.host,S=5,W=6:2,S").exists()


# --- aliases and keys (#19 items 9, 10) ------------------------------------------------


def test_alias_loops_are_refused(cfg: Path) -> None:
    ok(cfg, "alias", "add", "a@example.test", "b@example.test")
    err = fails(cfg, "alias", "add", "b@example.test", "a@example.test")
    assert (
        "alias b@example.test would make a loop: b@example.test -> a@example.test -> b@example.test"
        in err
    )
    assert "is not a user or alias" not in err
    # Through a plus-address and a longer chain too.
    ok(cfg, "alias", "add", "c@example.test", "a@example.test")
    assert "b@example.test -> c@example.test -> a@example.test -> b@example.test" in fails(
        cfg, "alias", "add", "b@example.test", "c+x@example.test"
    )
    assert ok(cfg, "alias", "list") == (
        "a@example.test -> b@example.test\nc@example.test -> a@example.test\n"
    )


def test_alias_warnings_say_what_the_target_is(cfg: Path) -> None:
    result = po(cfg, "alias", "add", "a@example.test", "ghost@example.test")
    assert "warning: ghost@example.test is not a user or alias (yet)" in result.stderr
    result = po(cfg, "alias", "add", "b@example.test", "a@example.test")
    assert result.returncode == 0
    assert "warning: alias a@example.test delivers to nobody yet" in result.stderr


def test_dkim_generate_warns_for_a_domain_that_is_not_local(cfg: Path) -> None:
    result = po(cfg, "dkim", "generate", "exmaple.test")  # a typo
    assert result.returncode == 0, result.stderr
    assert "warning: exmaple.test is not a local domain here" in result.stderr
    assert "postoffice domain add exmaple.test" in result.stderr
    for domain in ("example.test", "test"):  # local, or the parent of a local one
        result = po(cfg, "dkim", "generate", domain)
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr


# --- check: what would stop serve (#19 items 3, 7) -----------------------------------------


def test_check_reports_a_data_dir_that_cannot_be_made(tmp_path: Path) -> None:
    # Permission bits say root may write there; only trying tells.
    cfg = make_config(tmp_path, data_dir="/proc/postoffice-data")
    err = fails(cfg, "check")
    assert "data_dir /proc/postoffice-data does not exist and cannot be created in /proc" in err
    assert not list(tmp_path.glob(".postoffice-check-*"))  # the probe leaves nothing


def test_check_reports_a_port_in_use_and_an_address_not_here(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_config(
            tmp_path,
            sections={"listen": {"pop3": [f"127.0.0.1:{port}"], "smtp": ["192.0.2.1:2525"]}},
        )
        err = fails(cfg, "check")
    assert f"pop3 listener 127.0.0.1:{port}: Address already in use" in err
    assert "smtp listener 192.0.2.1:2525: 192.0.2.1 is not an address of this machine" in err


def test_check_takes_the_running_servers_ports_for_its_own(tmp_path: Path) -> None:
    from tests.support.server import PostofficeServer

    srv = PostofficeServer(tmp_path)
    srv.start()
    try:
        assert srv.proc is not None
        out = ok(srv.config, "check")
        assert f"a server (pid {srv.proc.pid}) runs on this data directory" in out
    finally:
        srv.stop()


def test_check_reports_files_the_owner_cannot_use_and_broken_maildirs(service_dir: Path) -> None:
    cfg = make_config(service_dir)  # a directory the owner, nobody, can reach
    ok(cfg, "init")
    data = cfg.parent / "data"
    ok(cfg, "user", "add", "alice@example.test", "--password-stdin", input="alice-pw-12\n")
    ok(cfg, "user", "add", "bob@example.test", "--password-stdin", input="bob-pw-123\n")
    ok(cfg, "check")
    for top, dirs, files in os.walk(data):  # the service user's, as it should be...
        for name in [".", *dirs, *files]:
            os.chown(Path(top, name), 65534, 65534, follow_symlinks=False)
    ok(cfg, "check")
    rooty = data / "mail" / "example.test" / "rooty"  # ... but for a Maildir made by hand
    for sub in ("tmp", "new", "cur"):
        (rooty / sub).mkdir(parents=True)
    bob_tmp = data / "mail" / "example.test" / "bob" / "tmp"
    bob_tmp.rmdir()
    bob_tmp.write_text("not a directory")
    os.chown(bob_tmp, 65534, 65534)
    err = fails(cfg, "check")
    assert "4 path(s) in" in err and "are not owned by its owner nobody" in err
    assert "mail/example.test/rooty (root)" in err and "mail/example.test/rooty/tmp (root)" in err
    assert f"chown -R nobody:{grp.getgrgid(65534).gr_name} {data}" in err
    assert "mail/example.test/bob/tmp is not a directory" in err


# --- root and the config file it reads (review #1) ---------------------------------------


def test_root_refuses_a_config_file_that_others_own_or_may_change(
    tmp_path: Path, require_root: None
) -> None:
    """Root running postoffice in a world-writable directory must not act on
    the ./postoffice.toml some other user left there: it names where root
    writes (data_dir) and what serve appends to ([log] file)."""
    here = tmp_path / "shared"
    here.mkdir()
    here.chmod(0o1777)  # like /tmp
    config = make_config(here, data_dir=str(tmp_path / "data"))
    os.chown(config, 65534, 65534)
    for args in (["check"], ["-c", str(config), "check"], ["init"], ["serve"]):
        result = run(*args, cwd=here)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "owned by nobody, not root: run as root, postoffice reads only a config" in (
            result.stderr
        )
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
    # The user who ran sudo could become root anyway: its own file is fine.
    assert run("check", cwd=here, env={"SUDO_UID": "65534"}).returncode == 0
    os.chown(config, 0, 0)
    for mode in (0o666, 0o664):
        config.chmod(mode)
        os.chown(config, 0, 65534)  # group nogroup may write
        result = run("check", cwd=here)
        assert result.returncode == 2
        assert "writable by other users: run as root, postoffice reads only a config" in (
            result.stderr
        )
    config.chmod(0o644)
    assert run("check", cwd=here).returncode == 0


# --- what the trial found (trial.md) --------------------------------------------------------


def test_the_help_examples_password_is_one_user_add_takes(cfg: Path) -> None:
    help_text = run("user", "--help", cwd=cfg.parent).stdout
    example = next(line.strip() for line in help_text.splitlines() if "--password-stdin" in line)
    assert example.startswith("echo '"), example
    result = subprocess.run(
        example.replace("postoffice ", f"{sys.executable} -m postoffice -c {cfg} ", 1),
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "added user alice@example.test" in result.stdout


def test_domain_list_says_where_a_built_in_domain_comes_from(tmp_path: Path) -> None:
    assert run("init", cwd=tmp_path).returncode == 0  # no config: the built-in defaults
    assert run("domain", "list", cwd=tmp_path).stdout == "localhost  (built-in default)\n"


def test_a_closed_output_pipe_ends_the_command_quietly(cfg: Path) -> None:
    """`postoffice dkim generate X | head -2`: the reader goes away first."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "postoffice",
                "-c",
                str(cfg),
                "dkim",
                "generate",
                "example.test",
            ],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert result.stderr == ""
    assert result.returncode == 141  # as a shell shows a command ended by SIGPIPE


def _walkthrough() -> list[str]:
    """The command lines of the README's walkthrough, in order, comments cut."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Five-minute walkthrough", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in section.split("```sh\n")[1:]:
        pending = ""  # a command continued with "\" at the end of its line
        for line in block.split("```", 1)[0].splitlines():
            command = line.split(" #", 1)[0].strip()
            if command.endswith("\\"):
                pending += command[:-1].strip() + " "
                continue
            command = pending + command
            pending = ""
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def test_the_readme_walkthrough_works_as_written(
    tmp_path: Path, require_program: Callable[[str], str]
) -> None:
    """Every account command of the walkthrough, run as written from the
    directory it says (the server, mail and POP3 parts are tested elsewhere):
    bob must be made before the alias and the removal name him."""
    lines = _walkthrough()
    assert lines[0] == "pip install ."
    assert lines[1] == "mkdir ~/mailtest && cd ~/mailtest"
    home = tmp_path / "home"
    here = home / "mailtest"
    here.mkdir(parents=True)
    base = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    env = {**base, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{base['PATH']}"}
    skipped = ("pip ", "mkdir ", "swaks ", "--header", "ls ", "cat ", "curl ", "kill ")
    ran = []
    for line in lines:
        if line.startswith(skipped) or line == "postoffice serve &":
            continue
        ran.append(line)
        if line.startswith("postoffice user add") and "--password-stdin" not in line:
            code, shown = on_terminal(
                require_program("setsid"),
                ["sh", "-c", line],
                [b"alice-s3cret-pass\n"] * 2,
                cwd=here,
                env=env,
            )
            assert code == 0, (line, shown)
            continue
        result = subprocess.run(
            line, shell=True, cwd=here, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (line, result.stderr)
        assert "warning" not in result.stderr, (line, result.stderr)
    assert any("user add bob@example.test" in line for line in ran), ran
    assert any(line.startswith("postoffice user remove bob") for line in ran), ran
    users = run("user", "list", cwd=here, env={"HOME": str(home)}).stdout
    assert users == "alice@example.test\n"


def _section(title: str) -> str:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_run_your_own_domain_commands_work(tmp_path: Path) -> None:
    """The "Run your own domain" walkthrough against the CLI: its init line
    (paths moved under tmp_path, the user who runs the test as [run] user),
    its [acme] and [mta_sts] blocks in place of [tls], then the commands it
    names that need no server and no public DNS, each exiting 0."""
    section = _section("Run your own domain")
    blocks = [b.split("```", 1)[0] for b in section.split("```sh\n")[1:]]
    commands = [line.split(" #", 1)[0].strip() for block in blocks for line in block.splitlines()]
    (init,) = [c for c in commands if " init " in c]
    assert init == "postoffice -c /etc/postoffice/postoffice.toml init mail.example.org example.org"
    assert "postoffice doctor" in commands
    config = tmp_path / "etc" / "postoffice.toml"
    argv = init.replace("/etc/postoffice/postoffice.toml", str(config)).split()[1:]
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout
    extra = ["--data-dir", str(tmp_path / "data"), "--run-user", user.strip(), "--password-stdin"]
    made = run(*argv, *extra, cwd=tmp_path, input="a-long-password-7\n")
    assert made.returncode == 0, made.stderr
    rpt = '_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.org"'
    assert rpt in made.stdout
    # "replace the [tls] section ... with" the [acme] block; then [mta_sts].
    toml = [textwrap.dedent(b.split("```", 1)[0]) for b in section.split("   ```toml\n")[1:]]
    assert [t.split("\n", 1)[0] for t in toml] == ["[acme]", "[mta_sts]"]
    head, tls = config.read_text().split("\n[tls]", 1)
    rest = tls.split("\n[", 1)[1]
    config.write_text(f"{head}\n{toml[0]}\n{toml[1]}\n[{rest}")
    env = {CONFIG_ENV: str(config)}  # as /etc/postoffice/postoffice.toml is found
    for line in (
        "postoffice check",
        "postoffice dkim show example.org",
        "postoffice tlsrpt report --now",
    ):
        assert line in section, line
        result = run(*line.split()[1:], cwd=tmp_path, env=env)
        assert result.returncode == 0, (line, result.stdout, result.stderr)
    status = run("cert", "status", cwd=tmp_path, env=env)  # 1: nothing issued yet
    assert "none issued yet for mail.example.org, mta-sts.example.org" in status.stdout, status
