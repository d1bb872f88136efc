"""The memory budget SMTP sessions share for messages held for inbound checks."""

from __future__ import annotations

from postoffice.policy.memory_budget import MemoryBudget


def test_takes_up_to_the_limit_and_refuses_past_it_without_reserving() -> None:
    budget = MemoryBudget(100)
    assert budget.take(60) and budget.take(40)
    assert budget.in_use == 100
    assert not budget.take(1)
    assert budget.in_use == 100  # a refusal reserves nothing
    budget.give_back(40)
    assert budget.take(30) and budget.in_use == 90
    assert not budget.take(11)


def test_what_is_given_back_can_be_taken_again() -> None:
    budget = MemoryBudget(10)
    for _ in range(3):
        assert budget.take(10)
        budget.give_back(10)
    assert budget.in_use == 0
