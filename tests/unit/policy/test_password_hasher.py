"""PasswordHasher: both verification paths (libsodium for one-lane argon2id,
argon2-cffi for the rest) accept the right password and nothing else."""

from __future__ import annotations

import argon2
import pytest

from postoffice.policy import auth
from postoffice.policy.auth import PasswordHasher

# Small costs keep the tests fast; the code paths are the same as for 64 MiB.
FAST = {"time_cost": 1, "memory_cost": 1024}


def hasher(lanes: int) -> PasswordHasher:
    return PasswordHasher(argon2.PasswordHasher(parallelism=lanes, **FAST))


def test_default_hash_is_one_lane_argon2id_with_the_rfc9106_cost() -> None:
    params = argon2.extract_parameters(PasswordHasher().hash("pw"))
    assert (params.type, params.time_cost, params.memory_cost, params.parallelism) == (
        argon2.Type.ID,
        3,
        65536,
        1,
    )


@pytest.mark.parametrize("lanes", [1, 4])
def test_right_password_only(lanes: int) -> None:
    h = hasher(lanes)
    stored = h.hash("correct horse ✓")
    assert h.verify(stored, "correct horse ✓")
    assert not h.verify(stored, "correct horse")
    assert not h.verify(stored, "")


def test_one_lane_hashes_go_to_libsodium() -> None:
    assert auth._sodium_argon2id is not None, "PyNaCl is a dependency"
    stored = hasher(1).hash("pw")
    assert auth._one_lane_argon2id(stored)
    assert not auth._one_lane_argon2id(hasher(4).hash("pw"))
    assert not auth._one_lane_argon2id(stored.replace("argon2id", "argon2i"))
    # A hash made by libsodium itself (Dovecot's ARGON2ID is libsodium too).
    sodium = auth._sodium_argon2id.str(b"pw", opslimit=1, memlimit=1024 * 1024).decode()
    assert hasher(1).verify(sodium, "pw")
    assert not hasher(1).verify(sodium, "pw2")


def test_no_user_and_malformed_hashes_never_pass() -> None:
    h = hasher(1)
    assert not h.verify(None, "postoffice-no-such-user")  # the dummy's own password
    assert not h.verify(None, "anything")
    for bad in ("", "plain", "$argon2id$v=19$m=1024,t=1,p=1$c2FsdA$", "$argon2id$v=19$$$$"):
        assert not h.verify(bad, "plain")
