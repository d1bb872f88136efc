"""Templates and static files of the web pages, from package data.

Jinja2 with autoescape on for every template (whatever its name): a display
name, an alias target or a Subject from a trace is text, never markup.  An
undefined name is an error, not an empty string, so a typo fails a test
instead of hiding a value.  Static files are read once, at start, into a
table of exact paths (``/static/style.css``): a request names one of them
or gets 404, so no path a client sends is ever joined to a directory.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2

STATIC_PREFIX = "/static/"
_CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("postoffice.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class Renderer:
    def __init__(self) -> None:
        self.env = environment()

    def page(self, name: str, values: Mapping[str, Any]) -> bytes:
        return self.env.get_template(name).render(**values).encode("utf-8")


def static_files() -> dict[str, StaticFile]:
    """URL path -> file, for every file in the package's static/ folder."""
    found: dict[str, StaticFile] = {}
    folder = importlib.resources.files("postoffice.web") / "static"
    for entry in folder.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if not entry.is_file() or suffix not in _CONTENT_TYPES or name.startswith("."):
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        found[STATIC_PREFIX + name] = StaticFile(body, _CONTENT_TYPES[suffix], etag)
    return found
