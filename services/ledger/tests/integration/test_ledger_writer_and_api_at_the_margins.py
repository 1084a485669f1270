"""Rules of the batched writer and the internal API at their margins, on real PostgreSQL: a
batch's size limit, commands still queued when the writer stops, a write sent to a standby,
the trace each event of a batch carries, an account opened under its own id, an
Idempotency-Key sent again for another account, a query of many made-up parameters, and
what live holds pay in as filled in when an older store is upgraded."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kabinet_chassis.eventstore import events_table, notifications_after
from kabinet_chassis.telemetry import install_tracing
from ledger import writer as writer_module
from ledger.application import ensure_store_schema
from ledger.domain import commands as c
from ledger.domain.errors import AccountFrozen
from ledger.service import build
from services.ledger.tests.integration.ledger_support import (
    as_an_older_ledger_left_it,
    failed_checks,
    funded_card,
    open_account,
    queued,
    saved_balance,
    transfer_body,
    uncached_writer,
)
from tests.support.tokens import ledger_poster

pytestmark = pytest.mark.integration


def spend(card, settlement, amount_minor: int, transfer_id: str) -> c.PostTransfer:
    return c.PostTransfer(transfer_id, (c.Leg(card, -amount_minor, "RUB"), c.Leg(settlement, amount_minor, "RUB")), "card_purchase")


async def test_a_batch_takes_no_more_commands_than_its_limit_and_the_rest_go_in_the_next(ledger, monkeypatch):
    # One batch is one transaction: its size is bounded, however many commands wait.
    monkeypatch.setattr(writer_module, "BATCH_MAX_COMMANDS", 2)
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    async with uncached_writer(ledger.settings, running=False) as writer:
        waiting = await queued(writer, [spend(card, settlement, 10, f"coffee-{i}") for i in range(5)])
        writer.tasks.append(asyncio.create_task(writer.run()))
        answers = await asyncio.gather(*waiting)
        assert [answer.transfer_id for answer in answers] == [f"coffee-{i}" for i in range(5)]
        assert (writer.batches_total, writer.commands_total) == (3, 5)  # 2 + 2 + 1
    assert await saved_balance(ledger.parts.pool, card) == (950, 0)


async def test_commands_still_queued_behind_the_batch_when_the_writer_stops_are_told_at_once_to_retry(ledger, monkeypatch):
    # Not only the batch being written: the commands still waiting in the queue get their
    # 503 when the writer stops, not silence until their answer wait runs out.
    monkeypatch.setattr(writer_module, "BATCH_MAX_COMMANDS", 1)  # the writer takes one; two stay queued
    monkeypatch.setattr(writer_module, "ANSWER_WAIT_MAX_S", 6)
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    async with uncached_writer(ledger.settings, running=False) as stopping:
        waiting = await queued(stopping, [spend(card, settlement, 1, f"at-stop-{i}") for i in range(3)])
        run = asyncio.create_task(stopping.run())
        await asyncio.sleep(0)  # it takes the first as a batch of one
        run.cancel()
        outcomes = await asyncio.gather(*(asyncio.wait_for(command, 1) for command in waiting), return_exceptions=True)
        await asyncio.gather(run, return_exceptions=True)
    assert all(isinstance(outcome, writer_module.LedgerUnavailable) for outcome in outcomes), outcomes


async def test_a_write_sent_to_a_standby_answers_503_ledger_unavailable_and_posts_nothing(ledger, monkeypatch):
    # Another process holds the writer's lock: this one tells the caller it cannot post here
    # and now (`ledger_unavailable`, not `ledger_busy`, which is a full queue), and when to retry.
    monkeypatch.setattr(writer_module, "STANDBY_WAIT_S", 0.2)
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    for _ in range(100):  # bounded: the fixture's process leads first, so the one started below is a standby
        if ledger.parts.writer.is_active:
            break
        await asyncio.sleep(0.05)
    assert ledger.parts.writer.is_active
    body = transfer_body("via-standby", (str(card), -100), (str(settlement), 100))
    standby_service, standby = build(ledger.settings)
    async with (
        standby_service.running(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=standby_service.http_app()),
            base_url="http://standby/ledger/v1",
            headers=ledger_poster(ledger.settings.data_dir),
        ) as other,
    ):
        assert not standby.writer.is_active
        refused = await other.post("/transfers", json=body)
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "ledger_unavailable" and refused.headers["retry-after"] == "5"
    assert await saved_balance(ledger.parts.pool, card) == (1_000, 0)
    posted = await ledger.post("/transfers", json=body)  # the retry, at the leader: posted now, once
    assert posted.status_code == 201 and posted.json()["replayed"] is False


async def test_an_upgrade_fills_in_what_live_holds_will_pay_in_net_of_captures_and_summed_over_holds(ledger):
    # A database made before balances kept what live holds will pay in: the column is filled
    # in from the holds' events. A hold partly captured pays in only what it still reserves,
    # a voided one nothing, and every live hold paying the same account counts.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    shop = uuid.uuid4()
    await writer.submit(c.OpenAccount(shop, "shop", "card", "RUB"))
    expires_at = datetime.now(UTC) + timedelta(days=1)
    for hold_id, amount_minor in (("partly-captured", 400), ("live", 250), ("voided", 50)):
        await writer.submit(c.PlaceHold(hold_id, card, shop, amount_minor, "RUB", expires_at, "card_purchase"))
    await writer.submit(c.CaptureHold("partly-captured", "c1", 100))
    await writer.submit(c.VoidHold("voided"))
    await as_an_older_ledger_left_it(ledger.parts.pool, "ALTER TABLE ledger_balances DROP COLUMN incoming_held_minor")
    await ensure_store_schema(ledger.parts.pool, ledger.parts.app)
    await writer.start()  # the process restarts: nothing cached

    incoming = await ledger.parts.pool.fetchval("SELECT incoming_held_minor FROM ledger_balances WHERE account_id = $1", shop)
    assert incoming == 300 + 250
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}


async def test_a_credit_limit_key_sent_again_for_another_account_is_refused_not_answered_with_the_first(ledger):
    # Lending reuses a key by mistake: the second account's limit must not be "set" by a
    # replay of the first account's answer, which would leave it unchanged.
    first, second = await open_account(ledger, owner="alice"), await open_account(ledger, owner="bob")
    key = {"Idempotency-Key": "limit-1"}
    granted = await ledger.put(f"/accounts/{first}/credit-limit", json={"credit_limit_minor": 500}, headers=key)
    assert granted.status_code == 200 and granted.json()["account_id"] == first, granted.text
    again = await ledger.put(f"/accounts/{second}/credit-limit", json={"credit_limit_minor": 500}, headers=key)
    assert again.status_code == 422 and again.json()["code"] == "idempotency_key_reused", again.text
    assert (await ledger.get(f"/accounts/{second}")).json()["credit_limit_minor"] == 0


async def test_a_query_of_many_made_up_parameters_is_refused_in_a_few_named_errors(ledger):
    # Each made-up name is refused by name, but the answer stays a few lines, whatever the query's size.
    card = await open_account(ledger)
    made_up = {f"filter_{number}": "1" for number in range(200)}
    response = await ledger.get(f"/accounts/{card}/history", params=made_up)
    assert response.status_code == 422 and response.headers["content-type"].startswith("application/problem+json")
    errors = response.json()["errors"]
    assert 1 <= len(errors) <= 10 and {error["field"] for error in errors} <= set(made_up), errors


async def test_an_account_opened_with_its_own_id_is_opened_under_that_id(ledger):
    # A service that names the account it opens (its own record's id) finds it under that id,
    # not under one derived from the Idempotency-Key.
    chosen = uuid.uuid4()
    opened = await ledger.post(
        "/accounts",
        json={"account_id": str(chosen), "owner_id": "alice", "kind": "card", "currency": "RUB"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert opened.status_code == 201 and opened.json()["account_id"] == str(chosen), opened.text
    found = await ledger.get(f"/accounts/{chosen}")
    assert found.status_code == 200 and found.json()["owner_id"] == "alice", found.text


async def test_each_event_of_a_batch_carries_the_trace_of_the_request_that_made_it(ledger):
    # One trace runs from a request, through ledger.events.v1, into its consumers. In one
    # batch, a freeze and then a payment the freeze refuses: the freeze's event is the
    # freeze request's, not the payment's that came after it and read the card.
    install_tracing("tests", exporter=InMemorySpanExporter())
    tracer = trace.get_tracer("tests")
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    before = ledger.parts.writer.last_position
    async with uncached_writer(ledger.settings, running=False) as writer:
        with tracer.start_as_current_span("POST /accounts/freeze") as freezing:
            freeze = asyncio.create_task(writer.submit(c.FreezeAccount(card, "fraud_suspected")))
        with tracer.start_as_current_span("POST /transfers") as paying:
            pay = asyncio.create_task(writer.submit(spend(card, settlement, 100, "after-the-freeze")))
        for _ in range(100):  # bounded: both only have to reach the queue, to be taken as one batch
            if writer.queue.qsize() == 2:
                break
            await asyncio.sleep(0.01)
        assert writer.queue.qsize() == 2
        writer.tasks.append(asyncio.create_task(writer.run()))
        frozen, refused = await asyncio.gather(freeze, pay, return_exceptions=True)
        assert frozen.state == "frozen" and isinstance(refused, AccountFrozen), (frozen, refused)
        async with ledger.parts.pool.acquire() as connection:
            stored = await notifications_after(connection, events_table(writer.app.recorder), before, 100)
        traces = {}
        for notification in stored:
            event, carrier = writer.app.mapper.to_domain_event_with_trace(notification)
            traces[type(event).__qualname__] = carrier.get("traceparent", "").split("-")[1:2]
    assert traces["Account.Frozen"] == [format(freezing.get_span_context().trace_id, "032x")], traces
    assert [trace_id for kind, trace_id in traces.items() if kind != "Account.Frozen"] == [
        [format(paying.get_span_context().trace_id, "032x")]
    ], traces
