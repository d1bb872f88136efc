"""[filters] config: milters as strings or tables, hooks, defaults, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from postoffice.config.settings import ConfigError, MilterSettings, Settings, load_settings


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "postoffice.toml"
    path.write_text(text)
    return load_settings(path)


def test_defaults_are_off(tmp_path: Path) -> None:
    f = load(tmp_path, "").filters
    assert not f.enabled and f.default_action == "tempfail" and f.junk_folder


def test_milters_and_hooks(tmp_path: Path) -> None:
    f = load(
        tmp_path,
        "[filters]\n"
        'default_action = "accept"\n'
        'milters = ["inet:127.0.0.1:11332",'
        ' {address = "unix:/run/x.sock", default_action = "reject", eom_timeout = 5}]\n'
        'hooks = ["pkg.mod:Hook"]\n'
        "hook_timeout = 2\n",
    ).filters
    assert f.enabled and f.hooks == ("pkg.mod:Hook",) and f.hook_timeout == 2.0
    assert f.milters == (
        MilterSettings("inet:127.0.0.1:11332", "accept"),
        MilterSettings("unix:/run/x.sock", "reject", eom_timeout=5.0),
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('default_action = "maybe"', "filters.default_action"),
        ('hooks = ["nocolon"]', "filters.hooks[0]"),
        ('hooks = ["bad-name.x:Y"]', "filters.hooks[0]"),
        ('milters = ["tcp:1.2.3.4:5"]', "filters.milters[0].address"),
        ('milters = ["inet:host"]', "filters.milters[0].address"),
        (
            'milters = [{address = "unix:/x", default_action = "x"}]',
            "filters.milters[0].default_action",
        ),
        ('milters = [{address = "unix:/x", bogus = 1}]', "filters.milters[0].bogus"),
        ("hook_timeout = 0", "filters.hook_timeout"),
        ('rspamd_controller = "ftp://x"', "filters.rspamd_controller"),
        ("nonsense = 1", "filters.nonsense"),
    ],
)
def test_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[filters]\n{text}\n")
    assert info.value.key == key
