"""Finding transfers and holds by their reference: reconciliation matches a card network's
RRN or a payment system's id to what the ledger posted or holds; support finds a customer's
payment, or the authorisation still reserving her money, by it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.ledger.tests.integration.ledger_support import open_account, pages_after, transfer_body
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


async def test_transfers_posted_within_one_instant_are_each_found_once_in_posting_order_while_more_are_posted(ledger):
    # After the clock steps back (or beside a writer whose clock is slow) batches post at the
    # last batch's time (ADR 0002): a payment's transfers posted then share one instant, and
    # the order they were posted in is not their ids'. A clearing posted while staff page
    # through them, its id below the cursor's, comes on a later page all the same.
    settlement, card = await open_account(ledger, "settlement"), await open_account(ledger)
    rrn = f"rrn-{uuid.uuid4().hex[:12]}"
    instant = datetime.now(UTC) + timedelta(seconds=5)
    ledger.parts.writer.clock = lambda: instant

    async def post(transfer_id: str) -> None:
        response = await ledger.post("/transfers", json={
            **transfer_body(transfer_id, (settlement, -10), (card, 10)), "external_ref": rrn})
        assert response.status_code == 201, response.text

    for transfer_id in (f"{rrn}-2", f"{rrn}-4"):
        await post(transfer_id)
    one_at_a_time = {"external_ref": rrn, "limit": 1}
    first_page = (await ledger.get("/transfers", params=one_at_a_time)).json()
    await post(f"{rrn}-1")
    found = [transfer for page in await pages_after(ledger, "/transfers", one_at_a_time, first_page)
             for transfer in page["transfers"]]
    assert {transfer["posted_at"] for transfer in found} == {instant.isoformat()}
    assert [transfer["transfer_id"] for transfer in found] == [f"{rrn}-2", f"{rrn}-4", f"{rrn}-1"]


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


async def test_the_holds_of_an_authorisation_are_found_by_its_rrn_with_what_became_of_each(ledger):
    # A hotel stay: the first authorisation, an incremental one under the same RRN, and a
    # third one the merchant cancelled.
    settlement, hotel, card = (await open_account(ledger, "settlement"), await open_account(ledger, "fee_income"),
                               await open_account(ledger))
    rrn = f"rrn-{uuid.uuid4().hex[:12]}"
    assert (await ledger.post("/transfers", json=transfer_body(f"fund-{rrn}", (settlement, -5_000), (card, 5_000)))
            ).status_code == 201
    for suffix, amount in (("first", 3_000), ("incremental", 1_000), ("cancelled", 500)):
        placed = await ledger.post("/holds", json={
            "hold_id": f"{rrn}-{suffix}", "debit_account_id": card, "credit_account_id": hotel, "amount_minor": amount,
            "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
            "code": "card_purchase", "external_ref": rrn, "metadata": {"merchant": "Hotel Neva"}})
        assert placed.status_code == 201, placed.text
    assert (await ledger.post(f"/holds/{rrn}-first/captures", json={"capture_id": "night-1",
                                                                     "amount_minor": 1_200})).status_code == 201
    assert (await ledger.post(f"/holds/{rrn}-cancelled/void", json={})).status_code == 200

    pages = [(await ledger.get("/holds", params={"external_ref": rrn, "limit": 2})).json()]
    while pages[-1]["next_cursor"] is not None and len(pages) < 10:  # bounded
        pages.append((await ledger.get("/holds", params={"external_ref": rrn, "limit": 2,
                                                         "cursor": pages[-1]["next_cursor"]})).json())
    found = [hold for page in pages for hold in page["holds"]]
    assert [(h["hold_id"], h["state"], h["amount_minor"], h["captured_minor"], h["remaining_minor"]) for h in found] == [
        (f"{rrn}-first", "active", 3_000, 1_200, 1_800),
        (f"{rrn}-incremental", "active", 1_000, 0, 1_000),
        (f"{rrn}-cancelled", "voided", 500, 0, 0)]
    assert all(h["debit_account_id"] == card and h["metadata"] == {"merchant": "Hotel Neva"} for h in found)
    assert [len(page["holds"]) for page in pages] == [2, 1]
    assert (await ledger.get("/holds", params={"external_ref": "never-used"})).json() == {
        "holds": [], "next_cursor": None}


async def test_finding_holds_by_reference_is_for_staff(ledger):
    as_alice = await ledger.get("/holds", params={"external_ref": "rrn-1"}, headers=bearer(ledger.settings.data_dir,
                                                                                           "alice"))
    assert (as_alice.status_code, as_alice.json()["code"]) == (403, "forbidden")
    assert "a customer reads her accounts' pending holds" in as_alice.json()["detail"]
    not_a_position = await ledger.get("/holds", params={"external_ref": "rrn-1", "cursor": "rrn-0"})
    assert not_a_position.status_code == 422 and [e["field"] for e in not_a_position.json()["errors"]] == ["cursor"]
