"""``postoffice sieve put|get|list|activate ADDRESS``: users' Sieve scripts from the shell.

Each works while ``serve`` runs: scripts are files written atomically
(storage/sieve_scripts.py) and delivery reads the active one afresh for
every message.  ``put`` refuses a script that does not compile, saying the
line and column, so delivery meets only valid scripts.

Handlers follow cli.py's contract: ``fn(args, settings) -> int``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from postoffice.config.settings import Settings
from postoffice.delivery.sieve import compile_script
from postoffice.mail.address import parse_mailbox
from postoffice.protocol.sieve_parse import SieveSyntaxError
from postoffice.protocol.sieve_run import SieveCheckError
from postoffice.storage.sieve_scripts import ScriptError, SieveScripts


def _scripts(settings: Settings) -> SieveScripts:
    return SieveScripts(settings.sieve_dir)


def sieve_put(args: argparse.Namespace, settings: Settings) -> int:
    address = parse_mailbox(args.address)
    if args.file in (None, "-"):
        data = sys.stdin.buffer.read(_scripts(settings).max_bytes + 1)
        source = "<stdin>"
    else:
        with open(args.file, "rb") as f:
            data = f.read(_scripts(settings).max_bytes + 1)
        source = args.file
    name = args.name or "default"
    scripts = _scripts(settings)
    try:
        compile_script(data)
        scripts.put(address, name, data)
        if args.activate or scripts.active_name(address) is None:
            scripts.activate(address, name)
    except (SieveSyntaxError, SieveCheckError) as exc:
        print(f"postoffice: {source}:{exc.line}:{exc.column}: {exc.reason}", file=sys.stderr)
        return 1
    except ScriptError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    active = " (active)" if scripts.active_name(address) == name else ""
    print(f"stored script {name!r} for {address}{active}")
    return 0


def sieve_get(args: argparse.Namespace, settings: Settings) -> int:
    address = parse_mailbox(args.address)
    scripts = _scripts(settings)
    try:
        name = args.name or scripts.active_name(address)
        if name is None:
            print(f"postoffice: {address} has no active script", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(scripts.get(address, name))
    except ScriptError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    return 0


def sieve_list(args: argparse.Namespace, settings: Settings) -> int:
    address = parse_mailbox(args.address)
    for info in _scripts(settings).list(address):
        print(f"{info.name}{'  (active)' if info.active else ''}")
    return 0


def sieve_activate(args: argparse.Namespace, settings: Settings) -> int:
    address = parse_mailbox(args.address)
    try:
        _scripts(settings).activate(address, None if args.none else args.name)
    except ScriptError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    print(f"{address}: no active script" if args.none else f"{address}: {args.name} is active")
    return 0


def add_sieve_parser(subparsers: Any) -> None:
    """Add ``sieve put|get|list|activate`` to the CLI's subcommands."""
    summary = "users' Sieve scripts (RFC 5228): put, get, list, activate"
    group = subparsers.add_parser(
        "sieve",
        help=summary,
        description=summary,
        epilog="examples:\n"
        "  postoffice sieve put alice@example.org rules.sieve --name rules\n"
        "  postoffice sieve list alice@example.org\n"
        "  postoffice sieve get alice@example.org\n"
        "  postoffice sieve activate alice@example.org rules\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group.set_defaults(handler=None, help_parser=group)
    commands = group.add_subparsers(title="commands", metavar="COMMAND")
    put = commands.add_parser("put", help="store a script (the first one becomes active)")
    put.set_defaults(handler=sieve_put)
    put.add_argument("address", metavar="ADDRESS")
    put.add_argument("file", metavar="FILE", nargs="?", help="the script; '-' or none: stdin")
    put.add_argument("--name", help="the script's name (default: default)")
    put.add_argument("--activate", action="store_true", help="make it the active script")
    get = commands.add_parser("get", help="print a script (default: the active one)")
    get.set_defaults(handler=sieve_get)
    get.add_argument("address", metavar="ADDRESS")
    get.add_argument("name", metavar="NAME", nargs="?")
    listing = commands.add_parser("list", help="list a mailbox's scripts")
    listing.set_defaults(handler=sieve_list)
    listing.add_argument("address", metavar="ADDRESS")
    activate = commands.add_parser("activate", help="make a script the active one")
    activate.set_defaults(handler=sieve_activate)
    activate.add_argument("address", metavar="ADDRESS")
    activate.add_argument("name", metavar="NAME", nargs="?")
    activate.add_argument("--none", action="store_true", help="deactivate Sieve for the mailbox")
