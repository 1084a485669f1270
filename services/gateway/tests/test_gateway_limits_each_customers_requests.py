"""Each customer's requests through the gateway are limited, a second and a minute: past a
limit the customer is told 429 `too_many_requests` and when to retry, before the ledger is
asked; every other customer is served as before, and a customer who waits as told gets
through again."""

from __future__ import annotations

import asyncio

import pytest

from kabinet_chassis.auth import issue_access_token
from tests.support.metrics import Measured

pytestmark = pytest.mark.integration

RETRY_WAIT_MAX_S = 3.0


def ledger_requests() -> int:
    """The requests the ledger's HTTP server has answered in this test process."""
    return sum(point.count for point in Measured().points.get("http.server.duration", ())
               if dict(point.attributes).get("http.server_name") == "ledger")


def bearer(bank, customer_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_access_token(bank.key, customer_id)}"}


@pytest.fixture
def three_a_second(monkeypatch):
    monkeypatch.setenv("KABINET_CUSTOMER_REQUESTS_PER_SECOND", "3")


@pytest.fixture
def four_a_minute(monkeypatch):
    monkeypatch.setenv("KABINET_CUSTOMER_REQUESTS_PER_MINUTE", "4")


async def test_a_customer_past_her_requests_a_second_is_told_429_and_when_to_retry_and_others_are_served(
        three_a_second, bank):
    alice, bob = bearer(bank, "alice"), bearer(bank, "bob")
    for _ in range(3):
        assert (await bank.get("/v1/me/accounts", headers=alice)).status_code == 200
    asked_before = ledger_requests()
    refused = await bank.get("/v1/me/accounts", headers=alice)
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "too_many_requests" and "3 requests a second" in refused.json()["detail"]
    retry_after_s = int(refused.headers["Retry-After"])
    assert 1 <= retry_after_s <= 2
    assert ledger_requests() == asked_before  # the ledger was not asked
    assert (await bank.get("/v1/me/accounts", headers=bob)).status_code == 200

    await asyncio.sleep(retry_after_s)
    deadline = asyncio.get_running_loop().time() + RETRY_WAIT_MAX_S
    while (answer := await bank.get("/v1/me/accounts", headers=alice)).status_code == 429:
        assert asyncio.get_running_loop().time() < deadline, "a customer who waited as told was still refused"
        await asyncio.sleep(0.1)
    assert answer.status_code == 200


async def test_a_customer_past_her_requests_a_minute_is_told_so_and_to_wait_at_most_a_minute(four_a_minute, bank):
    alice = bearer(bank, "alice")
    for _ in range(4):
        assert (await bank.get("/v1/me/accounts", headers=alice)).status_code == 200
    refused = await bank.get("/v1/me/accounts", headers=alice)
    assert refused.status_code == 429 and "4 requests a minute" in refused.json()["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
