"""Rules of the ledger through its HTTP API, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from kabinet_chassis.idempotency import CLAIM_LEASE_S, KEY_RETENTION_S, fingerprint, purge_expired
from ledger.verify import verify
from services.ledger.tests.integration.ledger_support import open_account, transfer_body

pytestmark = pytest.mark.integration


async def test_transfer_moves_money_and_shows_in_balances_history_and_statement(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    start = datetime.now(UTC)
    assert (await ledger.post("/transfers", json=transfer_body("top-up-1", (settlement, -10_000), (card, 10_000),
                                                                code="top_up"))).status_code == 201
    paid = await ledger.post("/transfers", json=transfer_body("coffee-1", (card, -350), (settlement, 350), code="card_purchase"))
    assert paid.status_code == 201 and paid.json()["replayed"] is False
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)

    balances = (await ledger.get(f"/accounts/{card}/balance")).json()
    assert balances["posted"] == {"amount_minor": 9_650, "currency": "RUB"}
    assert balances["available"]["amount_minor"] == 9_650

    history = (await ledger.get(f"/accounts/{card}/history", params={"limit": 1})).json()
    assert [line["transfer_id"] for line in history["lines"]] == ["coffee-1"]
    assert history["lines"][0]["counterparty_account_ids"] == [settlement]
    older = (await ledger.get(f"/accounts/{card}/history", params={"limit": 1, "cursor": history["next_cursor"]})).json()
    assert [line["transfer_id"] for line in older["lines"]] == ["top-up-1"] and older["next_cursor"] is None
    by_code = (await ledger.get(f"/accounts/{card}/history", params={"code": "top_up"})).json()
    assert [line["amount_minor"] for line in by_code["lines"]] == [10_000]
    by_counterparty = (await ledger.get(f"/accounts/{card}/history", params={"counterparty_account_id": settlement})).json()
    assert len(by_counterparty["lines"]) == 2
    itself = (await ledger.get(f"/accounts/{card}/history", params={"counterparty_account_id": card})).json()
    assert itself["lines"] == []  # no transfer pays an account from itself
    big = (await ledger.get(f"/accounts/{card}/history", params={"amount_min_minor": 1000})).json()
    assert [line["transfer_id"] for line in big["lines"]] == ["top-up-1"]

    statement = (await ledger.get(f"/accounts/{card}/statement", params={
        "since": (start - timedelta(minutes=1)).isoformat(), "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()})).json()
    assert statement["opening_balance_minor"] == 0 and statement["closing_balance_minor"] == 9_650
    assert [line["balance_after_minor"] for line in statement["lines"]] == [10_000, 9_650]

    before = (await ledger.get(f"/accounts/{card}/balance", params={"at": (start - timedelta(minutes=1)).isoformat()})).json()
    assert before["posted"]["amount_minor"] == 0


async def test_overdraft_is_refused_with_problem_json_and_leaves_nothing(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    response = await ledger.post("/transfers", json=transfer_body("too-much", (card, -1), (settlement, 1)))
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "insufficient_funds"
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    assert (await ledger.get(f"/accounts/{card}/history")).json()["lines"] == []


async def set_credit_limit(client, account_id, limit_minor):
    return await client.put(f"/accounts/{account_id}/credit-limit", json={"credit_limit_minor": limit_minor},
                            headers={"Idempotency-Key": str(uuid.uuid4())})


async def test_a_credit_limit_lets_a_card_go_below_zero_but_never_below_what_it_already_uses(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    granted = await set_credit_limit(ledger, card, 500)
    assert granted.status_code == 200, granted.text
    assert granted.json()["credit_limit_minor"] == 500
    assert granted.json()["balances"]["available"]["amount_minor"] == 500

    spent = await ledger.post("/transfers", json=transfer_body("on-credit", (card, -300), (settlement, 300)))
    assert spent.status_code == 201
    lowered = await set_credit_limit(ledger, card, 200)  # 300 is already used
    assert lowered.status_code == 409 and lowered.json()["code"] == "insufficient_funds"
    assert lowered.headers["content-type"].startswith("application/problem+json")
    account = (await ledger.get(f"/accounts/{card}")).json()
    assert account["credit_limit_minor"] == 500 and account["balances"]["posted"]["amount_minor"] == -300

    internal = await set_credit_limit(ledger, settlement, 100)
    assert internal.status_code == 422 and internal.json()["code"] == "invalid_account"
    negative = await set_credit_limit(ledger, card, -1)
    assert negative.status_code == 422
    assert {error["field"] for error in negative.json()["errors"]} == {"credit_limit_minor"}


async def test_a_retried_account_opening_after_a_server_error_opens_one_account_not_two(ledger, monkeypatch):
    projection = ledger.parts.projection
    wait_for = projection.wait_for
    waits = {"count": 0}

    async def first_wait_times_out(position, timeout_s=30.0):
        waits["count"] += 1
        if waits["count"] == 1:
            raise TimeoutError("projection is behind")  # after the commit: the key is released
        return await wait_for(position, timeout_s)

    monkeypatch.setattr(projection, "wait_for", first_wait_times_out)
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    body, headers = {"owner_id": owner, "kind": "card", "currency": "RUB"}, {"Idempotency-Key": str(uuid.uuid4())}
    first = await ledger.post("/accounts", json=body, headers=headers)
    assert first.status_code == 503 and first.json()["code"] == "read_model_behind"
    retried = await ledger.post("/accounts", json=body, headers=headers)
    assert retried.status_code == 201, retried.text
    accounts = (await ledger.get("/accounts", params={"owner_id": owner})).json()["accounts"]
    assert [account["account_id"] for account in accounts] == [retried.json()["account_id"]]


async def test_history_filters_beyond_what_the_ledger_can_hold_are_refused_by_name_not_a_server_error(ledger):
    card = await open_account(ledger)
    too_big = await ledger.get(f"/accounts/{card}/history", params={"amount_min_minor": 10**19})
    assert too_big.status_code == 422
    assert {error["field"] for error in too_big.json()["errors"]} == {"amount_min_minor"}
    bad_cursor = await ledger.get(f"/accounts/{card}/history", params={"cursor": "99999999999999999999.1"})
    assert bad_cursor.status_code == 422
    assert {error["field"] for error in bad_cursor.json()["errors"]} == {"cursor"}


async def test_a_history_asked_for_an_empty_period_or_amount_range_is_refused_like_a_statement(ledger):
    card = await open_account(ledger)
    for params, code in (({"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "invalid_period"),
                         ({"since": "2026-11-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, "invalid_period"),
                         ({"amount_min_minor": 500, "amount_max_minor": 100}, "invalid_amount_range")):
        response = await ledger.get(f"/accounts/{card}/history", params=params)
        assert response.status_code == 422 and response.json()["code"] == code, (params, response.text)
    one_amount = await ledger.get(f"/accounts/{card}/history", params={"amount_min_minor": 100, "amount_max_minor": 100})
    assert one_amount.status_code == 200


async def test_instants_outside_the_ledgers_calendar_are_refused_by_name_not_a_server_error(ledger):
    card = await open_account(ledger)
    far = "9999-12-31T23:59:59-14:00"
    for path, params, field in ((f"/accounts/{card}/balance", {"at": far}, "at"),
                                (f"/accounts/{card}/history", {"until": far}, "until"),
                                (f"/accounts/{card}/statement", {"since": "0001-01-01T00:00:00+14:00", "until": far}, "since")):
        response = await ledger.get(path, params=params)
        assert response.status_code == 422, (path, response.text)
        assert field in {error["field"] for error in response.json()["errors"]}


async def test_an_unknown_account_kind_is_refused_by_name_and_not_echoed_back(ledger):
    response = await ledger.post("/accounts", json={"owner_id": "alice", "kind": "x" * 100_000, "currency": "RUB"},
                                 headers={"Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 422 and response.headers["content-type"].startswith("application/problem+json")
    assert [error["field"] for error in response.json()["errors"]] == ["kind"] and "'card'" in response.text
    assert len(response.content) < 2_000


async def test_a_nul_character_is_refused_and_the_history_keeps_flowing(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    poisoned = {**transfer_body("nul-1", (settlement, -10), (card, 10)), "metadata": {"note": "a\u0000b"}}
    response = await ledger.post("/transfers", json=poisoned)
    assert response.status_code == 422 and response.json()["code"] == "invalid_transfer"
    assert response.headers["content-type"].startswith("application/problem+json")
    assert (await ledger.post("/transfers", json=transfer_body("clean-1", (settlement, -10), (card, 10)))).status_code == 201
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position, timeout_s=10)
    history = (await ledger.get(f"/accounts/{card}/history")).json()
    assert [line["transfer_id"] for line in history["lines"]] == ["clean-1"]


async def test_a_posting_at_a_statements_end_instant_belongs_to_the_next_statement_and_balances_agree(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    month_end = (datetime.now(UTC) + timedelta(seconds=30)).replace(microsecond=0)  # within the clock's tolerance
    ledger.parts.writer.clock = lambda: month_end - timedelta(seconds=20)
    assert (await ledger.post("/transfers", json=transfer_body("mid", (settlement, -1_000), (card, 1_000)))).status_code == 201
    ledger.parts.writer.clock = lambda: month_end
    assert (await ledger.post("/transfers", json=transfer_body("edge", (settlement, -250), (card, 250)))).status_code == 201
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)

    def statement(since, until):
        return ledger.get(f"/accounts/{card}/statement", params={"since": since.isoformat(), "until": until.isoformat()})

    first = (await statement(month_end - timedelta(days=30), month_end)).json()
    second = (await statement(month_end, month_end + timedelta(days=30))).json()
    at_end = (await ledger.get(f"/accounts/{card}/balance", params={"at": month_end.isoformat()})).json()
    assert first["closing_balance_minor"] == at_end["posted"]["amount_minor"] == second["opening_balance_minor"] == 1_000
    assert [line["transfer_id"] for line in second["lines"]] == ["edge"] and second["closing_balance_minor"] == 1_250


async def test_a_key_whose_request_died_midway_is_taken_over_once_its_lease_runs_out(ledger):
    card = await open_account(ledger)
    why = {"reason": "customer_request"}
    body = fingerprint({"account_id": card, **why})

    async def claim_left_behind(key: str, age_s: int) -> None:  # as by a process killed mid-request
        await ledger.parts.pool.execute(
            "INSERT INTO idempotency_keys (scope, key, request_fingerprint, created_at)"
            " VALUES ('ledger.FreezeAccount', $1, $2, now() - make_interval(secs => $3))", key, body, float(age_s))

    await claim_left_behind("freeze-recent", 1)
    busy = await ledger.post(f"/accounts/{card}/freeze", json=why, headers={"Idempotency-Key": "freeze-recent"})
    assert busy.status_code == 409 and busy.json()["code"] == "request_in_progress"

    await claim_left_behind("freeze-abandoned", CLAIM_LEASE_S + 1)
    frozen = await ledger.post(f"/accounts/{card}/freeze", json=why, headers={"Idempotency-Key": "freeze-abandoned"})
    assert frozen.status_code == 200 and frozen.json()["state"] == "frozen"
    again = await ledger.post(f"/accounts/{card}/freeze", json=why, headers={"Idempotency-Key": "freeze-abandoned"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"


async def test_a_refusal_is_the_answer_a_repeated_key_gets(ledger):
    card = await open_account(ledger)
    why = {"reason": "customer_request"}
    assert (await ledger.post(f"/accounts/{card}/close", json=why, headers={"Idempotency-Key": "close-1"})).status_code == 200
    refused = await ledger.post(f"/accounts/{card}/freeze", json=why, headers={"Idempotency-Key": "freeze-closed"})
    assert refused.status_code == 409 and refused.json()["code"] == "account_closed"
    again = await ledger.post(f"/accounts/{card}/freeze", json=why, headers={"Idempotency-Key": "freeze-closed"})
    assert again.status_code == 409 and again.json()["code"] == "account_closed"
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_a_long_statement_comes_in_pages_that_join_into_the_whole_period(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    start = datetime.now(UTC) - timedelta(seconds=1)
    for number, amount in enumerate((500, -120, 300, -80, 45)):
        legs = ((settlement, -amount), (card, amount)) if amount > 0 else ((card, amount), (settlement, -amount))
        assert (await ledger.post("/transfers", json=transfer_body(f"line-{number}", *legs))).status_code == 201
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    period = {"since": start.isoformat(), "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}

    whole = (await ledger.get(f"/accounts/{card}/statement", params=period)).json()
    pages, cursor = [], None
    for _ in range(10):  # bounded: 5 lines in pages of 2
        page = (await ledger.get(f"/accounts/{card}/statement", params={**period, "limit": 2, **(
            {"cursor": cursor} if cursor else {})})).json()
        pages.append(page)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(page["lines"]) for page in pages] == [2, 2, 1]
    assert [line for page in pages for line in page["lines"]] == whole["lines"]
    assert {(p["opening_balance_minor"], p["closing_balance_minor"], p["credits_minor"], p["debits_minor"]) for p in pages} == {
        (0, 645, 845, 200)}
    assert whole["opening_balance_minor"] + whole["credits_minor"] - whole["debits_minor"] == whole["closing_balance_minor"]
    assert [line["balance_after_minor"] for line in whole["lines"]] == [500, 380, 680, 600, 645]


async def test_idempotency_keys_are_kept_a_week_then_purged(ledger):
    pool = ledger.parts.pool
    for key, age_s in (("a-week-and-a-day", KEY_RETENTION_S + 86_400), ("yesterday", 86_400)):
        await pool.execute("INSERT INTO idempotency_keys (scope, key, request_fingerprint, status_code, response, created_at)"
                           " VALUES ('test', $1, 'f', 200, '{}', now() - make_interval(secs => $2))", key, float(age_s))
    assert await purge_expired(pool) == 1
    assert [row["key"] for row in await pool.fetch("SELECT key FROM idempotency_keys WHERE scope = 'test'")] == ["yesterday"]


async def test_bad_input_names_the_field(ledger):
    response = await ledger.post("/transfers", json={"transfer_id": "x", "code": "p2p", "legs": [
        {"account_id": str(uuid.uuid4()), "amount_minor": 1.5, "currency": "RUB"},
        {"account_id": str(uuid.uuid4()), "amount_minor": -1, "currency": "rub"}]})
    assert response.status_code == 422
    fields = {error["field"] for error in response.json()["errors"]}
    assert fields == {"legs[0].amount_minor", "legs[1].currency"}


async def test_same_transfer_id_replays_and_other_body_conflicts(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    body = transfer_body("t-1", (settlement, -500), (card, 500))
    first = (await ledger.post("/transfers", json=body)).json()
    again = await ledger.post("/transfers", json=body)
    assert again.json()["replayed"] is True and again.json()["posted_at"] == first["posted_at"]
    other = await ledger.post("/transfers", json=transfer_body("t-1", (settlement, -600), (card, 600)))
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"


async def test_mutating_account_calls_need_an_idempotency_key_and_replay(ledger):
    response = await ledger.post("/accounts", json={"owner_id": "alice", "kind": "card", "currency": "RUB"})
    assert response.status_code == 400 and response.json()["code"] == "idempotency_key_required"
    body = {"owner_id": "alice", "kind": "card", "currency": "RUB"}
    first = await ledger.post("/accounts", json=body, headers={"Idempotency-Key": "k1"})
    again = await ledger.post("/accounts", json=body, headers={"Idempotency-Key": "k1"})
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = await ledger.post("/accounts", json={**body, "currency": "USD"}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"


async def test_hold_capture_void_and_expiry_through_the_api(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    shop = await open_account(ledger, "settlement")
    await ledger.post("/transfers", json=transfer_body("fund", (settlement, -1_000), (card, 1_000)))
    expires = (datetime.now(UTC) + timedelta(days=7)).isoformat()
    hold = {"hold_id": "auth-1", "debit_account_id": card, "credit_account_id": shop, "amount_minor": 700,
            "currency": "RUB", "expires_at": expires, "code": "card_purchase"}
    assert (await ledger.post("/holds", json=hold)).status_code == 201
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    balances = (await ledger.get(f"/accounts/{card}/balance")).json()
    assert (balances["posted"]["amount_minor"], balances["pending"]["amount_minor"], balances["available"]["amount_minor"]) == (
        1_000, 700, 300)
    captured = await ledger.post("/holds/auth-1/captures", json={"capture_id": "c1", "amount_minor": 500})
    assert captured.json()["remaining_minor"] == 200
    assert (await ledger.post("/holds/auth-1/captures", json={"capture_id": "c2", "amount_minor": 201})).json()["code"] == (
        "capture_exceeds_hold")
    assert (await ledger.post("/holds/auth-1/void")).json()["state"] == "voided"
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    balances = (await ledger.get(f"/accounts/{card}/balance")).json()
    assert (balances["posted"]["amount_minor"], balances["pending"]["amount_minor"]) == (500, 0)

    soon = {**hold, "hold_id": "auth-2", "amount_minor": 100, "expires_at": (datetime.now(UTC) + timedelta(seconds=1)).isoformat()}
    assert (await ledger.post("/holds", json=soon)).status_code == 201

    async def expired():
        row = await ledger.parts.pool.fetchrow("SELECT state FROM ledger_holds WHERE hold_id = 'auth-2'")
        return row is not None and row["state"] == "expired"

    for _ in range(100):
        if await expired():
            break
        await asyncio.sleep(0.1)
    assert await expired(), "the expiry sweep released the hold after its deadline"


async def test_eight_clients_hammering_ten_accounts_and_a_hot_fee_account_lose_nothing(ledger):
    settlement = await open_account(ledger, "settlement")
    fees = await open_account(ledger, "fee_income")
    accounts = [await open_account(ledger, owner=f"c{i}") for i in range(10)]
    await ledger.post("/transfers", json=transfer_body("seed", (settlement, -10 * 2_000),
                                                       *[(a, 2_000) for a in accounts], code="top_up"))
    posted: list[tuple[str, int]] = []
    refused = {"count": 0}

    async def client(number: int) -> None:
        rng = random.Random(number)
        for i in range(60):
            source, target = rng.sample(accounts, 2)
            amount = rng.randint(1, 400)
            body = transfer_body(f"c{number}-{i}", (source, -amount - 5), (target, amount), (fees, 5))
            response = await ledger.post("/transfers", json=body)
            if response.status_code == 201:
                posted.append((source, amount))
            else:
                assert response.json()["code"] == "insufficient_funds", response.text
                refused["count"] += 1

    await asyncio.gather(*(client(n) for n in range(8)))
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    fee_balance = (await ledger.get(f"/accounts/{fees}/balance")).json()["posted"]["amount_minor"]
    assert fee_balance == 5 * len(posted), "no lost update on the hot account"
    customer_total = sum([(await ledger.get(f"/accounts/{a}/balance")).json()["posted"]["amount_minor"] for a in accounts])
    assert customer_total == 20_000 - 5 * len(posted)
    for account in accounts:
        assert (await ledger.get(f"/accounts/{account}/balance")).json()["posted"]["amount_minor"] >= 0
    assert refused["count"] + len(posted) == 480
    report = await verify(ledger.parts.app, ledger.settings)
    assert report.ok, [c for c in report.checks if not c.ok]


async def test_unknown_account_is_not_found(ledger):
    response = await ledger.get(f"/accounts/{uuid.uuid4()}")
    assert response.status_code == 404 and response.json()["code"] == "account_not_found"


async def test_posted_transfer_is_published_on_the_ledger_topic(ledger, stack):
    import json

    from aiokafka import AIOKafkaConsumer

    from kabinet_contracts.ledger import LEDGER_TOPIC

    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    transfer_id = f"published-{uuid.uuid4().hex}"
    assert (await ledger.post("/transfers", json=transfer_body(transfer_id, (settlement, -42), (card, 42)))).status_code == 201
    consumer = AIOKafkaConsumer(LEDGER_TOPIC, bootstrap_servers=stack.bootstrap_servers, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=f"check-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    found = None
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while found is None and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    envelope = json.loads(record.value)
                    if envelope["type"] == "ledger.transfer_posted" and envelope["payload"]["transfer_id"] == transfer_id:
                        found = (record, envelope)
    finally:
        await consumer.stop()
    assert found is not None, "the transfer never reached ledger.events.v1"
    record, envelope = found
    assert envelope["source"] == "ledger" and envelope["schema_version"] == 3
    assert {(leg["account_id"], leg["amount_minor"]) for leg in envelope["payload"]["legs"]} == {(settlement, -42), (card, 42)}
    assert record.key.decode() == envelope["aggregate_id"]
