"""AUTH in both sessions: one SASL exchange (protocol/sasl.py), two wire forms.

SMTP (RFC 4954) and POP3 (RFC 5034) run the same exchange, so the same
client lines get the same decision, each in its own words.  The sessions run
in-process over loopback TCP (tests/support/inprocess.py), where
``allow_plaintext_loopback`` lets them authenticate without TLS.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from postoffice.net.smtp_session import SmtpMode
from tests.support.helpers import ALICE, ALICE_PW, BOB
from tests.support.inprocess import pop3_client, run, running_services, smtp_client

AUTH = {"allow_plaintext_loopback": True}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(authzid: str, authcid: str, password: str) -> str:
    """A PLAIN message (RFC 4616 §2), in base64."""
    return b64("\0".join((authzid, authcid, password)))


def smtp_exchange(tmp_path: Path, lines: list[str]) -> list[str]:
    """Each line's reply, as ``"code text"`` of its last line."""

    async def main() -> list[str]:
        async with (
            running_services(tmp_path, auth=AUTH) as services,
            smtp_client(services, SmtpMode.SUBMISSION, tcp=True) as client,
        ):
            assert (await client.reply())[0] == 220
            code, ehlo = await client.cmd("EHLO client.test")
            assert code == 250 and "AUTH PLAIN LOGIN" in ehlo
            replies = []
            for line in lines:
                code, texts = await client.cmd(line)
                replies.append(f"{code} {texts[-1]}".rstrip())
            return replies

    return run(main())


def pop3_exchange(tmp_path: Path, lines: list[str]) -> list[str]:
    async def main() -> list[str]:
        async with (
            running_services(tmp_path, auth=AUTH) as services,
            pop3_client(services, tcp=True) as pop,
        ):
            assert (await pop.reply()).startswith("+OK")
            assert await pop.cmd("CAPA") == "+OK Capability list follows"
            assert b"SASL PLAIN LOGIN\r\n" in await pop.multiline()
            return [await pop.cmd(line) for line in lines]

    return run(main())


OK_SMTP = "235 2.7.0 Authentication successful"
CANCELLED = ("501 5.0.0 Authentication cancelled", "-ERR Authentication cancelled")
CASES = {
    # RFC 4616 §2 authzid: the user's own account in another spelling is the user.
    "authzid of the same account": (
        [f"AUTH PLAIN {plain('Alice@Example.TEST', ALICE, ALICE_PW)}"],
        [OK_SMTP],
        ["+OK Logged in"],
    ),
    "authzid of another": (
        [f"AUTH PLAIN {plain(BOB, ALICE, ALICE_PW)}"],
        ["535 5.7.8 Authentication credentials invalid"],
        ["-ERR Acting as another user is not permitted"],
    ),
    "PLAIN after an empty challenge": (
        ["AUTH PLAIN", plain("", ALICE, ALICE_PW)],
        ["334", OK_SMTP],
        ["+ ", "+OK Logged in"],
    ),
    "LOGIN": (
        ["AUTH LOGIN", b64(ALICE), b64(ALICE_PW)],
        ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", OK_SMTP],
        ["+ VXNlcm5hbWU6", "+ UGFzc3dvcmQ6", "+OK Logged in"],
    ),
    "LOGIN with the name at once": (
        [f"AUTH LOGIN {b64(ALICE)}", b64(ALICE_PW)],
        ["334 UGFzc3dvcmQ6", OK_SMTP],
        ["+ UGFzc3dvcmQ6", "+OK Logged in"],
    ),
    "cancel": (
        ["AUTH PLAIN", "*", "AUTH LOGIN", b64(ALICE), " * "],
        ["334", CANCELLED[0], "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", CANCELLED[0]],
        ["+ ", CANCELLED[1], "+ VXNlcm5hbWU6", "+ UGFzc3dvcmQ6", CANCELLED[1]],
    ),
    "not base64": (
        ["AUTH PLAIN !!!notbase64", "AUTH LOGIN", "=x="],
        [
            "501 5.5.2 Cannot decode response",
            "334 VXNlcm5hbWU6",
            "501 5.5.2 Cannot decode response",
        ],
        ["-ERR response is not base64", "+ VXNlcm5hbWU6", "-ERR response is not base64"],
    ),
    # "=" is an empty initial response (RFC 4954 §4, RFC 5034 §4); "*" is no
    # initial response at all: it cancels only in answer to a challenge.
    "empty and star as initial responses": (
        ["AUTH PLAIN =", "AUTH PLAIN *"],
        ["501 5.5.2 Cannot decode response", "501 5.5.2 Cannot decode response"],
        [
            "-ERR PLAIN response must be authzid NUL authcid NUL password",
            "-ERR response is not base64",
        ],
    ),
    # An exchange cut short (an over-long line ends it in the core) leaves
    # nothing behind: the next LOGIN asks for a name again.  (POP3 used to
    # keep the first name and take the next answer as its password.)
    "a new exchange after one cut short": (
        ["AUTH LOGIN", b64(ALICE), "A" * 13000, "AUTH LOGIN", b64(ALICE_PW)],
        [
            "334 VXNlcm5hbWU6",
            "334 UGFzc3dvcmQ6",
            "500 5.5.6 Line too long",
            "334 VXNlcm5hbWU6",
            "334 UGFzc3dvcmQ6",  # asked for the password: the name is new
        ],
        [
            "+ VXNlcm5hbWU6",
            "+ UGFzc3dvcmQ6",
            "-ERR Line too long",
            "+ VXNlcm5hbWU6",
            "+ UGFzc3dvcmQ6",
        ],
    ),
    "unknown mechanism": (
        ["AUTH CRAM-MD5"],
        ["504 5.5.4 Unrecognized authentication type"],
        ["-ERR Unsupported authentication mechanism"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_smtp(tmp_path: Path, case: str) -> None:
    lines, smtp, _ = CASES[case]
    assert smtp_exchange(tmp_path, lines) == smtp


@pytest.mark.parametrize("case", CASES)
def test_pop3(tmp_path: Path, case: str) -> None:
    lines, _, pop3 = CASES[case]
    replies = pop3_exchange(tmp_path, lines)
    if pop3[-1] == "+OK Logged in":
        assert replies[-1].startswith("+OK")
        replies[-1] = "+OK Logged in"
    assert replies == pop3
