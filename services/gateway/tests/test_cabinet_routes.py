"""Rules of the cabinet: a customer sees only their own accounts (in pages), and only with a valid token."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kabinet_chassis.auth import issue_access_token
from ledger import projections

pytestmark = pytest.mark.integration


async def open_funded_card(bank, owner: str, amount_minor: int) -> str:
    async def open_account(body):
        response = await bank.ledger.post("/accounts", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        assert response.status_code == 201, response.text
        return response.json()["account_id"]

    settlement = await open_account({"owner_id": "bank", "kind": "settlement", "currency": "RUB"})
    card = await open_account({"owner_id": owner, "kind": "card", "currency": "RUB"})
    posted = await bank.ledger.post("/transfers", json={"transfer_id": f"fund-{card}", "code": "top_up", "legs": [
        {"account_id": settlement, "amount_minor": -amount_minor, "currency": "RUB"},
        {"account_id": card, "amount_minor": amount_minor, "currency": "RUB"}]})
    assert posted.status_code == 201
    await bank.ledger_parts.projection.wait_for(bank.ledger_parts.writer.last_position)
    return card


def bearer(bank, customer_id: str, **kwargs) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_access_token(bank.key, customer_id, **kwargs)}"}


async def test_customer_sees_own_accounts_balances_history_and_statement(bank):
    card = await open_funded_card(bank, "alice", 5_000)
    me = bearer(bank, "alice")
    listed = await bank.get("/v1/me/accounts", headers=me)
    assert listed.status_code == 200, listed.text
    accounts = listed.json()["accounts"]
    assert [a["account_id"] for a in accounts] == [card]
    assert accounts[0]["balances"]["available"] == {"amount_minor": 5_000, "currency": "RUB"}
    assert (await bank.get(f"/v1/me/accounts/{card}/balance", headers=me)).json()["posted"]["amount_minor"] == 5_000
    history = (await bank.get(f"/v1/me/accounts/{card}/history", headers=me)).json()
    assert [line["amount_minor"] for line in history["lines"]] == [5_000]
    now = datetime.now(UTC)
    statement = await bank.get(f"/v1/me/accounts/{card}/statement", headers=me, params={
        "since": (now - timedelta(hours=1)).isoformat(), "until": (now + timedelta(hours=1)).isoformat()})
    assert statement.status_code == 200 and statement.json()["closing_balance_minor"] == 5_000


async def test_a_customer_sees_her_card_purchases_awaiting_clearing_as_pending_holds(bank):
    card = await open_funded_card(bank, "alice", 5_000)
    shop = (await bank.ledger.post("/accounts", json={"owner_id": "bank", "kind": "marketplace_clearing",
                                                      "currency": "RUB"},
                                   headers={"Idempotency-Key": str(uuid.uuid4())})).json()["account_id"]
    placed = await bank.ledger.post("/holds", json={
        "hold_id": f"auth-{card}", "debit_account_id": card, "credit_account_id": shop, "amount_minor": 1_250,
        "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(), "code": "card_purchase"})
    assert placed.status_code == 201, placed.text
    me = bearer(bank, "alice")
    pending = await bank.get(f"/v1/me/accounts/{card}/holds", headers=me)
    assert pending.status_code == 200, pending.text
    assert [(hold["hold_id"], hold["amount_minor"], hold["code"]) for hold in pending.json()["holds"]] == [
        (f"auth-{card}", -1_250, "card_purchase")]
    balance = (await bank.get(f"/v1/me/accounts/{card}/balance", headers=me)).json()
    assert balance["pending"]["amount_minor"] == 1_250 and balance["available"]["amount_minor"] == 3_750


async def test_a_customer_sees_a_top_up_the_bank_reversed_as_corrected_in_her_history(bank):
    card = await open_funded_card(bank, "alice", 5_000)
    reversed_ = await bank.ledger.post(f"/transfers/fund-{card}/reversal",
                                       json={"reason": "posted_in_error", "case_ref": "MEMO-17"})
    assert reversed_.status_code == 201, reversed_.text
    await bank.ledger_parts.projection.wait_for(bank.ledger_parts.writer.last_position)
    history = await bank.get(f"/v1/me/accounts/{card}/history", headers=bearer(bank, "alice"))
    assert history.status_code == 200, history.text
    assert [(line["transfer_id"], line["amount_minor"], line["reverses"], line["reversed_by"])
            for line in history.json()["lines"]] == [(f"fund-{card}:reversal", -5_000, f"fund-{card}", None),
                                                     (f"fund-{card}", 5_000, None, f"fund-{card}:reversal")]
    assert "MEMO-17" not in history.text, "the bank's case file is not the customer's"


async def test_another_customers_account_is_not_found(bank):
    bobs_card = await open_funded_card(bank, "bob", 100)
    alice = bearer(bank, "alice")
    for path in ("", "/balance", "/history", "/holds", f"/statement?since={datetime.now(UTC).isoformat()}"):
        response = await bank.get(f"/v1/me/accounts/{bobs_card}{path}", headers=alice)
        assert response.status_code == 404, path
        assert response.json()["code"] == "account_not_found"
    assert (await bank.get("/v1/me/accounts", headers=alice)).json()["accounts"] == []


async def test_another_customers_account_as_a_page_cursor_answers_as_an_account_that_does_not_exist(bank):
    # Else the cursor would tell Bob which ids are real accounts (and when they were opened).
    alices = await open_card(bank, "alice")
    await open_card(bank, "bob")
    bob = bearer(bank, "bob")
    with_alices = await bank.get("/v1/me/accounts", headers=bob, params={"cursor": alices})
    with_nobodys = await bank.get("/v1/me/accounts", headers=bob, params={"cursor": str(uuid.uuid4())})
    assert with_alices.status_code == 422 and with_alices.json()["code"] == "invalid_cursor"
    assert (with_alices.status_code, with_alices.json()) == (with_nobodys.status_code, with_nobodys.json())


async def test_no_token_bad_token_and_expired_token_are_refused(bank):
    assert (await bank.get("/v1/me/accounts")).json()["code"] == "unauthorized"
    forged = issue_access_token(Ed25519PrivateKey.generate(), "alice")  # signed by a key the bank does not trust
    response = await bank.get("/v1/me/accounts", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401 and response.json()["code"] == "invalid_token"
    expired = await bank.get("/v1/me/accounts", headers=bearer(bank, "alice", ttl_s=-10))
    assert expired.status_code == 401 and expired.json()["code"] == "token_expired"


async def test_the_bearer_scheme_is_accepted_in_any_case(bank):
    # RFC 9110 §11.1: the authentication scheme is a case-insensitive token.
    await open_card(bank, "alice")
    token = issue_access_token(bank.key, "alice")
    for scheme in ("bearer", "BEARER", "bEaReR"):
        response = await bank.get("/v1/me/accounts", headers={"Authorization": f"{scheme} {token}"})
        assert response.status_code == 200, (scheme, response.text)
        assert len(response.json()["accounts"]) == 1
    basic = await bank.get("/v1/me/accounts", headers={"Authorization": f"Basic {token}"})
    assert basic.status_code == 401 and basic.json()["code"] == "unauthorized"


async def test_a_signed_token_whose_subject_no_customer_can_have_is_refused_as_an_invalid_token(bank):
    # Identity signed it, but no account can belong to its subject: a bad token (401), never
    # a 422 from the ledger about `owner_id`, a field that is no part of the cabinet's API.
    for subject in ("", "c" * 129, "alice\x00"):
        response = await bank.get("/v1/me/accounts", headers=bearer(bank, subject))
        assert response.status_code == 401, (subject, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "invalid_token"
    assert (await bank.get("/v1/me/accounts", headers=bearer(bank, "c" * 128))).status_code == 200


async def test_a_customer_id_shaped_like_a_path_reaches_no_one_elses_accounts(bank):
    await open_funded_card(bank, "bob", 5_000)
    for sub in ("mallory/../bob", "mallory/%2e%2e/bob", "bob?x=", "bob#", ".."):
        response = await bank.get("/v1/me/accounts", headers=bearer(bank, sub))
        if response.status_code == 200:
            assert response.json()["accounts"] == [], sub
        else:
            assert response.status_code == 404, (sub, response.text)


async def test_a_token_naming_the_bank_opens_no_cabinet_on_its_internal_accounts(bank):
    response = await bank.ledger.post("/accounts", json={"owner_id": "bank", "kind": "settlement", "currency": "RUB"},
                                      headers={"Idempotency-Key": str(uuid.uuid4())})
    settlement = response.json()["account_id"]
    for path in ("/v1/me/accounts", f"/v1/me/accounts/{settlement}", f"/v1/me/accounts/{settlement}/history"):
        refused = await bank.get(path, headers=bearer(bank, "bank"))
        assert refused.status_code == 403 and refused.json()["code"] == "not_a_customer", (path, refused.text)


async def open_card(bank, owner: str) -> str:
    response = await bank.ledger.post("/accounts", json={"owner_id": owner, "kind": "card", "currency": "RUB"},
                                      headers={"Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 201, response.text
    return response.json()["account_id"]


async def test_a_customer_with_more_accounts_than_a_page_sees_each_once_by_following_next_cursor(bank):
    opened = await asyncio.gather(*(open_card(bank, "alice") for _ in range(projections.ACCOUNTS_PAGE_SIZE_MAX + 1)))
    listed, cursor = [], None
    for _ in range(10):  # bounded
        response = await bank.get("/v1/me/accounts", headers=bearer(bank, "alice"),
                                  params={"limit": 40, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        listed += [account["account_id"] for account in response.json()["accounts"]]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(listed) == sorted(opened) and len(set(listed)) == len(listed)

    # Alice's cursor in Bob's hands is no cursor of his; naming Alice as owner is no parameter of the cabinet.
    bobs = await open_card(bank, "bob")
    refused = await bank.get("/v1/me/accounts", headers=bearer(bank, "bob"), params={"cursor": opened[0]})
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_cursor"
    for paging in ({"cursor": opened[0], "owner_id": "alice"}, {"owner_id": "alice"}):
        refused = await bank.get("/v1/me/accounts", headers=bearer(bank, "bob"), params=paging)
        assert refused.status_code == 422 and [e["field"] for e in refused.json()["errors"]] == ["owner_id"], paging
        assert opened[0] not in refused.text
    seen = (await bank.get("/v1/me/accounts", headers=bearer(bank, "bob"))).json()
    assert [account["account_id"] for account in seen["accounts"]] == [bobs]


async def test_a_query_parameter_the_cabinet_does_not_have_is_refused_by_name_on_every_route(bank):
    # As the ledger does: ignored, `at` on an account would answer today's balances as if
    # they were those asked for, and a misspelt or second `limit` another page than asked.
    card = await open_funded_card(bank, "alice", 5_000)
    alice = bearer(bank, "alice")
    for path, params, field in (
            (f"/v1/me/accounts/{card}", {"at": "2020-01-01T00:00:00Z"}, "at"),
            ("/v1/me/accounts", {"limt": "1"}, "limt"),
            ("/v1/me/accounts", {"owner_id": "alice"}, "owner_id"),
            ("/v1/me/accounts", [("limit", "500"), ("limit", "1")], "limit"),
            (f"/v1/me/accounts/{card}/balance", {"date": "2020-01-01T00:00:00Z"}, "date"),
            (f"/v1/me/accounts/{card}/history", {"amount_min": "1"}, "amount_min")):
        response = await bank.get(path, headers=alice, params=params)
        assert response.status_code == 422, (path, params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert [error["field"] for error in response.json()["errors"]] == [field], (path, params, response.text)
    # Without a token, a bad query is no business of the cabinet's yet: 401 as for any request.
    assert (await bank.get(f"/v1/me/accounts/{card}", params={"at": "2020-01-01T00:00:00Z"})).status_code == 401


async def test_a_customer_sees_her_account_frozen_but_not_that_the_bank_reviews_her(bank):
    # An anti-money-laundering review is not disclosed to its subject (tipping off): she is
    # told the bank froze the account, and why only for what she may know.
    card = await open_funded_card(bank, "alice", 5_000)
    for reason in ("compliance_review", "customer_request"):
        frozen = await bank.ledger.post(f"/accounts/{card}/freeze", json={"reason": reason},
                                        headers={"Idempotency-Key": str(uuid.uuid4())})
        assert frozen.status_code == 200, frozen.text
    assert frozen.json()["freeze_reasons"] == ["compliance_review", "customer_request"], "staff see every reason"

    alice = bearer(bank, "alice")
    mine = (await bank.get(f"/v1/me/accounts/{card}", headers=alice)).json()
    listed = (await bank.get("/v1/me/accounts", headers=alice)).json()["accounts"]
    for seen in (mine, *listed):
        assert (seen["state"], seen["freeze_reasons"]) == ("frozen", ["by_the_bank", "customer_request"]), seen
    assert "compliance_review" not in str(mine) + str(listed)


async def test_a_statement_of_lines_heavy_with_metadata_reaches_the_customer_page_by_page(bank):
    # A business customer's payroll lines may each carry the most metadata the ledger takes
    # (32 keys and values of 256 characters; Cyrillic is 2 bytes a character). 600 of them
    # are some 20 MB: one page would pass what the gateway takes from the ledger, and answer
    # 503 on every retry. Pages end by size too, so she gets every line, each once.
    card = await open_funded_card(bank, "alice", 1)
    settlement = (await bank.ledger.post("/accounts", json={"owner_id": "bank", "kind": "settlement", "currency": "RUB"},
                                         headers={"Idempotency-Key": str(uuid.uuid4())})).json()["account_id"]
    metadata = {f"{key:02d}" + "к" * 254: "д" * 256 for key in range(32)}
    since = datetime.now(UTC) - timedelta(minutes=1)
    lines_posted = 600

    async def pay(number: int) -> None:
        posted = await bank.ledger.post("/transfers", json={
            "transfer_id": f"salary-{number}", "code": "top_up", "metadata": metadata, "legs": [
                {"account_id": settlement, "amount_minor": -1, "currency": "RUB"},
                {"account_id": card, "amount_minor": 1, "currency": "RUB"}]})
        assert posted.status_code == 201, posted.text

    for first in range(0, lines_posted, 50):
        await asyncio.gather(*(pay(number) for number in range(first, first + 50)))
    await bank.ledger_parts.projection.wait_for(bank.ledger_parts.writer.last_position)
    me = bearer(bank, "alice")
    period = {"since": since.isoformat(), "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    seen, pages, cursor = [], 0, None
    while pages < 20:
        page = await bank.get(f"/v1/me/accounts/{card}/statement", headers=me,
                              params={**period, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text[:300]
        assert len(page.content) <= projections.PAGE_LINES_BYTES_MAX + 200_000, "a page ends once its lines pass 4 MiB"
        seen += [line["transfer_id"] for line in page.json()["lines"]]
        pages, cursor = pages + 1, page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted([f"fund-{card}", *(f"salary-{number}" for number in range(lines_posted))])
    assert pages > 1 and page.json()["closing_balance_minor"] == 1 + lines_posted
    history = await bank.get(f"/v1/me/accounts/{card}/history", headers=me, params={"limit": 200})
    assert history.status_code == 200 and 0 < len(history.json()["lines"]) < 200 and history.json()["next_cursor"]
