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

import grp
import os
import pwd
from dataclasses import dataclass

from postoffice.config.settings import RunSettings
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


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
