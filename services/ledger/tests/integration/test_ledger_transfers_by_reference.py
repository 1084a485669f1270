"""Finding transfers by their reference: reconciliation matches a card network's RRN or a
payment system's id to what the ledger posted; support finds a customer's payment by it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.ledger.tests.integration.ledger_support import open_account, transfer_body
from tests.support.tokens import bearer

pytestmark = pytest.mark.integration


async def test_a_card_purchase_its_clearings_and_its_reversal_are_found_by_the_authorisations_rrn(ledger):
    settlement, shop, card = (await open_account(ledger, "settlement"), await open_account(ledger, "fee_income"),
                              await open_account(ledger))
    rrn = f"rrn-{uuid.uuid4().hex[:12]}"
    assert (await ledger.post("/transfers", json={**transfer_body(f"fund-{rrn}", (settlement, -1_000), (card, 1_000)),
                                                  "external_ref": f"top-up-{rrn}"})).status_code == 201
    placed = await ledger.post("/holds", json={
        "hold_id": f"auth-{rrn}", "debit_account_id": card, "credit_account_id": shop, "amount_minor": 500,
        "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(), "code": "card_purchase",
        "external_ref": rrn})
    assert placed.status_code == 201, placed.text
    for number, amount in enumerate((200, 300)):
        assert (await ledger.post(f"/holds/auth-{rrn}/captures", json={"capture_id": f"clearing-{number}",
                                                                        "amount_minor": amount})).status_code == 201
    assert (await ledger.post(f"/transfers/auth-{rrn}:capture:clearing-1/reversal",
                              json={"reason": "dispute_upheld"})).status_code == 201

    pages = [(await ledger.get("/transfers", params={"external_ref": rrn, "limit": 2})).json()]
    while pages[-1]["next_cursor"] is not None and len(pages) < 10:  # bounded
        pages.append((await ledger.get("/transfers", params={"external_ref": rrn, "limit": 2,
                                                             "cursor": pages[-1]["next_cursor"]})).json())
    found = [transfer for page in pages for transfer in page["transfers"]]
    assert [(t["transfer_id"], t["reversed_by"]) for t in found] == [
        (f"auth-{rrn}:capture:clearing-0", None),
        (f"auth-{rrn}:capture:clearing-1", f"auth-{rrn}:capture:clearing-1:reversal"),
        (f"auth-{rrn}:capture:clearing-1:reversal", None)]
    assert [len(page["transfers"]) for page in pages] == [2, 1]
    assert (await ledger.get("/transfers", params={"external_ref": "never-used"})).json() == {
        "transfers": [], "next_cursor": None}


async def test_finding_transfers_by_reference_is_for_staff_and_takes_only_its_own_cursor(ledger):
    settlement, card = await open_account(ledger, "settlement"), await open_account(ledger)
    ref = f"sbp-{uuid.uuid4().hex[:12]}"
    assert (await ledger.post("/transfers", json={**transfer_body(f"t-{ref}", (settlement, -10), (card, 10)),
                                                  "external_ref": ref})).status_code == 201
    as_alice = await ledger.get("/transfers", params={"external_ref": ref}, headers=bearer(ledger.settings.data_dir,
                                                                                            "alice"))
    assert (as_alice.status_code, as_alice.json()["code"]) == (403, "forbidden")
    foreign = await ledger.get("/transfers", params={"external_ref": ref, "cursor": "some-other-transfer"})
    assert (foreign.status_code, foreign.json()["code"]) == (422, "invalid_cursor")
    missing = await ledger.get("/transfers")
    assert missing.status_code == 422 and [e["field"] for e in missing.json()["errors"]] == ["external_ref"]
