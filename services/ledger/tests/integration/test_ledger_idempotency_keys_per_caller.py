"""Who may call the ledger: an Idempotency-Key belongs to the caller that sent it
(every service picks its own keys, so two may pick the same one)."""

from __future__ import annotations

import json
from uuid import uuid5

import httpx
import pytest

from kabinet_chassis.idempotency import CLAIM_LEASE_S, fingerprint
from kabinet_contracts.roles import LEDGER_POST
from ledger.api import ACCOUNT_IDS_BY_KEY
from ledger.domain import commands
from services.ledger.tests.integration.ledger_support import open_account
from tests.support.tokens import bearer

pytestmark = pytest.mark.integration


async def test_an_idempotency_key_is_the_callers_own_another_service_using_the_same_key_gets_its_own_answer(ledger):
    cards = bearer(ledger.settings.data_dir, "cards", (LEDGER_POST,))
    savings = bearer(ledger.settings.data_dir, "savings", (LEDGER_POST,))
    key = {"Idempotency-Key": "open-1"}  # a counter each service keeps for itself

    alices = await ledger.post("/accounts", json={"owner_id": "alice", "kind": "card", "currency": "RUB"},
                               headers={**cards, **key})
    assert alices.status_code == 201, alices.text
    bobs = await ledger.post("/accounts", json={"owner_id": "bob", "kind": "savings", "currency": "RUB"},
                             headers={**savings, **key})
    assert bobs.status_code == 201, bobs.text  # not 422 "used with a different request body", nor 409
    assert bobs.json()["owner_id"] == "bob" and bobs.json()["account_id"] != alices.json()["account_id"]
    # The same body under the same key: savings opens an account of its own, never gets the one cards opened.
    also_alices = await ledger.post("/accounts", json={"owner_id": "alice", "kind": "card", "currency": "RUB"},
                                    headers={**savings, "Idempotency-Key": "open-2"})
    cards_second = await ledger.post("/accounts", json={"owner_id": "alice", "kind": "card", "currency": "RUB"},
                                     headers={**cards, "Idempotency-Key": "open-2"})
    assert also_alices.status_code == cards_second.status_code == 201
    assert "idempotent-replayed" not in cards_second.headers
    assert also_alices.json()["account_id"] != cards_second.json()["account_id"]
    # Each caller's repeat still gets its own first answer.
    again = await ledger.post("/accounts", json={"owner_id": "alice", "kind": "card", "currency": "RUB"},
                              headers={**cards, **key})
    assert again.headers["idempotent-replayed"] == "true" and again.json() == alices.json()


async def test_freezing_with_a_key_another_service_used_freezes_the_account_asked_for(ledger):
    alices, bobs = await open_account(ledger, owner="alice"), await open_account(ledger, owner="bob")
    cards = bearer(ledger.settings.data_dir, "cards", (LEDGER_POST,))
    fraud = bearer(ledger.settings.data_dir, "fraud", (LEDGER_POST,))
    key, why = {"Idempotency-Key": "freeze-1"}, {"reason": "fraud_suspected"}
    assert (await ledger.post(f"/accounts/{alices}/freeze", json=why, headers={**cards, **key})).status_code == 200
    frozen = await ledger.post(f"/accounts/{bobs}/freeze", json=why, headers={**fraud, **key})
    assert frozen.status_code == 200, frozen.text
    assert frozen.json()["account_id"] == bobs and frozen.json()["state"] == "frozen"


async def retried_across_the_deploy(ledger, key: str, body: dict, *, answered: bool) -> httpx.Response:
    """A request sent with `key` before keys named their caller (stored under the operation
    alone), then retried by its caller once the ledger keeps keys per caller."""
    first_account = uuid5(ACCOUNT_IDS_BY_KEY, key)  # as derived before
    if answered:
        await ledger.parts.pool.execute(
            "INSERT INTO idempotency_keys (scope, key, request_fingerprint, status_code, response)"
            " VALUES ('ledger.open_account', $1, $2, 201, $3::jsonb)",
            key, fingerprint(body), json.dumps({"account_id": str(first_account), "owner_id": body["owner_id"]}))
    else:  # its process was stopped by the deploy after opening the account, before storing the answer
        await ledger.parts.writer.submit(commands.OpenAccount(first_account, body["owner_id"], body["kind"],
                                                              body["currency"]))
        await ledger.parts.pool.execute(
            "INSERT INTO idempotency_keys (scope, key, request_fingerprint, created_at)"
            " VALUES ('ledger.open_account', $1, $2, now() - make_interval(secs => $3))",
            key, fingerprint(body), float(CLAIM_LEASE_S + 1))
    return await ledger.post("/accounts", json=body, headers={"Idempotency-Key": key})


@pytest.mark.parametrize("answered", [True, False], ids=["answered", "abandoned"])
async def test_a_retry_across_the_deploy_that_made_keys_the_callers_own_opens_no_second_account(ledger, answered):
    body = {"account_id": None, "owner_id": "alice", "kind": "card", "currency": "RUB", "credit_limit_minor": 0}
    retried = await retried_across_the_deploy(ledger, f"before-{answered}", body, answered=answered)
    assert retried.status_code == 201, retried.text
    assert retried.json()["account_id"] == str(uuid5(ACCOUNT_IDS_BY_KEY, f"before-{answered}"))
    assert (await ledger.get("/accounts", params={"owner_id": "alice"})).json()["accounts"] == (
        [] if answered else [retried.json()])  # the answered one was stored only, never opened here
