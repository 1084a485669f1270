"""Rules of the ledger's read side (balances at an instant, history, statements, bad
input, replay of the read model), on real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ledger.verify import verify
from services.ledger.tests.integration.ledger_support import open_account, read_model_held_back, transfer_body

pytestmark = pytest.mark.integration

READ_MODEL_TABLES = {
    "ledger_accounts": "account_id",
    "ledger_entries": "account_id, position, seq",
    "ledger_transfers": "transfer_id",
    "ledger_holds": "hold_id",
}


async def settled(client) -> None:
    await client.parts.projection.wait_for(client.parts.writer.last_position)


async def read_model(pool) -> dict[str, list[dict]]:
    return {table: [dict(row) for row in await pool.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
            for table, order in READ_MODEL_TABLES.items()}


def hold_body(hold_id, debit, credit, amount_minor):
    return {"hold_id": hold_id, "debit_account_id": debit, "credit_account_id": credit, "amount_minor": amount_minor,
            "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(), "code": "card_purchase"}


async def test_replaying_the_read_model_from_the_start_changes_nothing(ledger):
    settlement = await open_account(ledger, "settlement")
    shop = await open_account(ledger, "settlement")
    card = await open_account(ledger, limit=1_000)
    for number, amount in enumerate((5_000, 700)):
        response = await ledger.post("/transfers", json=transfer_body(f"in-{number}", (settlement, -amount), (card, amount)))
        assert response.status_code == 201, response.text
    assert (await ledger.post("/holds", json=hold_body("partly", card, shop, 900))).status_code == 201
    assert (await ledger.post("/holds/partly/captures", json={"capture_id": "c1", "amount_minor": 400})).status_code == 201
    assert (await ledger.post("/holds/partly/void")).status_code == 200
    assert (await ledger.post("/holds", json=hold_body("whole", card, shop, 300))).status_code == 201
    assert (await ledger.post("/holds/whole/captures", json={"capture_id": "c1", "amount_minor": 300})).status_code == 201
    for action in ("freeze", "unfreeze"):
        answer = await ledger.post(f"/accounts/{card}/{action}", json={"reason": "fraud_suspected"},
                                   headers={"Idempotency-Key": str(uuid.uuid4())})
        assert answer.status_code == 200, answer.text
    await settled(ledger)
    pool, projection = ledger.parts.pool, ledger.parts.projection
    before = await read_model(pool)

    # An operator rebuilds the read model by replaying the whole log over it, while money keeps arriving.
    await pool.execute("UPDATE projection_position SET position = 0 WHERE projection = $1", projection.name)
    late = await ledger.post("/transfers", json=transfer_body("late", (settlement, -50), (card, 50)))
    assert late.status_code == 201, late.text
    await settled(ledger)

    after = await read_model(pool)
    for table, rows in before.items():
        assert [row for row in after[table] if row in rows] == rows, f"{table} kept every row as it was"
    late_entry = next(row for row in after["ledger_entries"] if row["transfer_id"] == "late" and str(row["account_id"]) == card)
    assert late_entry["balance_after_minor"] == 5_000 + 700 - 400 - 300 + 50
    report = await verify(ledger.parts.app, ledger.settings)
    assert report.ok, [check for check in report.checks if not check.ok]


async def test_a_misspelt_or_repeated_query_parameter_is_refused_by_name_never_silently_ignored(ledger):
    # Ignored, `date` would answer today's balance as if it were the one asked for, and
    # `amount_min` the whole history as if it were the filtered one.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    assert (await ledger.post("/transfers", json=transfer_body("in", (settlement, -100), (card, 100)))).status_code == 201
    await settled(ledger)
    for path, params, field in (
            (f"/accounts/{card}/balance", {"date": "2020-01-01T00:00:00Z"}, "date"),
            (f"/accounts/{card}/history", {"amount_min": "1000"}, "amount_min"),
            (f"/accounts/{card}/history", [("code", "top_up"), ("code", "p2p")], "code"),
            (f"/accounts/{card}/statement", {"since": "2026-01-01T00:00:00Z", "until": "2026-02-01T00:00:00Z",
                                             "page_size": "10"}, "page_size"),
            (f"/accounts/{card}", {"at": "2020-01-01T00:00:00Z"}, "at"),
            ("/accounts", {"owner_id": "alice", "owner": "bob"}, "owner")):
        response = await ledger.get(path, params=params)
        assert response.status_code == 422, (path, params, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert [error["field"] for error in response.json()["errors"]] == [field], (path, params, response.text)


async def test_an_instant_written_in_nanoseconds_counts_a_posting_made_before_it_within_its_microsecond(ledger):
    # Go's RFC3339Nano and Java's Instant write nanoseconds; the ledger keeps microseconds.
    # Cut to its microsecond, 12:00:00.123456500 would leave out a posting made at
    # 12:00:00.123456, which came before it.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    posted_at = (datetime.now(UTC) + timedelta(seconds=30)).replace(microsecond=123_456)  # within the clock's tolerance
    ledger.parts.writer.clock = lambda: posted_at
    assert (await ledger.post("/transfers", json=transfer_body("in", (settlement, -100), (card, 100)))).status_code == 201
    await settled(ledger)
    just_after = posted_at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "500Z"

    balance = (await ledger.get(f"/accounts/{card}/balance", params={"at": just_after})).json()
    assert balance["posted"]["amount_minor"] == 100
    earlier = {"since": (posted_at - timedelta(days=1)).isoformat(), "until": just_after}
    assert [line["transfer_id"] for line in (await ledger.get(f"/accounts/{card}/history", params=earlier)).json()["lines"]] == [
        "in"]
    statement = (await ledger.get(f"/accounts/{card}/statement", params=earlier)).json()
    assert statement["closing_balance_minor"] == 100 and [line["transfer_id"] for line in statement["lines"]] == ["in"]
    later = (await ledger.get(f"/accounts/{card}/statement", params={
        "since": just_after, "until": (posted_at + timedelta(days=1)).isoformat()})).json()
    assert later["opening_balance_minor"] == 100 and later["lines"] == []
    written_with_a_comma = just_after.replace(".", ",")  # as ISO 8601 allows
    balance = (await ledger.get(f"/accounts/{card}/balance", params={"at": written_with_a_comma})).json()
    assert balance["posted"]["amount_minor"] == 100


async def test_an_instant_not_written_as_rfc_3339_is_refused_by_name_never_guessed(ledger):
    # 1795735433 could be seconds or (were it larger) milliseconds since 1970, and parsing
    # rounds its fraction to the nearest microsecond, which may put a posting on the wrong
    # side of a period's bound.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    for at in ("1795735433.1234567", "1795735433", "2026-11-26T12:00Z", "2026-11-26T12:00:00+0300", "26.11.2026 12:00"):
        response = await ledger.get(f"/accounts/{card}/balance", params={"at": at})
        assert response.status_code == 422, (at, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert [error["field"] for error in response.json()["errors"]] == ["at"], response.text
        assert "RFC 3339" in response.text
    in_a_week = int((datetime.now(UTC) + timedelta(days=7)).timestamp())
    refused = await ledger.post("/holds", json={**hold_body("h-unix", card, settlement, 100), "expires_at": in_a_week})
    assert refused.status_code == 422 and "expires_at" in refused.text, refused.text


async def test_an_amount_that_is_not_a_json_integer_moves_no_money(ledger):
    # A client's serialisation bug (`true`, "250", 300.0) is refused by name, not paid out.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    for number, amount in enumerate((True, "250", 300.0, "1_000")):
        body = transfer_body(f"lenient-{number}", (settlement, -1), (card, 1))
        body["legs"][0]["amount_minor"], body["legs"][1]["amount_minor"] = amount, amount
        response = await ledger.post("/transfers", json=body)
        assert response.status_code == 422, (amount, response.text)
        assert [error["field"] for error in response.json()["errors"]] == ["legs[0].amount_minor", "legs[1].amount_minor"]
    for path, body in ((f"/accounts/{card}/credit-limit", {"credit_limit_minor": True}),
                       ("/accounts", {"owner_id": "alice", "kind": "card", "currency": "RUB", "credit_limit_minor": "100"})):
        response = await (ledger.put if path.endswith("credit-limit") else ledger.post)(
            path, json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        assert response.status_code == 422 and "credit_limit_minor" in response.text, (path, response.text)
    await settled(ledger)
    assert (await ledger.get(f"/accounts/{card}/balance")).json()["posted"]["amount_minor"] == 0


async def test_a_payment_the_ledger_confirmed_is_in_every_read_asked_after_the_confirmation(ledger, monkeypatch):
    # A transfer is answered from its commit; the read model that history, statements and
    # past balances come from follows a moment later (longer under load). A read asked after
    # the confirmation must not answer as if the payment had not happened.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    start = datetime.now(UTC) - timedelta(seconds=1)
    await settled(ledger)
    caught_up = read_model_held_back(ledger, monkeypatch)
    assert (await ledger.post("/transfers", json=transfer_body("paid", (settlement, -100), (card, 100)))).status_code == 201
    confirmed = datetime.now(UTC)
    asyncio.get_running_loop().call_later(0.3, caught_up.set)

    balance, history, statement = await asyncio.gather(
        ledger.get(f"/accounts/{card}/balance", params={"at": confirmed.isoformat()}),
        ledger.get(f"/accounts/{card}/history"),
        ledger.get(f"/accounts/{card}/statement", params={"since": start.isoformat(), "until": confirmed.isoformat()}))
    assert balance.json()["posted"]["amount_minor"] == 100, balance.text
    assert [line["transfer_id"] for line in history.json()["lines"]] == ["paid"], history.text
    assert statement.json()["closing_balance_minor"] == 100, statement.text


async def test_a_period_or_amount_range_the_wrong_way_round_names_the_parameter_like_every_other_bad_input(ledger):
    # A client app marks the field to correct from `errors[].field`, as for every other refusal of bad input.
    card = await open_account(ledger)
    backwards = {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
    for path, params, code, field in ((f"/accounts/{card}/statement", backwards, "invalid_period", "until"),
                                      (f"/accounts/{card}/history", backwards, "invalid_period", "until"),
                                      (f"/accounts/{card}/history", {"amount_min_minor": 500, "amount_max_minor": 100},
                                       "invalid_amount_range", "amount_max_minor")):
        response = await ledger.get(path, params=params)
        assert response.status_code == 422 and response.json()["code"] == code, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert [error["field"] for error in response.json().get("errors", [])] == [field], response.text


async def test_an_instant_in_nanoseconds_at_the_end_of_the_calendar_is_refused_by_name_not_a_server_error(ledger):
    # Rounded up to its microsecond, 9999-12-31T23:59:59.9999999 has no instant to go to.
    card = await open_account(ledger)
    last = "9999-12-31T23:59:59.9999999"
    for path, params, field in ((f"/accounts/{card}/balance", {"at": f"{last}Z"}, "at"),
                                (f"/accounts/{card}/history", {"until": f"{last}-05:00"}, "until"),
                                (f"/accounts/{card}/statement", {"since": "2026-01-01T00:00:00Z", "until": f"{last}+00:00"},
                                 "until")):
        response = await ledger.get(path, params=params)
        assert response.status_code == 422, (path, params, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert [error["field"] for error in response.json()["errors"]] == [field], response.text
