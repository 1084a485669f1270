"""Rules of an account's pending holds and of a hold's own read: money reserved and not moved
yet (card purchases awaiting their clearing), as customers, support staff and services see it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ledger import projections
from services.ledger.tests.integration.ledger_support import as_an_older_ledger_left_it, failed_checks, open_account, transfer_body
from tests.support.tokens import bearer

pytestmark = pytest.mark.integration


async def settled(ledger) -> None:
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)


async def funded_card(ledger, amount_minor: int) -> tuple[str, str]:
    """Alice's card with `amount_minor` on it, and the shop's clearing account her purchases pay into."""
    settlement, shop = await open_account(ledger, "settlement"), await open_account(ledger, "fee_income")
    card = await open_account(ledger)
    funded = await ledger.post("/transfers", json=transfer_body(f"fund-{card}", (settlement, -amount_minor),
                                                                (card, amount_minor), code="top_up"))
    assert funded.status_code == 201, funded.text
    return card, shop


async def place(ledger, hold_id: str, card: str, shop: str, amount_minor: int, **references) -> None:
    response = await ledger.post("/holds", json={
        "hold_id": hold_id, "debit_account_id": card, "credit_account_id": shop, "amount_minor": amount_minor,
        "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(), "code": "card_purchase",
        **references})
    assert response.status_code == 201, response.text


async def every_page(ledger, account: str, limit: int, **headers) -> list[list[dict]]:
    pages = [(await ledger.get(f"/accounts/{account}/holds", params={"limit": limit}, headers=headers)).json()]
    for _ in range(20):  # bounded
        if pages[-1]["next_cursor"] is None:
            break
        pages.append((await ledger.get(f"/accounts/{account}/holds", headers=headers,
                                       params={"limit": limit, "cursor": pages[-1]["next_cursor"]})).json())
    return [page["holds"] for page in pages]


async def test_an_accounts_pending_holds_come_newest_first_and_add_up_to_its_pending_balance(ledger):
    card, shop = await funded_card(ledger, 10_000)
    tag = uuid.uuid4().hex[:8]
    for number, amount in enumerate((100, 200, 300, 400, 500)):
        await place(ledger, f"auth-{tag}-{number}", card, shop, amount)
    captured = await ledger.post(f"/holds/auth-{tag}-1/captures", json={"capture_id": "clearing", "amount_minor": 150})
    assert captured.status_code == 201, captured.text
    assert (await ledger.post(f"/holds/auth-{tag}-3/void")).status_code == 200
    await settled(ledger)

    pages = await every_page(ledger, card, limit=2)
    holds = [hold for page in pages for hold in page]
    assert [(hold["hold_id"], hold["amount_minor"], hold["captured_minor"]) for hold in holds] == [
        (f"auth-{tag}-4", -500, 0), (f"auth-{tag}-2", -300, 0), (f"auth-{tag}-1", -50, 150), (f"auth-{tag}-0", -100, 0)]
    assert [len(page) for page in pages] == [2, 2]
    assert all(hold["counterparty_account_id"] == shop and hold["code"] == "card_purchase" for hold in holds)
    balances = (await ledger.get(f"/accounts/{card}/balance")).json()
    assert -sum(hold["amount_minor"] for hold in holds) == balances["pending"]["amount_minor"] == 950
    # The shop's side: the same holds, as money that will come in.
    assert [hold["amount_minor"] for page in await every_page(ledger, shop, limit=10) for hold in page] == [
        500, 300, 50, 100]


async def test_a_hold_read_on_its_own_shows_what_its_captures_took_and_what_it_still_reserves(ledger):
    card, shop = await funded_card(ledger, 1_000)
    hold_id = f"auth-{uuid.uuid4().hex[:8]}"
    await place(ledger, hold_id, card, shop, 600)
    assert (await ledger.post(f"/holds/{hold_id}/captures", json={"capture_id": "part", "amount_minor": 250})
            ).status_code == 201
    shown = (await ledger.get(f"/holds/{hold_id}")).json()
    assert {key: shown[key] for key in ("state", "amount_minor", "captured_minor", "remaining_minor", "currency")} == {
        "state": "active", "amount_minor": 600, "captured_minor": 250, "remaining_minor": 350, "currency": "RUB"}
    assert (shown["debit_account_id"], shown["credit_account_id"]) == (card, shop)
    assert (await ledger.post(f"/holds/{hold_id}/void")).status_code == 200
    voided = (await ledger.get(f"/holds/{hold_id}")).json()
    assert (voided["state"], voided["captured_minor"], voided["remaining_minor"]) == ("voided", 250, 0)
    assert (await ledger.get(f"/accounts/{card}/holds")).json()["holds"] == [], "a voided hold is pending no more"

    missing = await ledger.get("/holds/never-placed")
    assert (missing.status_code, missing.json()["code"]) == (404, "hold_not_found")
    # A customer reads her holds through her accounts' pending lists, never by id.
    as_alice = await ledger.get(f"/holds/{hold_id}", headers=bearer(ledger.settings.data_dir, "alice"))
    assert (as_alice.status_code, as_alice.json()["code"]) == (403, "forbidden")


async def test_a_card_purchase_names_its_merchant_while_pending_and_once_cleared(ledger):
    card, shop = await funded_card(ledger, 1_000)
    hold_id = f"auth-{uuid.uuid4().hex[:8]}"
    references = {"external_ref": "rrn-602512345678", "metadata": {"merchant": "Ozon", "mcc": "5399"}}
    await place(ledger, hold_id, card, shop, 450, **references)
    pending = (await ledger.get(f"/accounts/{card}/holds")).json()["holds"]
    assert [{key: hold[key] for key in references} for hold in pending] == [references]
    assert {key: (await ledger.get(f"/holds/{hold_id}")).json()[key] for key in references} == references

    assert (await ledger.post(f"/holds/{hold_id}/captures", json={"capture_id": "clearing", "amount_minor": 450})
            ).status_code == 201
    await settled(ledger)
    line = (await ledger.get(f"/accounts/{card}/history")).json()["lines"][0]
    assert (line["amount_minor"], line["external_ref"], line["metadata"]) == (-450, "rrn-602512345678",
                                                                             {"merchant": "Ozon", "mcc": "5399"})
    cleared = (await ledger.get(f"/transfers/{line['transfer_id']}")).json()
    assert cleared["metadata"] == {"merchant": "Ozon", "mcc": "5399"}
    assert await failed_checks(ledger) == {}


async def test_a_hold_whose_metadata_is_not_text_is_refused_by_name_and_reserves_nothing(ledger):
    card, shop = await funded_card(ledger, 1_000)
    response = await ledger.post("/holds", json={
        "hold_id": f"auth-{uuid.uuid4().hex[:8]}", "debit_account_id": card, "credit_account_id": shop,
        "amount_minor": 100, "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(),
        "code": "card_purchase", "metadata": {"merchant": {"name": "Ozon"}}})
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == ["metadata.merchant"]
    assert (await ledger.get(f"/accounts/{card}/balance")).json()["pending"]["amount_minor"] == 0


async def test_a_customer_sees_the_pending_holds_of_her_own_accounts_only(ledger):
    card, shop = await funded_card(ledger, 1_000)  # Alice's
    await place(ledger, f"auth-{uuid.uuid4().hex[:8]}", card, shop, 70)
    await settled(ledger)
    mine = await ledger.get(f"/accounts/{card}/holds", headers=bearer(ledger.settings.data_dir, "alice"))
    assert [hold["amount_minor"] for hold in mine.json()["holds"]] == [-70]
    theirs = await ledger.get(f"/accounts/{card}/holds", headers=bearer(ledger.settings.data_dir, "mallory"))
    assert (theirs.status_code, theirs.json()["code"]) == (404, "account_not_found")
    bad = await ledger.get(f"/accounts/{card}/holds", params={"cursor": "latest"})
    assert bad.status_code == 422 and "cursor" in bad.text


async def test_a_read_model_from_before_placement_positions_is_replayed_from_the_log_and_lists_every_hold(ledger):
    card, shop = await funded_card(ledger, 1_000)
    tag = uuid.uuid4().hex[:8]
    await place(ledger, f"auth-{tag}-old", card, shop, 10)
    await settled(ledger)
    await as_an_older_ledger_left_it(ledger.parts.pool, "DROP INDEX ledger_holds_debit_active, ledger_holds_credit_active;"
                                     " ALTER TABLE ledger_holds DROP COLUMN placed_position, DROP COLUMN placed_at")
    await projections.ensure_schema(ledger.parts.pool)  # at the next start: the read model is emptied
    assert await ledger.parts.pool.fetchval("SELECT count(*) FROM ledger_holds") == 0
    await place(ledger, f"auth-{tag}-new", card, shop, 20)  # the running projection finds its position reset
    await settled(ledger)
    holds = (await ledger.get(f"/accounts/{card}/holds")).json()["holds"]
    assert [(hold["hold_id"], hold["amount_minor"]) for hold in holds] == [(f"auth-{tag}-new", -20),
                                                                          (f"auth-{tag}-old", -10)]
    assert await failed_checks(ledger) == {}
