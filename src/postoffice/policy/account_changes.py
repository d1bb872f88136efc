"""The account changes that both the CLI and the web pages make, in one place.

``postoffice user add`` and the admin page's "add user" form must refuse the
same things and do the same work (issue 18: "doing exactly what the CLI does
through the same code"), so the checks and steps live here, and each front
end only asks for input and prints or renders what comes back.  Every
refusal is an ``AccountError`` whose text is safe to show.  All of it is
blocking (SQLite, Maildir files): the web pages call it in an executor.
"""

from __future__ import annotations

from pathlib import Path

from postoffice.config.settings import Settings
from postoffice.mail.address import Address, parse_address, split_plus
from postoffice.storage.accounts import AccountError, AccountStore


def check_password(password: str, owner: Address, *, allow_weak: bool = False) -> str:
    """``password`` if a new password may be it; else AccountError saying why."""
    from postoffice.policy.passwords import weakness

    if not password:
        raise AccountError("refusing an empty password")
    # POP3 PASS and SMTP AUTH are line-based: such a password could never log in.
    if any(c in password for c in "\r\n\x00"):
        raise AccountError("a password cannot contain line breaks or NUL")
    why = weakness(password, owner)
    if why and not allow_weak:
        raise AccountError(
            f"refusing a weak password: {why}; choose another, of 8 characters or more"
        )
    return password


def check_new_user(
    settings: Settings, store: AccountStore, address: Address, *, reuse_maildir: bool = False
) -> Path:
    """Refuse a user that cannot be added (before a password is asked for;
    ``add_user`` checks again atomically); return its Maildir."""
    from postoffice.storage.maildir import mailbox_path
    from postoffice.storage.retired import messages_in

    maildir = mailbox_path(settings.mail_dir, address)
    if not store.is_local_domain(address.domain):
        raise AccountError(
            f"{address.domain} is not a local domain; add it with:"
            f" postoffice domain add {address.domain}"
        )
    if store.password_hash(address) is not None:
        raise AccountError(f"user {address} exists already")
    if str(address) in store.list_aliases():
        raise AccountError(f"{address} is an alias; remove the alias first")
    left = messages_in(maildir)
    if left and not reuse_maildir:
        # An earlier mailbox of that name (kept by an older `user remove`, or
        # copied in): never hand someone's mail to a new user silently.
        raise AccountError(
            f"{maildir} holds {left} message(s) of an earlier mailbox; move it away"
            " first, or give them to the new user with --reuse-maildir"
        )
    return maildir


def remove_user(
    settings: Settings,
    store: AccountStore,
    address: Address,
    *,
    force: bool = False,
    delete_mail: bool = False,
) -> list[str]:
    """Remove user ``address``; the lines that say what was done."""
    from postoffice.storage import retired
    from postoffice.storage.maildir import mailbox_path

    maildir = mailbox_path(settings.mail_dir, address)
    if store.password_hash(address) is None:
        raise AccountError(f"no such user: {address}")
    pointing = store.aliases_to(address)
    if pointing and not force:
        names = ", ".join(pointing)
        raise AccountError(
            f"{address} is a target of the alias(es) {names}: their mail for it would be"
            " dropped.  Change them first, or pass --force to take it out of them too"
            " (an alias left without targets is removed)"
        )
    changed = store.remove_user(address, from_aliases=force)
    done = [f"removed user {address}"]
    for alias, left in changed.items():
        if left:
            done.append(
                f"  removed it from alias {alias} (left: {', '.join(str(t) for t in left)})"
            )
        else:
            done.append(f"  removed alias {alias} (it had no other target)")
    if not maildir.exists():
        return done
    if delete_mail:
        retired.delete(maildir)
        done.append(f"deleted its Maildir {maildir}")
    else:
        moved = retired.move_aside(settings.data_dir, maildir)
        done.append(f"moved its Maildir to {moved} (delete it when it is no longer needed)")
    return done


def parse_targets(texts: list[str]) -> list[Address]:
    """Alias targets as typed (AddressError for one that is no address)."""
    return [parse_address(t.strip(), utf8=True) for t in texts]


def add_alias(store: AccountStore, alias: str, targets: list[Address]) -> list[str]:
    """Add ``alias``; the warnings about targets that deliver to nobody yet."""
    store.add_alias(alias, targets)  # refuses loops (a -> b -> a)
    # A local target that is nobody gets nothing at delivery: say now what
    # becomes of the mail (storage/sqlite_accounts.py _expand, policy/relay.py).
    aliases = store.list_aliases()
    missing: list[str] = []
    for target in targets:
        found = store.resolve(target)
        if found is None or found.exists:
            continue
        domain = target.domain.lower()
        names = {f"{n.lower()}@{domain}" for n in (target.local, split_plus(target.local))}
        if names & set(aliases):
            missing.append(f"alias {target} delivers to nobody yet")
        else:
            missing.append(f"{target} is not a user or alias (yet)")
    if missing and len(missing) == len(targets):
        # Nothing to deliver to: RCPT refuses the alias, the sender is told.
        outcome = f"mail to {alias} is refused (550 5.1.1 User unknown) until it does"
    else:
        outcome = f"its copy of mail to {alias} is dropped (and logged) until it does"
    return [f"{what}; {outcome}" for what in missing]


def set_quota(store: AccountStore, address: Address, size: str) -> tuple[int | None, str]:
    """``postoffice user quota ADDRESS SIZE``: bytes, or with K/M/G/T; "none"
    (or 0): no quota; "default": [limits] mailbox_quota.  The quota set
    (None: the default) and what was done, in words."""
    from postoffice.storage.quota import format_size, parse_size

    if store.password_hash(address) is None:
        raise AccountError(f"no such user: {address}")
    word = size.strip().lower()
    try:
        own = None if word == "default" else 0 if word == "none" else parse_size(word)
    except ValueError as exc:
        raise AccountError(str(exc)) from None
    store.set_quota(address, own)
    shown = "the default" if own is None else "none" if own == 0 else format_size(own)
    return own, f"set the quota of {address}: {shown}"
