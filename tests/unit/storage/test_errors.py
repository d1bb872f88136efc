"""One classification of storage failures (storage/errors.py) for every protocol."""

from __future__ import annotations

import errno
import os

import pytest

from postoffice.storage.errors import DeliveryError, StorageFault, errno_fault, fault_of


def os_error(number: int) -> OSError:
    return OSError(number, os.strerror(number))


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_and_a_full_quota_are_both_no_space(number: int) -> None:
    assert errno_fault(number) is StorageFault.NO_SPACE
    assert fault_of(os_error(number)) is StorageFault.NO_SPACE


@pytest.mark.parametrize(
    "number", [errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ELOOP]
)
def test_what_only_an_administrator_can_mend_needs_admin(number: int) -> None:
    assert fault_of(os_error(number)) is StorageFault.NEEDS_ADMIN


@pytest.mark.parametrize("number", [errno.EIO, errno.EMFILE, errno.ENOENT, None])
def test_anything_else_is_other(number: int | None) -> None:
    assert errno_fault(number) is StorageFault.OTHER
    assert fault_of(OSError("no errno")) is StorageFault.OTHER


def test_a_delivery_error_carries_its_fault_and_a_bug_is_none() -> None:
    full = DeliveryError("mail system full", fault=StorageFault.NO_SPACE, paths=("/m/new",))
    assert fault_of(full) is StorageFault.NO_SPACE and full.paths == ("/m/new",)
    assert fault_of(DeliveryError("local delivery failed")) is StorageFault.OTHER
    assert fault_of(RuntimeError("a bug")) is None
