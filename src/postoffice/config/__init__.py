"""Settings: frozen dataclasses per TOML section and the loader that validates them."""

from postoffice.config.settings import (
    ConfigError,
    ListenAddress,
    Settings,
    find_config,
    load_settings,
)

__all__ = ["ConfigError", "ListenAddress", "Settings", "find_config", "load_settings"]
