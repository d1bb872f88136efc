"""``[run]``: started as root, serve binds its ports, then runs as a plain user.

``identity`` decides, before anything is opened: not root, nothing to do;
root with the ``[run]`` user present, that user (its groups, the ``[run]``
group or its own); ``user = "root"``, root by choice; the user missing,
root only with ``allow_root = true``, else a refusal (``RunAsError``)
saying how to make one.  The composition root binds every listener as
root, then calls ``Owner.become`` (datadir.py: setgroups, setgid, setuid,
real, effective and saved, so root cannot be taken back), and only then
opens the data directory, as that user.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

from postoffice.config.settings import RunSettings, Settings
from postoffice.datadir import Owner


class RunAsError(Exception):
    """Serve must not go on as root; ``str()`` says why and what to do."""


@dataclass(frozen=True, slots=True)
class Identity:
    owner: Owner | None  # None: stay as started
    note: str  # for the log: who we run as, and why


def identity(run: RunSettings, euid: int | None = None) -> Identity:
    """Who ``serve`` runs as (see the module doc); raises RunAsError."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return Identity(None, f"running as {_name(euid)} (not started as root: [run] unused)")
    if run.user == "root":
        return Identity(None, "running as root: [run] user = root")
    try:
        user = pwd.getpwnam(run.user)
    except KeyError:
        if run.allow_root:
            return Identity(None, f"running as root: no user {run.user} ([run] allow_root = true)")
        raise RunAsError(
            f"started as root, and there is no user {run.user} ([run] user) to run as;"
            f" make one (useradd --system --home-dir /var/lib/postoffice {run.user}),"
            " name another in [run] user, or set [run] allow_root = true"
        ) from None
    try:
        gid = grp.getgrnam(run.group).gr_gid if run.group else user.pw_gid
    except KeyError:
        raise RunAsError(f"there is no group {run.group} ([run] group)") from None
    return Identity(Owner(user.pw_uid, gid), f"running as {run.user} (uid {user.pw_uid})")


def tls_refusal(settings: Settings) -> str:
    """Why serve refuses a certificate or key the ``[run]`` user cannot read.

    The design (#15): the server, its smtp processes and every reload load
    the [tls] files as the run user, never as root, so a reload re-reads a
    renewed key like the first start did.  A key readable by root only
    (an ACME client's default) must be made readable by the run user's group."""
    key = settings.tls.key or "the key"
    # The [run] group when one is named (Debian's ssl-cert, say); else the
    # group named like the user, which `useradd --system` makes its own.
    group = settings.run.group or settings.run.user
    return (
        f"the [run] user {settings.run.user} cannot load the TLS certificate or key"
        f" (it loads them at start and on every reload): chgrp {group} {key};"
        f" chmod 640 {key} (and the same for the directories leading to it)"
    )


def as_user(owner: Owner, probe: Callable[[], str]) -> str:
    """``probe()``'s answer ("" when fine), run in a child process that became
    ``owner`` (check.py: can the run user open this?).  Root only."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        answer = ""
        try:
            os.close(read)
            owner.become()
            answer = probe()
        except BaseException as exc:
            answer = str(exc) or type(exc).__name__
        finally:
            with contextlib.suppress(OSError):
                os.write(write, answer.encode()[:4096])
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answers:
        answer = answers.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return answer


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
