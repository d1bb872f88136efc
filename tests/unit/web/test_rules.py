"""web/rules.py: the page's script round-trips, compiles, and reads nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postoffice.delivery.sieve import compile_script
from postoffice.web.rules import AccountRules, read, script

text = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=40)


@given(
    st.sampled_from(["", "bob@example.org", '"a b"@example.org']),
    st.booleans(),
    st.booleans(),
    st.integers(1, 90),
    text,
    text.filter(lambda t: t.strip() != ""),
)
def test_what_the_page_writes_it_reads_back_and_delivery_compiles(
    forward: str, keep: bool, vacation: bool, days: int, subject: str, reason: str
) -> None:
    rules = AccountRules(forward, keep if forward else True, vacation, days, subject, reason)
    if not vacation:
        rules = AccountRules(forward, keep if forward else True)
    data = script(rules)
    compile_script(data)
    assert read(data) == rules


def test_other_scripts_read_as_no_settings() -> None:
    for other in (
        b'require ["fileinto"]; fileinto "x";',
        b'if header :contains "subject" "x" { redirect "a@b.test"; }',
        b'redirect ["a@b.test", "c@d.test"];',
        b'require ["vacation"]; vacation :addresses ["a@b.test"] "r";',
        b"not sieve at all {",
    ):
        assert read(other) == AccountRules()
