"""``postoffice.dns`` beside dnspython's top-level ``dns``: neither hides the
other (every import is absolute, and the package never runs as ``dns``)."""

from __future__ import annotations

import ast
from pathlib import Path

import dns
import dns.asyncresolver

import postoffice.dns
import postoffice.dns.resolver

SRC = Path(postoffice.__file__).parent


def test_the_resolver_uses_dnspython() -> None:
    assert postoffice.dns.resolver.dns is dns
    assert Path(dns.__file__).parent != Path(postoffice.dns.__file__).parent
    assert hasattr(dns.asyncresolver, "Resolver")


def test_no_relative_imports_in_the_package() -> None:
    """Every import is absolute, so ``dns`` always means dnspython and
    ``postoffice.dns`` always ours, to Python and to a reader alike."""
    relative = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []
