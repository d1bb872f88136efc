"""The import graph of src/postoffice: no cycles, and imports flow one way.

STYLE.md: ``protocol/`` and ``mail/`` import nothing else of ours; the
adapters (``net/``) import cores, policy and storage; only the composition
root and the tools see everything.  Every module is read with ``ast`` (no
import side effects); an import anywhere in it counts: at module level, in
a function, under ``TYPE_CHECKING``, relative, or a literal
``importlib.import_module("postoffice....")``.

    python tests/unit/test_import_layers.py [SRC]   # the listing, for a closing note
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "postoffice"

# What each part may import besides itself.  A part is the first name under
# postoffice: a subpackage ("net") or a top-level module ("services").
# ``logfmt`` (values from clients in log fields) is a leaf like ``mail``:
# every layer that logs may use it; ``maillog`` (the mail log's events) uses
# only it, for every layer a message passes through.  So is ``childproc`` (a child process
# dies with the server), which the DKIM verifier processes of ``policy`` use.
# ``metrics`` (the Prometheus counters, one line per hook) is a leaf too.
ALLOWED: dict[str, frozenset[str]] = {
    "mail": frozenset(),
    "logfmt": frozenset(),
    "maillog": frozenset({"logfmt"}),
    "childproc": frozenset(),
    "metrics": frozenset(),
    "config": frozenset({"mail"}),
    "protocol": frozenset({"mail"}),
    "storage": frozenset({"mail", "logfmt", "metrics", "config"}),
    "dns": frozenset({"mail", "metrics", "config"}),
    "policy": frozenset(
        {
            "mail",
            "logfmt",
            "maillog",
            "metrics",
            "childproc",
            "config",
            "protocol",
            "storage",
            "dns",
        }
    ),
    # Message filters (docs/filters.md): verdicts, the FilterSession interface,
    # the chain and the Python hooks; adapters that speak to the network (the
    # milter client) live in net/, which imports filters.
    "filters": frozenset({"mail", "logfmt", "maillog", "metrics", "config", "protocol", "storage"}),
    # [cluster] (docs/cluster.md): stores on PostgreSQL behind storage/'s and
    # policy/'s interfaces (the throttle's FailureFeed, DKIM's SigningKeys);
    # the composition root, the tools and delivery's report CLI pick them.
    "cluster": frozenset({"mail", "logfmt", "metrics", "config", "storage", "policy"}),
    "services": frozenset(
        {"mail", "logfmt", "maillog", "config", "protocol", "storage", "dns", "policy", "filters"}
    ),
    "net": frozenset(
        {
            "mail",
            "logfmt",
            "maillog",
            "metrics",
            "config",
            "protocol",
            "storage",
            "policy",
            "filters",
            "services",
        }
    ),
    "delivery": frozenset(
        {
            "mail",
            "logfmt",
            "maillog",
            "metrics",
            "config",
            "protocol",
            "storage",
            "dns",
            "policy",
            "net",
            "cluster",  # the [cluster] queue (delivery/queue/pg_store.py)
        }
    ),
}
# The composition root and the tools: they may import anything; only they
# import each other.  ``datadir`` (the serve lock, the data dir's owner),
# ``logsetup`` (the process's log handlers) and ``malloc_tuning`` (the
# process's allocator) serve only them.  ``web`` (the admin and account
# pages) is a front end like ``cli``: it shows what the accounts, the queue
# and ``trace`` hold; the composition root adds its routes.
TOP = frozenset(
    {
        "__init__",
        "__main__",
        "app",
        "workers",
        "cli",
        "doctor",
        "check",
        "datadir",
        "logsetup",
        "malloc_tuning",
        "reload",
        "runas",
        "quickstart",
        "trace",
        "web",
    }
)


def modules(src: Path = SRC) -> dict[str, Path]:
    found = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, name: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The modules of ours that ``node`` (in module ``name``) imports, if it imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package of ``name``
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # "from a.b import c" imports the module a.b.c when there is one.
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    if (
        isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first import}."""
    known = modules(src)
    edges: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        deps = edges.setdefault(name, {})
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, name, is_package, known):
                if target in known and target != name:
                    line = getattr(node, "lineno", 0)
                    deps[target] = min(deps.get(target, line), line)
    return edges


def part(module: str) -> str:
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def cycles(edges: dict[str, dict[str, int]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(edges: dict[str, dict[str, int]]) -> dict[tuple[str, str], int]:
    """(importer, imported) -> line, for every import its layer may not make."""
    out = {}
    for module, deps in edges.items():
        mine = part(module)
        for dep, line in deps.items():
            theirs = part(dep)
            if theirs == mine or mine in TOP:
                continue
            if theirs in TOP or theirs not in ALLOWED.get(mine, frozenset()):
                out[(module, dep)] = line
    return out


def test_every_part_has_a_rule() -> None:
    parts = {part(m) for m in modules()}
    assert parts <= set(ALLOWED) | TOP, sorted(parts - set(ALLOWED) - TOP)


def test_no_import_cycles() -> None:
    assert cycles(graph()) == set()


def test_imports_flow_one_way() -> None:
    found = violations(graph())
    assert not found, [f"{m}:{line} -> {d}" for (m, d), line in sorted(found.items())]


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The graph counts imports in functions, under TYPE_CHECKING, relative
    ones and import_module literals, and finds a cycle and a violation in
    them (a check that cannot fail would prove nothing)."""
    pkg = tmp_path / PACKAGE
    for sub in ("mail", "net"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "mail" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\n"
    )
    (pkg / "mail" / "b.py").write_text("def f():\n    import postoffice.mail.a\n")
    (pkg / "mail" / "c.py").write_text(
        "import importlib\nimportlib.import_module('postoffice.net.d')\n"
    )
    (pkg / "net" / "d.py").write_text("from postoffice.mail import a\n")
    g = graph(tmp_path)
    assert g["postoffice.mail.a"] == {"postoffice.mail.b": 3}
    assert g["postoffice.mail.b"] == {"postoffice.mail.a": 2}
    assert cycles(g) == {frozenset({"postoffice.mail.a", "postoffice.mail.b"})}
    assert violations(g) == {("postoffice.mail.c", "postoffice.net.d"): 2}


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    g = graph(src)
    for name in sorted(g):
        print(name)
        for dep in sorted(g[name]):
            print(f"    -> {dep}")
    found = sorted(str(sorted(c)) for c in cycles(g))
    print("\ncycles:", *(found or ["none"]), sep="\n  ")
    lines = [f"{m}:{line} -> {d}" for (m, d), line in sorted(violations(g).items())]
    print("layer violations:", *(lines or ["none"]), sep="\n  ")
