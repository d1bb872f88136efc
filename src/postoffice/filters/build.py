"""Builds the configured filter chain at start ([filters]).

Why apart: serve, each extra smtp process and ``postoffice check`` must
refuse the same bad filter config with the same message, and the session
must get one ``FilterChain`` (None with no filters: the fast path).
"""

from __future__ import annotations

from postoffice.config.settings import FilterSettings
from postoffice.filters.chain import FilterChain
from postoffice.filters.hooks import HookFilter, HookLoadError, load_hook
from postoffice.filters.interface import Filter
from postoffice.filters.milter import MilterFilter


class FilterSetupError(Exception):
    """[filters] names something that cannot run; ``str()`` says what."""


def build_chain(settings: FilterSettings) -> FilterChain | None:
    """Milters first, then hooks, each in config order; None: none configured.

    Raises FilterSetupError (a hook that does not import, a milter kind not
    available)."""
    if not settings.enabled:
        return None
    filters: list[Filter] = []
    filters.extend(MilterFilter(milter) for milter in settings.milters)
    for spec in settings.hooks:
        try:
            hook = load_hook(spec)
        except HookLoadError as exc:
            raise FilterSetupError(str(exc)) from exc
        filters.append(HookFilter(spec, hook, settings.hook_timeout, settings.default_action))
    return FilterChain(filters)


def filter_problems(settings: FilterSettings) -> list[str]:
    """For ``postoffice check``: why the filters could not start, if so."""
    try:
        build_chain(settings)
    except FilterSetupError as exc:
        return [str(exc)]
    return []
