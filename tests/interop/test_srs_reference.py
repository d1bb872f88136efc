"""Our SRS addresses against the reference implementation, Shevek's Mail::SRS.

Mail::SRS (Debian's libmail-srs-perl) with the same secret and hash length
must make the very same SRS0/SRS1 addresses as policy/srs.py, and each side
must reverse the other's.  Outside CI a missing Perl module skips; in CI it
fails (scripts/test.sh installs it).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from postoffice.mail.address import Address, parse_path
from postoffice.policy.srs import HASH_LENGTH, Srs

pytestmark = pytest.mark.interop

SECRET = "0123456789abcdef-reference"
SCRIPT = r"""
use strict;
use Mail::SRS;
my $srs = Mail::SRS->new(Secret => [$ARGV[0]], HashLength => $ARGV[1], HashMin => $ARGV[1]);
while (my $line = <STDIN>) {
    chomp $line;
    my ($op, $addr, $alias) = split / /, $line;
    my $out = $op eq "f" ? $srs->forward($addr, $alias) : eval { $srs->reverse($addr) };
    print(($out // "ERROR"), "\n");
}
"""


def mail_srs(lines: list[str]) -> list[str]:
    probe = subprocess.run(["perl", "-MMail::SRS", "-e1"], capture_output=True)
    if probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("Mail::SRS is not installed (scripts/test.sh installs libmail-srs-perl)")
        pytest.skip("Mail::SRS is not installed")
    result = subprocess.run(
        ["perl", "-e", SCRIPT, SECRET, str(HASH_LENGTH)],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.splitlines()


def addr(text: str) -> Address:
    parsed = parse_path(f"<{text}>")
    assert parsed is not None
    return parsed


def test_same_addresses_as_mail_srs_both_ways() -> None:
    ours = Srs([SECRET.encode()])
    senders = ["alice@orig.example", "Bob.Smith+tag@Sub.Orig.example", "x=y@orig.example"]
    srs0 = [ours.forward(addr(s), "fwd.example") for s in senders]
    # A second hop: SRS1 from someone else's SRS0, and from an SRS1.
    other = Srs([b"first-hop-secret-1234"]).forward(addr("carol@orig.example"), "hop1.example")
    assert other is not None
    srs1 = ours.forward(other, "fwd.example")
    srs1_again = Srs([b"another-hop-secret-99"]).forward(other, "hop2.example")
    assert srs1_again is not None
    srs1_next = ours.forward(srs1_again, "fwd.example")
    theirs = mail_srs(
        [f"f {s} fwd.example" for s in senders]
        + [f"f {other} fwd.example", f"f {srs1_again} fwd.example"]
    )
    made = [*srs0, srs1, srs1_next]
    assert all(m is not None for m in made)
    # The same day, secret and hash length: Mail::SRS makes the same
    # addresses, up to the case of the domain (we hold domains lower-cased).
    assert [str(m).lower() for m in made] == [t.lower() for t in theirs]
    assert [str(m).split("=")[1] for m in made] == [t.split("=")[1] for t in theirs]  # hashes
    # Each reverses the other's.
    back = mail_srs([f"r {m}" for m in made])
    assert [b.lower() for b in back] == [
        *(s.lower() for s in senders),
        str(other).lower(),
        str(other).lower(),
    ]
    for text, sender in zip(theirs[:3], senders, strict=True):
        assert str(ours.reverse(addr(text))).lower() == sender.lower()
    # A forged hash is refused by both.
    assert made[0] is not None
    hashed = made[0].local.split("=")[1]
    forged = str(made[0]).replace(hashed, ("A" if hashed[0] != "A" else "B") + hashed[1:], 1)
    assert mail_srs([f"r {forged}"]) == ["ERROR"]
    with pytest.raises(ValueError, match="bad hash"):
        ours.reverse(addr(forged))
