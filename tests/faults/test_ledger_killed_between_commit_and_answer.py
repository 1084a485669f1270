"""`kill -9` of the ledger between a command's commit and its answer: the client never hears
back, retries with the same id after the restart, and gets the first answer (the committed
result, as a replay), never a second posting. For transfers, hold captures, and account
opening through the Idempotency-Key path."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from kabinet_chassis.eventstore import event_store_env, events_table
from ledger.application import LedgerApplication
from ledger.domain.transfer import Transfer
from tests.faults.ledger_dies_after_commit import DIE_AFTER_COMMITTING
from tests.faults.ledger_processes import (
    LedgerProcess,
    failed_checks,
    open_account,
    poster_client,
    read_model_caught_up,
    running,
    until_answered,
    verified,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DYING = "tests.faults.ledger_dies_after_commit:create_app"
MARKED = "dies-after-commit"  # in the marked command's ids: the process dies once it is committed


async def committed(settings, aggregate_id) -> bool:
    app = LedgerApplication(env=event_store_env(settings))
    try:
        connection = await asyncpg.connect(settings.service_database_url)
        try:
            return await connection.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {events_table(app.recorder)} WHERE originator_id = $1)", aggregate_id)
        finally:
            await connection.close()
    finally:
        app.close()


async def posted_transfer(settings, transfer_id: str) -> dict:
    """The transfer as the read model keeps it."""
    await read_model_caught_up(settings)
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        row = await connection.fetchrow("SELECT code, legs::text, posted_at FROM ledger_transfers WHERE transfer_id = $1",
                                        transfer_id)
    finally:
        await connection.close()
    return {"code": row["code"], "legs": json.loads(row["legs"]), "posted_at": row["posted_at"]}


async def balance(client: httpx.AsyncClient, account_id: str) -> tuple[int, int]:
    balances = (await client.get(f"/accounts/{account_id}/balance")).json()
    return balances["posted"]["amount_minor"], balances["pending"]["amount_minor"]


@pytest.mark.parametrize("command", ["transfer", "capture"])
async def test_a_command_committed_but_never_answered_is_answered_on_retry_with_its_first_result(
        stack, unique_name, tmp_path, command):
    settings = stack.service_settings(f"ledger_{unique_name}")
    dying = LedgerProcess(settings, tmp_path / "ledger.log", factory=DYING, extra_env={DIE_AFTER_COMMITTING: MARKED})
    dying.start()
    try:
        async with poster_client(dying) as client:
            settlement = await open_account(client, "settlement", "bank")
            card = await open_account(client, "card", "customer")
            funding = await client.post("/transfers", json={"transfer_id": "funding", "code": "top_up", "legs": [
                {"account_id": settlement, "amount_minor": -10_000, "currency": "RUB"},
                {"account_id": card, "amount_minor": 10_000, "currency": "RUB"}]})
            assert funding.status_code == 201, funding.text
            if command == "transfer":
                transfer_id = f"{MARKED}-transfer"
                path, body = "/transfers", {"transfer_id": transfer_id, "code": "card_purchase", "legs": [
                    {"account_id": card, "amount_minor": -2_500, "currency": "RUB"},
                    {"account_id": settlement, "amount_minor": 2_500, "currency": "RUB"}]}
            else:
                hold = await client.post("/holds", json={
                    "hold_id": "hold", "debit_account_id": card, "credit_account_id": settlement, "amount_minor": 4_000,
                    "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
                    "code": "card_purchase"})
                assert hold.status_code == 201, hold.text
                transfer_id = f"hold:capture:{MARKED}-capture"
                path, body = "/holds/hold/captures", {"capture_id": f"{MARKED}-capture", "amount_minor": 2_500}
            with pytest.raises(httpx.HTTPError):  # the process died before answering
                await client.post(path, json=body)
            dying.process.wait(timeout=20)
    finally:
        dying.kill()
    assert await committed(settings, Transfer.id_for(transfer_id)), "the kill came before the commit"

    with running(LedgerProcess(settings, tmp_path / "ledger.log")) as restarted:
        async with poster_client(restarted) as client:
            retried = await until_answered(lambda: client.post(path, json=body))
            assert retried.status_code == 201, retried.text
            again = await client.post(path, json=body)
            assert again.status_code == 201 and again.json() == retried.json()
            answer = retried.json()
            assert answer["replayed"] is True
            stored = await posted_transfer(settings, transfer_id)
            if command == "transfer":
                assert {key: answer[key] for key in ("transfer_id", "code", "legs")} == {
                    "transfer_id": transfer_id, "code": stored["code"], "legs": stored["legs"]}
                assert datetime.fromisoformat(answer["posted_at"]) == stored["posted_at"]
                assert await balance(client, card) == (7_500, 0)
            else:
                assert (answer["transfer_id"], answer["state"], answer["captured_minor"], answer["remaining_minor"]) == (
                    transfer_id, "active", 2_500, 1_500)
                assert await balance(client, card) == (7_500, 1_500)
            assert await balance(client, settlement) == (-7_500, 0)
        report = await verified(settings)
    assert report.ok, failed_checks(report)


async def test_an_account_opened_but_never_answered_is_answered_on_retry_with_that_account_not_a_second(
        stack, unique_name, tmp_path):
    settings = stack.service_settings(f"ledger_{unique_name}")
    owner, key = f"{MARKED}-owner", "open-card-once"
    body = {"owner_id": owner, "kind": "card", "currency": "RUB"}
    dying = LedgerProcess(settings, tmp_path / "ledger.log", factory=DYING, extra_env={DIE_AFTER_COMMITTING: MARKED})
    dying.start()
    try:
        async with poster_client(dying) as client:
            await open_account(client, "settlement", "bank")  # the service has run a while
            with pytest.raises(httpx.HTTPError):
                await client.post("/accounts", json=body, headers={"Idempotency-Key": key})
            dying.process.wait(timeout=20)
    finally:
        dying.kill()
    app = LedgerApplication(env=event_store_env(settings))
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        opened = await connection.fetchval(
            f"SELECT count(*) FROM {events_table(app.recorder)} WHERE topic LIKE '%Account.Opened'"
            " AND position($1::bytea IN state) > 0", owner.encode())
        claim = await connection.fetchrow("SELECT status_code, claimant FROM idempotency_keys WHERE key = $1", key)
    finally:
        await connection.close()
        app.close()
    assert opened == 1, "the kill came before the commit"
    assert claim is not None and claim["status_code"] is None  # claimed, never answered
    assert claim["claimant"] is not None  # by the process that died

    # The dead process's claim names it, and its lock died with it: the first retry takes the
    # key over at once, well inside the claim's lease (60 s), and gets the account committed then.
    with running(LedgerProcess(settings, tmp_path / "ledger.log")) as restarted:
        async with poster_client(restarted) as client:
            retried = await client.post("/accounts", json=body, headers={"Idempotency-Key": key})
            assert retried.status_code == 201, retried.text
            account = retried.json()
            again = await client.post("/accounts", json=body, headers={"Idempotency-Key": key})
            assert again.status_code == 201 and again.json() == account
            assert again.headers.get("Idempotent-Replayed") == "true"
            assert (await client.get(f"/accounts/{account['account_id']}")).json() == account
            listed = (await client.get("/accounts", params={"owner_id": owner})).json()["accounts"]
            assert [a["account_id"] for a in listed] == [account["account_id"]], "one account, not a second"
        report = await verified(settings)
    assert report.ok, failed_checks(report)
