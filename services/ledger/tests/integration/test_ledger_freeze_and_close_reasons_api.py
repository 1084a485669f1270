"""Staff freeze, unfreeze and close accounts through the ledger's API naming why: the
account shows every freeze not lifted yet and why it was closed, and verify holds the read
model to the events on both."""

from __future__ import annotations

import uuid

import pytest

from ledger import projections
from services.ledger.tests.integration.ledger_support import as_an_older_ledger_left_it, failed_checks, open_account, transfer_body

pytestmark = pytest.mark.integration


async def act(ledger, account_id: str, action: str, body: dict | None):
    return await ledger.post(f"/accounts/{account_id}/{action}", json=body,
                             headers={"Idempotency-Key": str(uuid.uuid4())})


async def test_a_freeze_without_a_reason_or_with_one_the_bank_has_not_is_refused_naming_reason(ledger):
    card = await open_account(ledger)
    for action in ("freeze", "unfreeze", "close"):
        for body, field in ((None, "body"), ({}, "reason"), ({"reason": "because"}, "reason")):
            refused = await act(ledger, card, action, body)
            assert refused.status_code == 422, (action, body, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            assert [error["field"] for error in refused.json()["errors"]] == [field], refused.text
        assert "'customer_request'" in refused.text, "the refusal names the reasons there are"
    account = (await ledger.get(f"/accounts/{card}")).json()
    assert (account["state"], account["freeze_reasons"], account["close_reason"]) == ("open", [], None)


async def test_the_account_shows_every_freeze_not_lifted_and_stays_frozen_until_the_last_goes(ledger):
    settlement, card = await open_account(ledger, "settlement"), await open_account(ledger)
    assert (await ledger.post("/transfers", json=transfer_body("salary", (settlement, -5_000), (card, 5_000)))
            ).status_code == 201
    await act(ledger, card, "freeze", {"reason": "fraud_suspected"})
    both = (await act(ledger, card, "freeze", {"reason": "court_order"})).json()
    assert (both["state"], both["freeze_reasons"]) == ("frozen", ["court_order", "fraud_suspected"])

    one_left = (await act(ledger, card, "unfreeze", {"reason": "fraud_suspected"})).json()
    assert (one_left["state"], one_left["freeze_reasons"]) == ("frozen", ["court_order"])
    assert one_left["balances"]["available"]["amount_minor"] == 0
    refused = await ledger.post("/transfers", json=transfer_body("rent", (card, -100), (settlement, 100)))
    assert refused.status_code == 409 and refused.json()["code"] == "account_frozen"

    lifted = (await act(ledger, card, "unfreeze", {"reason": "court_order"})).json()
    assert (lifted["state"], lifted["freeze_reasons"]) == ("open", [])
    assert lifted["balances"]["available"]["amount_minor"] == 5_000
    assert await failed_checks(ledger) == {}


async def test_a_closed_account_says_why_and_verify_finds_a_reason_rewritten_in_the_read_model(ledger):
    card = await open_account(ledger)
    closed = (await act(ledger, card, "close", {"reason": "customer_deceased"})).json()
    assert (closed["state"], closed["close_reason"]) == ("closed", "customer_deceased")
    frozen = await open_account(ledger)
    await act(ledger, frozen, "freeze", {"reason": "compliance_review"})
    assert await failed_checks(ledger) == {}

    await ledger.parts.pool.execute("UPDATE ledger_accounts SET close_reason = 'customer_request' WHERE account_id = $1",
                                    uuid.UUID(card))
    await ledger.parts.pool.execute("UPDATE ledger_accounts SET freeze_reasons = '{}' WHERE account_id = $1",
                                    uuid.UUID(frozen))
    failed = await failed_checks(ledger)
    problems = next(detail for name, detail in failed.items() if "close_reason" in detail)
    assert f"account {card}" in problems and f"account {frozen}" in problems and "freeze_reasons" in problems


async def test_a_read_model_from_before_reasons_shows_its_frozen_accounts_frozen_for_a_reason_not_recorded(ledger):
    # As the events of such a freeze replay (the domain's rule, tested on its own): any unfreeze lifts it.
    frozen, open_ = await open_account(ledger), await open_account(ledger)
    await act(ledger, frozen, "freeze", {"reason": "fraud_suspected"})
    await as_an_older_ledger_left_it(ledger.parts.pool, "UPDATE ledger_accounts SET freeze_reasons = '{}'")
    await projections.ensure_schema(ledger.parts.pool)  # at the next start
    assert (await ledger.get(f"/accounts/{frozen}")).json()["freeze_reasons"] == ["not_recorded"]
    assert (await ledger.get(f"/accounts/{open_}")).json()["freeze_reasons"] == []
