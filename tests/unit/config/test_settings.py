"""Config loading: defaults, every section, and refusals that name file and key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from postoffice.config import settings as settings_module
from postoffice.config.settings import (
    CONFIG_ENV,
    AuthSettings,
    ConfigError,
    LimitSettings,
    ListenAddress,
    ListenSettings,
    LogSettings,
    RelaySettings,
    Settings,
    config_origin,
    find_config,
    load_settings,
)


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "postoffice.toml"
    path.write_text(text)
    return load_settings(path)


def refused(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    err = info.value
    assert err.source == str(tmp_path / "postoffice.toml")
    # No key: the file as a whole, "<file>: <reason>" (no stray "-" between).
    assert str(err) == (
        f"{err.source}: {err.key}: {err.reason}" if err.key else f"{err.source}: {err.reason}"
    )
    return err


def test_no_file_is_the_embedded_default() -> None:
    settings = load_settings(None)
    assert settings == Settings(data_dir=Path.cwd() / "postoffice-data")
    assert settings.domains == ("localhost",)
    assert settings.listen.smtp == (ListenAddress("127.0.0.1", 2525),)
    assert settings.tls.cert is None
    # ./postoffice-data where we run, in full: messages name it unambiguously.
    assert settings.accounts_db == Path.cwd() / "postoffice-data" / "accounts.sqlite3"


def test_empty_file_gives_defaults_with_paths_next_to_it(tmp_path: Path) -> None:
    settings = load(tmp_path, "")
    assert settings.source == str(tmp_path / "postoffice.toml")
    assert settings.listen == ListenSettings()
    assert settings.limits == LimitSettings()
    assert settings.auth == AuthSettings()
    assert settings.relay == RelaySettings()
    assert settings.data_dir == tmp_path / "postoffice-data"
    assert settings.hostname  # the machine's name, or localhost if that is unusable


def test_top_level_keys(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        'hostname = "Mail.Example.TEST"\n'
        'data_dir = "/srv/mail-data"\n'
        'domains = ["Example.test", "bücher.example", "example.test"]\n',
    )
    assert settings.hostname == "mail.example.test"
    assert settings.data_dir == Path("/srv/mail-data")
    assert settings.domains == ("example.test", "xn--bcher-kva.example")
    assert settings.mail_dir == Path("/srv/mail-data/mail")
    assert settings.queue_dir == Path("/srv/mail-data/queue")
    assert settings.tls_dir == Path("/srv/mail-data/tls")


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "cert.pem").write_text("x")
    (conf_dir / "key.pem").write_text("x")
    (conf_dir / "postoffice.toml").write_text(
        'data_dir = "data"\n[tls]\ncert = "cert.pem"\nkey = "./key.pem"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../etc/postoffice.toml"))
    assert settings.data_dir.is_absolute()
    assert settings.data_dir.resolve() == conf_dir / "data"
    assert settings.tls.cert is not None and settings.tls.cert.resolve() == conf_dir / "cert.pem"
    assert settings.tls.key is not None and settings.tls.key.resolve() == conf_dir / "key.pem"


def test_listen_section(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "[listen]\n"
        'smtp = ["0.0.0.0:25", "[::1]:25"]\n'
        'submission = ["localhost:587"]\n'
        "submissions = []\n"
        'pop3 = ["127.0.0.1:0"]\n',
    )
    listen = settings.listen
    assert listen.smtp == (ListenAddress("0.0.0.0", 25), ListenAddress("::1", 25))
    assert str(listen.smtp[1]) == "[::1]:25"
    assert listen.submission == (ListenAddress("localhost", 587),)
    assert listen.submissions == ()
    assert listen.pop3 == (ListenAddress("127.0.0.1", 0),)
    assert listen.pop3s == ListenSettings().pop3s  # not given: default


def test_tls_section(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    settings = load(tmp_path, f'[tls]\ncert = "{tmp_path}/c.pem"\nkey = "{tmp_path}/k.pem"\n')
    assert settings.tls.cert == tmp_path / "c.pem"
    assert settings.tls.key == tmp_path / "k.pem"


def test_acme_section(tmp_path: Path) -> None:
    assert load(tmp_path, "").acme.directory == ""  # absent: [tls], else self-signed
    (tmp_path / "ca.pem").write_text("x")
    settings = load(
        tmp_path,
        '[acme]\ndirectory = "https://ca.test/dir"\nemail = "pm@example.test"\n'
        'names = ["Imap.Example.TEST", "imap.example.test"]\nca_bundle = "ca.pem"\n',
    )
    assert settings.acme.directory == "https://ca.test/dir"
    assert settings.acme.email == "pm@example.test"
    assert settings.acme.names == ("imap.example.test",)
    assert settings.acme.ca_bundle == tmp_path / "ca.pem"
    assert refused(tmp_path, '[acme]\nemail = "a@b.test"\n').key == "acme.directory"
    assert refused(tmp_path, '[acme]\ndirectory = "http://ca.test/"\n').key == "acme.directory"
    assert refused(tmp_path, '[acme]\ndirectory = "https://c/"\nnames = ["a b"]\n').key == (
        "acme.names[0]"
    )
    missing = '[acme]\ndirectory = "https://c/"\nca_bundle = "none.pem"\n'
    assert refused(tmp_path, missing).key == "acme.ca_bundle"
    assert refused(tmp_path, '[acme]\ndirectory = "https://c/"\nport = 1\n').key == "acme.port"


def test_limits_and_auth_sections(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "[limits]\nmax_message_size = 1048576\nsmtp_timeout = 30\nmax_recipients = 5\n"
        "[auth]\nallow_plaintext_loopback = true\nthrottle_after = 0\nthrottle_max_delay = 2.5\n",
    )
    assert settings.limits.max_message_size == 1048576
    assert settings.limits.smtp_timeout == 30.0
    assert isinstance(settings.limits.smtp_timeout, float)  # an int is fine for a float
    assert settings.limits.max_recipients == 5
    assert settings.auth == AuthSettings(True, 0, 2.5)


def test_error_and_line_limits(tmp_path: Path) -> None:
    default = load(tmp_path, "").limits
    assert (default.max_errors, default.soft_errors, default.error_delay) == (20, 10, 1.0)
    assert default.max_line_length == 65536
    settings = load(
        tmp_path,
        "[limits]\nmax_errors = 5\nsoft_errors = 0\nerror_delay = 0\nmax_line_length = 998\n",
    )
    assert (settings.limits.max_errors, settings.limits.soft_errors) == (5, 0)
    assert settings.limits.error_delay == 0.0 and settings.limits.max_line_length == 998


def test_throttle_budgets_and_hashing_threads(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "[auth]\nthrottle_window = 60\nthrottle_account_failures = 0\n"
        "throttle_address_failures = 5\nthrottle_global_failures = 1000\n"
        "throttle_known_good = 3600\nhash_workers = 3\n",
    )
    auth = settings.auth
    assert (auth.throttle_window, auth.throttle_known_good) == (60.0, 3600.0)
    assert (auth.throttle_account_failures, auth.throttle_address_failures) == (0, 5)
    assert (auth.throttle_global_failures, auth.hash_workers) == (1000, 3)
    defaults = AuthSettings()
    assert (defaults.throttle_account_failures, defaults.throttle_address_failures) == (10, 30)
    assert (defaults.throttle_global_failures, defaults.throttle_window) == (300, 900.0)


def test_relay_section(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "[relay]\nmx_port = 2525\n"
        'dns_servers = ["127.0.0.1:5353", "[::1]:53"]\n'
        'smarthost = "smtp.example.test:587"\n'
        "retry_schedule = [1, 2.5]\nwarn_after = 0\n",
    )
    relay = settings.relay
    assert relay.mx_port == 2525
    assert relay.dns_servers == (ListenAddress("127.0.0.1", 5353), ListenAddress("::1", 53))
    assert relay.smarthost == ListenAddress("smtp.example.test", 587)
    assert relay.retry_schedule == (1.0, 2.5)
    assert relay.warn_after == 0.0
    assert relay.give_up_after == RelaySettings().give_up_after


def test_empty_smarthost_is_none(tmp_path: Path) -> None:
    assert load(tmp_path, '[relay]\nsmarthost = ""\n').relay.smarthost is None


def test_checks_section(tmp_path: Path) -> None:
    settings = load(tmp_path, '[checks]\nexempt_networks = ["10.0.0.1/8", "2001:db8::/32"]\n')
    assert settings.checks.exempt_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert load(tmp_path, "[checks]\nexempt_networks = []\n").checks.exempt_networks == ()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("hostnme = 'x'\n", "hostnme"),
        ("[listen]\nsmpt = []\n", "listen.smpt"),
        ("[tls]\ncertificate = 'x'\n", "tls.certificate"),
        ("[limits]\nmax_size = 1\n", "limits.max_size"),
        ("[auth]\nallow_plaintext = true\n", "auth.allow_plaintext"),
        ("[relay]\nport = 25\n", "relay.port"),
        ("[checks]\nexempt = []\n", "checks.exempt"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("source = 'x'\n", "source"),  # internal field, not a config key
    ],
)
def test_unknown_keys_are_refused_with_their_dotted_name(
    tmp_path: Path, text: str, key: str
) -> None:
    err = refused(tmp_path, text)
    assert err.key == key
    assert "unknown key" in err.reason


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[listen]\nsmtp = ["127.0.0.1:65536"]\n', "listen.smtp[0]", "out of range"),
        ('[listen]\nsmtp = ["127.0.0.1:-1"]\n', "listen.smtp[0]", "out of range"),
        ('[listen]\npop3 = ["127.0.0.1:pop"]\n', "listen.pop3[0]", "not a number"),
        ('[listen]\npop3 = ["127.0.0.1"]\n', "listen.pop3[0]", "not host:port"),
        ('[listen]\npop3 = [":110"]\n', "listen.pop3[0]", "not host:port"),
        ('[listen]\nsmtp = ["bad host!:25"]\n', "listen.smtp[0]", "not an IP address"),
        ('[listen]\nsmtp = "127.0.0.1:25"\n', "listen.smtp", "must be a list"),
        ("listen = 5\n", "listen", "must be a table"),
        ("[relay]\nmx_port = 0\n", "relay.mx_port", "out of range"),
        ("[relay]\nmx_port = 70000\n", "relay.mx_port", "out of range"),
        ('[relay]\ndns_servers = ["127.0.0.1:0"]\n', "relay.dns_servers[0]", "port 0"),
        ('[relay]\nsmarthost = "relay.test"\n', "relay.smarthost", "not host:port"),
        ("[relay]\nretry_schedule = []\n", "relay.retry_schedule", "positive"),
        ("[relay]\nretry_schedule = [60, -1]\n", "relay.retry_schedule", "positive"),
        (
            "[limits]\nmax_message_size = true\n",
            "limits.max_message_size",
            "must be an integer, not a boolean",
        ),
        ("[limits]\nmax_recipients = 1.5\n", "limits.max_recipients", "must be an integer"),
        ("[limits]\nmax_recipients = 0\n", "limits.max_recipients", "greater than 0"),
        ("[limits]\nsmtp_timeout = -5\n", "limits.smtp_timeout", "negative"),
        ("[limits]\nmax_line_length = 997\n", "limits.max_line_length", "at least 998"),
        ("[limits]\nerror_delay = nan\n", "limits.error_delay", "finite"),
        ("[limits]\nerror_delay = inf\n", "limits.error_delay", "finite"),
        ("[limits]\nsoft_errors = -1\n", "limits.soft_errors", "negative"),
        ("[limits]\nsmtp_timeout = '5'\n", "limits.smtp_timeout", "must be a number, not a string"),
        (
            "[auth]\nallow_plaintext_loopback = 1\n",
            "auth.allow_plaintext_loopback",
            "must be a boolean (true or false), not an integer",
        ),
        ("[auth]\nthrottle_after = false\n", "auth.throttle_after", "must be an integer"),
        ("[auth]\nthrottle_window = 0\n", "auth.throttle_window", "greater than 0"),
        ("[auth]\nthrottle_account_failures = -1\n", "auth.throttle_account_failures", "negative"),
        ("[auth]\nhash_workers = 1.5\n", "auth.hash_workers", "must be an integer"),
        ('[checks]\nexempt_networks = ["10.0.0.0/33"]\n', "checks.exempt_networks[0]", ""),
        ('hostname = "bad_host"\n', "hostname", "invalid domain label"),
        ('hostname = "[127.0.0.1]"\n', "hostname", "host name"),
        ("hostname = 5\n", "hostname", "must be a string"),
        ('domains = ["ok.test", "bad..test"]\n', "domains[1]", "invalid domain label"),
        ('domains = "example.test"\n', "domains", "must be a list"),
        ('data_dir = ""\n', "data_dir", "must not be empty"),
        (
            '[tls]\ncert = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"\n',
            "tls.cert",
            "file not found",
        ),
        ('[tls]\ncert = "/nonexistent/cert.pem"\n', "tls", "both cert and key"),
        ("[tls]\ncert = false\nkey = false\n", "tls.cert", "must be a string"),
        ('[log]\nformat = "xml"\n', "log.format", "must be one of: text"),
        ('[log]\nlevel = "loud"\n', "log.level", "debug, info, warning, error"),
        ("[log]\nfile = 5\n", "log.file", "must be a string"),
        ("[log]\nsyslog = true\n", "log.syslog", "must be a string"),
        ("[log]\nstderr = true\n", "log.stderr", "unknown key"),
    ],
)
def test_bad_values_are_refused_with_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    err = refused(tmp_path, text)
    assert err.key == key
    assert reason in err.reason


def test_missing_key_file_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    err = refused(tmp_path, f'[tls]\ncert = "{tmp_path}/c.pem"\nkey = "{tmp_path}/k.pem"\n')
    assert err.key == "tls.key"
    assert str(tmp_path / "k.pem") in err.reason


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_settings(tmp_path / "missing.toml")
    assert info.value.source == str(tmp_path / "missing.toml")
    assert str(info.value) == f"{tmp_path / 'missing.toml'}: file not found"
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path)  # a directory
    err = refused(tmp_path, "hostname = \n")
    assert "not valid TOML" in err.reason


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert find_config(None) is None
    (tmp_path / "postoffice.toml").write_text("")
    assert find_config(None) == Path("postoffice.toml")
    monkeypatch.setenv(CONFIG_ENV, "/from/env.toml")
    assert find_config(None) == Path("/from/env.toml")
    assert find_config("/explicit.toml") == Path("/explicit.toml")
    monkeypatch.setenv(CONFIG_ENV, "")  # empty: as if unset
    assert find_config(None) == Path("postoffice.toml")


def test_find_config_falls_back_to_the_system_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real /etc path is tried by tests/integration/test_cli.py in a private
    # mount namespace; here the constant points into tmp_path.
    system = tmp_path / "etc" / "postoffice.toml"
    monkeypatch.setattr(settings_module, "SYSTEM_CONFIG", system)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert find_config(None) is None
    assert str(system) in config_origin(None) and str(tmp_path) in config_origin(None)
    system.parent.mkdir()
    system.write_text("")
    assert find_config(None) == system
    assert config_origin(None) == "the system config"
    (tmp_path / "postoffice.toml").write_text("")
    assert find_config(None) == Path("postoffice.toml")  # ./postoffice.toml comes first
    assert config_origin("x.toml") == "given with -c"


def test_log_section(tmp_path: Path) -> None:
    assert load(tmp_path, "").log == LogSettings()
    settings = load(
        tmp_path,
        '[log]\nformat = "text"\nlevel = "WARNING"\nfile = "po.log"\nsyslog = "/dev/log"\n',
    )
    assert settings.log == LogSettings(
        format="text", level="warning", file=tmp_path / "po.log", syslog="/dev/log"
    )


def test_mta_sts_section(tmp_path: Path) -> None:
    assert load(tmp_path, "").mta_sts.mode == "none"  # SPEC: no policy unless asked
    got = load(tmp_path, '[mta_sts]\nmode = "enforce"\nmax_age = 86400\n').mta_sts
    assert (got.mode, got.max_age) == ("enforce", 86400)
    err = refused(tmp_path, '[mta_sts]\nmode = "strict"\n')
    assert err.key == "mta_sts.mode" and "none, testing, enforce" in err.reason
    err = refused(tmp_path, "[mta_sts]\nmax_age = 31557601\n")  # RFC 8461 §3.2
    assert err.key == "mta_sts.max_age"
    assert refused(tmp_path, "[mta_sts]\nid = 1\n").key == "mta_sts.id"


def test_web_admin_networks(tmp_path: Path) -> None:
    assert load(tmp_path, "").web.admin_networks == ()
    settings = load(tmp_path, '[web]\nadmin_networks = ["192.0.2.7/24", "2001:db8::/48"]\n')
    assert settings.web.admin_networks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/48"),
    )
    err = refused(tmp_path, '[web]\nadmin_networks = ["not-a-net"]\n')
    assert err.key == "web.admin_networks[0]"
    assert refused(tmp_path, "[web]\nadmin_network = []\n").key == "web.admin_network"
    assert refused(tmp_path, '[web]\nadmin_networks = "10.0.0.0/8"\n').key == "web.admin_networks"


def test_cluster_section(tmp_path: Path) -> None:
    assert load(tmp_path, "").cluster.database == ""
    assert not load(tmp_path, "").cluster.enabled
    url = "postgresql://po@127.0.0.1:5432/postoffice"
    settings = load(tmp_path, f'[cluster]\ndatabase = "{url}"\n')
    assert settings.cluster.database == url
    assert settings.cluster.enabled
    assert settings.cluster.queue_lease == 900.0
    assert load(tmp_path, "[cluster]\nqueue_lease = 60\n").cluster.queue_lease == 60.0


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[cluster]\ndatabase = "mysql://x/y"\n', "cluster.database", "postgresql://"),
        ('[cluster]\ndatabase = "/var/lib/db"\n', "cluster.database", "postgresql://"),
        ('[cluster]\ndatabase = "postgresql://a b/c"\n', "cluster.database", "spaces"),
        ("[cluster]\ndatabase = 5\n", "cluster.database", "must be a string"),
        ('[cluster]\nblobs = "s3://x"\n', "cluster.blobs", "unknown key"),
        ("[cluster]\nqueue_lease = 0.5\n", "cluster.queue_lease", "at least 1"),
        ("[cluster]\nqueue_lease = -3\n", "cluster.queue_lease", "negative"),
        ("[cluster]\nqueue_lease = inf\n", "cluster.queue_lease", "at least 1"),
        ('[cluster]\nqueue_lease = "15m"\n', "cluster.queue_lease", "must be a number"),
    ],
)
def test_cluster_refusals(tmp_path: Path, text: str, key: str, reason: str) -> None:
    err = refused(tmp_path, text)
    assert err.key == key
    assert reason in err.reason
