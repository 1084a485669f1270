"""The arithmetic of each customer's request limits, on a clock the test moves: a burst of a
limit's allowance passes and the next request is told exactly how long to wait; waiting that
long gets through; a refused request costs nothing; and the customers remembered are bounded,
the least recently seen forgotten first."""

from __future__ import annotations

import pytest

from gateway import customer_rate_limits
from gateway.customer_rate_limits import CustomerRateLimits
from kabinet_chassis.errors import Problem


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def refused(limits: CustomerRateLimits, customer_id: str) -> Problem:
    with pytest.raises(Problem) as refusal:
        limits.admit(customer_id)
    assert (refusal.value.status, refusal.value.code) == (429, "too_many_requests")
    return refusal.value


def test_a_burst_of_the_allowance_a_second_passes_and_the_next_request_waits_one_interval():
    clock = Clock()
    limits = CustomerRateLimits(per_second=4, per_minute=1000, clock=clock)
    for _ in range(4):
        limits.admit("alice")
    refusal = refused(limits, "alice")
    assert refusal.headers == {"Retry-After": "1"} and "4 requests a second" in refusal.detail
    clock.now_s += 0.25  # one interval: room for one request, not two
    limits.admit("alice")
    refused(limits, "alice")


def test_past_the_allowance_a_minute_the_wait_told_is_exact_and_waiting_it_gets_through():
    clock = Clock()
    limits = CustomerRateLimits(per_second=100, per_minute=4, clock=clock)
    for _ in range(4):
        limits.admit("alice")
        clock.now_s += 0.5
    refusal = refused(limits, "alice")
    # The fifth is due a minute after the first less three intervals of 15 s: at 1015, 13 s from now.
    assert refusal.headers == {"Retry-After": "13"} and "4 requests a minute" in refusal.detail
    clock.now_s += 12.0
    refused(limits, "alice")  # told 13 s: 12 is too soon
    clock.now_s += 1.0
    limits.admit("alice")


def test_a_refused_request_costs_nothing_however_often_it_is_retried():
    clock = Clock()
    limits = CustomerRateLimits(per_second=2, per_minute=1000, clock=clock)
    limits.admit("alice")
    limits.admit("alice")
    for _ in range(50):  # a client retrying at once, without waiting
        refused(limits, "alice")
    clock.now_s += 0.5
    limits.admit("alice")


def test_one_customer_past_her_limit_does_not_hold_up_another():
    limits = CustomerRateLimits(per_second=1, per_minute=1000, clock=Clock())
    limits.admit("alice")
    refused(limits, "alice")
    limits.admit("bob")


def test_the_customers_remembered_are_bounded_and_the_least_recently_seen_is_forgotten_first(monkeypatch):
    monkeypatch.setattr(customer_rate_limits, "CUSTOMERS_TRACKED_MAX", 2)
    limits = CustomerRateLimits(per_second=1, per_minute=1000, clock=Clock())
    limits.admit("alice")
    limits.admit("bob")
    refused(limits, "alice")  # alice, seen again, is now the most recent
    limits.admit("carol")
    assert list(limits.next_due) == ["alice", "carol"]
    refused(limits, "alice")  # still remembered: still held to her limit


@pytest.mark.parametrize(("per_second", "per_minute"), [(3, 1000), (10, 1000), (20, 300), (1000, 300)])
def test_a_burst_of_exactly_the_allowance_passes_whatever_the_allowance(per_second, per_minute):
    # Intervals such as 1/3 s are not exact in binary: their sum must not refuse the last of the burst.
    limits = CustomerRateLimits(per_second=per_second, per_minute=per_minute, clock=Clock())
    for _ in range(min(per_second, per_minute)):
        limits.admit("alice")
    refused(limits, "alice")
