"""Who may call the ledger: every call carries an access token the ledger checks itself
(not only the gateway); moving money needs a service's `ledger:post` role; a customer's
own token reads only the customer's accounts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from kabinet_contracts.roles import LEDGER_READ
from services.ledger.tests.integration.ledger_support import open_account, transfer_body
from tests.support.tokens import bearer

pytestmark = pytest.mark.integration


async def funded(ledger) -> tuple[str, str]:
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger, owner="alice")
    posted = await ledger.post("/transfers", json=transfer_body("fund-alice", (settlement, -5_000), (card, 5_000),
                                                                 code="top_up"))
    assert posted.status_code == 201, posted.text
    return settlement, card


def account_reads(card: str) -> list[tuple[str, dict]]:
    now = datetime.now(UTC)
    return [(f"/accounts/{card}", {}), (f"/accounts/{card}/balance", {}),
            (f"/accounts/{card}/balance", {"at": now.isoformat()}), (f"/accounts/{card}/history", {}),
            (f"/accounts/{card}/statement", {"since": (now - timedelta(days=1)).isoformat(), "until": now.isoformat()})]


async def test_every_ledger_call_without_an_access_token_is_refused_401(ledger):
    settlement, card = await funded(ledger)
    del ledger.headers["Authorization"]
    calls = [("POST", "/transfers", transfer_body("anonymous-1", (card, -100), (settlement, 100))),
             ("POST", "/accounts", {"owner_id": "mallory", "kind": "card", "currency": "RUB"}),
             ("GET", f"/accounts/{card}", None), ("GET", "/accounts?owner_id=alice", None)]
    for method, path, body in calls:
        response = await ledger.request(method, path, json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        assert response.status_code == 401, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "unauthorized" and response.headers["www-authenticate"] == "Bearer"
    forged = await ledger.get(f"/accounts/{card}", headers={"Authorization": "Bearer not.a.token"})
    assert forged.status_code == 401 and forged.json()["code"] == "invalid_token"
    for path in ("/transfers", "/accounts", "/holds/h-1/captures"):  # a body that is not JSON is read after the token
        unread = await ledger.post(path, content="{not json", headers={"Content-Type": "application/json"})
        assert unread.status_code == 401 and unread.json()["code"] == "unauthorized", (path, unread.text)


@pytest.mark.parametrize("roles", [(), (LEDGER_READ,)], ids=["customer", "reader"])
async def test_only_a_service_with_the_post_role_moves_money_or_manages_accounts_and_a_refusal_saves_nothing(
        ledger, roles):
    settlement, card = await funded(ledger)
    them = bearer(ledger.settings.data_dir, "alice", roles)
    hold_deadline = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    calls = [
        ("POST", "/transfers", transfer_body("alice-pays-herself", (card, -100), (settlement, 100))),
        ("POST", "/accounts", {"owner_id": "alice", "kind": "card", "currency": "RUB"}),
        ("PUT", f"/accounts/{card}/credit-limit", {"credit_limit_minor": 1_000_000}),
        ("POST", f"/accounts/{card}/freeze", {"reason": "fraud_suspected"}),
        ("POST", "/holds", {"hold_id": "alice-hold", "debit_account_id": card, "credit_account_id": settlement,
                            "amount_minor": 100, "currency": "RUB", "expires_at": hold_deadline, "code": "card_purchase"}),
        ("POST", "/holds/alice-hold/void", None),
    ]
    for method, path, body in calls:
        response = await ledger.request(method, path, json=body, headers={**them, "Idempotency-Key": str(uuid.uuid4())})
        assert response.status_code == 403, (path, response.text)
        assert response.json()["code"] == "forbidden" and "ledger:post" in response.json()["detail"]
    # Nothing happened: the transfer id is still free, the account still open, its money and limit untouched.
    first = await ledger.post("/transfers", json=transfer_body("alice-pays-herself", (card, -100), (settlement, 100)))
    assert first.status_code == 201 and first.json()["replayed"] is False
    account = (await ledger.get(f"/accounts/{card}")).json()
    assert account["state"] == "open" and account["credit_limit_minor"] == 0
    assert account["balances"]["posted"]["amount_minor"] == 4_900 and account["balances"]["pending"]["amount_minor"] == 0


async def test_a_customers_own_token_reads_the_customers_accounts_and_another_customers_token_finds_none(ledger):
    _, card = await funded(ledger)
    alice = bearer(ledger.settings.data_dir, "alice")
    bob = bearer(ledger.settings.data_dir, "bob")
    for path, params in account_reads(card):
        mine = await ledger.get(path, params=params, headers=alice)
        assert mine.status_code == 200, (path, mine.text)
        theirs = await ledger.get(path, params=params, headers=bob)
        nobodys = await ledger.get(path.replace(card, str(uuid.uuid4())), params=params, headers=bob)
        assert theirs.status_code == nobodys.status_code == 404, (path, theirs.text)
        assert theirs.json()["code"] == nobodys.json()["code"] == "account_not_found"  # indistinguishable

    assert [a["account_id"] for a in (await ledger.get("/accounts", params={"owner_id": "alice"},
                                                       headers=alice)).json()["accounts"]] == [card]
    listing_alices = await ledger.get("/accounts", params={"owner_id": "alice"}, headers=bob)
    assert listing_alices.status_code == 403 and listing_alices.json()["code"] == "forbidden"


async def test_a_token_naming_the_bank_reads_its_internal_accounts_only_with_a_ledger_role(ledger):
    settlement, _ = await funded(ledger)
    without_role = await ledger.get(f"/accounts/{settlement}", headers=bearer(ledger.settings.data_dir, "bank"))
    assert without_role.status_code == 403 and without_role.json()["code"] == "forbidden"
    listing = await ledger.get("/accounts", params={"owner_id": "bank"}, headers=bearer(ledger.settings.data_dir, "bank"))
    assert listing.status_code == 403
    reader = bearer(ledger.settings.data_dir, "reconciliation", (LEDGER_READ,))
    assert (await ledger.get(f"/accounts/{settlement}", headers=reader)).status_code == 200
    assert (await ledger.get("/accounts", params={"owner_id": "bank"}, headers=reader)).json()["accounts"]


async def test_a_token_signed_by_another_key_is_refused_even_with_the_post_role(ledger, tmp_path):
    _, card = await funded(ledger)
    impostor = bearer(tmp_path, "payments", ("ledger:post",))  # a development key of another data dir
    response = await ledger.post("/transfers", json=transfer_body("impostor-1", (card, -100), (card, 100)),
                                 headers=impostor)
    assert response.status_code == 401 and response.json()["code"] == "invalid_token"


async def test_a_customers_line_of_a_transfer_paying_many_names_the_payer_not_the_other_customers_paid(ledger):
    payroll = await open_account(ledger, "settlement")
    alices, bobs, carols = [await open_account(ledger, owner=owner) for owner in ("alice", "bob", "carol")]
    salaries = transfer_body("payroll-march", (payroll, -300), (alices, 100), (bobs, 100), (carols, 100), code="salary")
    assert (await ledger.post("/transfers", json=salaries)).status_code == 201
    alice = bearer(ledger.settings.data_dir, "alice")
    history = await ledger.get(f"/accounts/{alices}/history", headers=alice)
    assert history.status_code == 200, history.text
    assert [line["counterparty_account_ids"] for line in history.json()["lines"]] == [[payroll]]
    paid_by_bob = await ledger.get(f"/accounts/{alices}/history", params={"counterparty_account_id": bobs}, headers=alice)
    assert paid_by_bob.json()["lines"] == [], "Bob neither paid Alice nor was paid by her"
    assert len((await ledger.get(f"/accounts/{alices}/history", params={"counterparty_account_id": payroll},
                                 headers=alice)).json()["lines"]) == 1
    # The payer's own line names everyone it paid.
    payer_lines = (await ledger.get(f"/accounts/{payroll}/history")).json()["lines"]
    assert [line["counterparty_account_ids"] for line in payer_lines] == [sorted([alices, bobs, carols])]
