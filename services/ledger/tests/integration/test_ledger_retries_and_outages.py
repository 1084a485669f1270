"""Rules of the ledger on real PostgreSQL: a retry is answered with its first result (or its
first refusal) even by a writer that has never seen it (after a restart), and a database
outage is a 503, never a 500."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from kabinet_chassis.devstack.ports import free_port
from ledger import writer as writer_module
from ledger.domain import commands as c
from ledger.domain.errors import HoldNotActive, InsufficientFunds
from ledger.service import build
from ledger.verify import verify
from ledger.writer import LedgerUnavailable
from services.ledger.tests.integration.ledger_support import funded_card, saved_balance, uncached_writer
from tests.support.tokens import ledger_poster

pytestmark = pytest.mark.integration


async def test_a_retried_transfer_that_emptied_the_account_gets_its_first_result_after_a_restart(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    everything = c.PostTransfer("spend-all", (c.Leg(card, -1_000, "RUB"), c.Leg(settlement, 1_000, "RUB")), "card_purchase")
    await ledger.parts.writer.submit(everything)
    async with uncached_writer(ledger.settings) as fresh:
        again = await fresh.submit(everything)  # not "insufficient funds": it was posted
    assert again.replayed and again.transfer_id == "spend-all"
    assert await saved_balance(ledger.parts.pool, card) == (0, 0)


async def test_a_refused_transfer_retried_after_a_restart_and_a_top_up_is_refused_again_not_posted(ledger):
    # The restarted writer takes the id for new and would post it (funds arrived since):
    # the refusal kept under that id fails the save, and the retry gets the first answer.
    settlement, card = await funded_card(ledger.parts.writer, 100)
    pay = c.PostTransfer("pay-big", (c.Leg(card, -500, "RUB"), c.Leg(settlement, 500, "RUB")), "card_purchase")
    with pytest.raises(InsufficientFunds) as first:
        await ledger.parts.writer.submit(pay)
    await ledger.parts.writer.submit(
        c.PostTransfer("salary", (c.Leg(settlement, -1_000, "RUB"), c.Leg(card, 1_000, "RUB")), "top_up"))
    async with uncached_writer(ledger.settings) as fresh:
        with pytest.raises(InsufficientFunds) as again:
            await fresh.submit(pay)
    assert str(again.value) == str(first.value)
    assert await saved_balance(ledger.parts.pool, card) == (1_100, 0)


async def test_a_reversal_asked_again_after_a_restart_and_a_spend_answers_as_made_not_refused(ledger):
    # A reversal's refusal is not kept, so the restarted writer must look its id up rather
    # than take it for new: judged afresh, it would be refused for the money spent since.
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.writer.submit(c.ReverseTransfer(f"fund-{card}", "posted_in_error"))
    await ledger.parts.writer.submit(
        c.PostTransfer("salary", (c.Leg(settlement, -300, "RUB"), c.Leg(card, 300, "RUB")), "top_up"))
    await ledger.parts.writer.submit(
        c.PostTransfer("spend", (c.Leg(card, -300, "RUB"), c.Leg(settlement, 300, "RUB")), "card_purchase"))
    async with uncached_writer(ledger.settings) as fresh:
        again = await fresh.submit(c.ReverseTransfer(f"fund-{card}", "posted_in_error"))
    assert again.replayed and again.transfer_id == f"fund-{card}:reversal"
    assert await saved_balance(ledger.parts.pool, card) == (0, 0)


async def test_a_retried_hold_that_reserved_everything_gets_its_first_result_after_a_restart(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    hold = c.PlaceHold("auth-1", card, settlement, 1_000, "RUB", expires_at, "card_authorisation")
    await ledger.parts.writer.submit(hold)
    async with uncached_writer(ledger.settings) as fresh:
        again = await fresh.submit(hold)
    assert again.replayed and (again.state, again.remaining_minor) == ("active", 1_000)
    assert await saved_balance(ledger.parts.pool, card) == (1_000, 1_000)


async def test_a_retried_hold_that_has_since_expired_gets_its_first_answer_after_a_restart(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    hold = c.PlaceHold("auth-2", card, settlement, 400, "RUB", datetime.now(UTC) + timedelta(seconds=0.5),
                       "card_authorisation")
    await ledger.parts.writer.submit(hold)
    await asyncio.sleep(0.6)
    async with uncached_writer(ledger.settings) as fresh:
        await fresh.submit(c.ExpireHold("auth-2"))
    async with uncached_writer(ledger.settings) as fresh:
        again = await fresh.submit(hold)  # not "would expire at a time that has passed"
    assert again.replayed and (again.state, again.remaining_minor) == ("active", 400), "as it was placed"
    assert await saved_balance(ledger.parts.pool, card) == (1_000, 0)


async def test_a_retry_refused_as_new_does_not_hide_its_hold_from_a_void_in_the_same_batch(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    hold = c.PlaceHold("auth-3", card, settlement, 1_000, "RUB", datetime.now(UTC) + timedelta(hours=1),
                       "card_authorisation")
    await ledger.parts.writer.submit(hold)
    async with uncached_writer(ledger.settings, running=False) as fresh:
        retry = asyncio.create_task(fresh.submit(hold))
        void = asyncio.create_task(fresh.submit(c.VoidHold("auth-3")))
        await asyncio.sleep(0.05)  # both wait in the queue: one batch
        assert fresh.queue.qsize() == 2
        fresh.tasks.append(asyncio.create_task(fresh.run()))
        outcomes = await asyncio.gather(void, retry, return_exceptions=True)
    # The retry comes first in the batch: it answers the hold as it stood then, still active.
    assert [(o.state, o.replayed) for o in outcomes] == [("voided", False), ("active", True)]
    assert await saved_balance(ledger.parts.pool, card) == (1_000, 0)


async def test_a_write_while_the_database_drops_its_connections_answers_503_and_its_retry_posts_once(ledger):
    # The accounts are opened by another writer, so the service's writer must load them.
    async with uncached_writer(ledger.settings) as other:
        settlement, card = await funded_card(other, 1_000)
    body = {"transfer_id": "during-restart", "code": "card_purchase", "legs": [
        {"account_id": str(card), "amount_minor": -100, "currency": "RUB"},
        {"account_id": str(settlement), "amount_minor": 100, "currency": "RUB"}]}
    await drop_every_connection(ledger.settings.service_database_url)
    response = await ledger.post("/transfers", json=body)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json") and "retry-after" in response.headers
    for _ in range(50):  # the client retries, as Retry-After tells it to
        response = await ledger.post("/transfers", json=body)
        if response.status_code != 503:
            break
        await asyncio.sleep(0.1)
    assert response.status_code == 201, response.text
    again = await ledger.post("/transfers", json=body)
    assert again.status_code == 201 and again.json()["replayed"]
    assert await saved_balance(ledger.parts.pool, card) == (900, 0)


async def test_a_read_while_the_database_drops_its_connections_is_answered_or_told_to_retry(ledger):
    async with uncached_writer(ledger.settings) as other:
        settlement, card = await funded_card(other, 1_000)
    await ledger.parts.projection.wait_for(other.last_position)
    assert (await ledger.get(f"/accounts/{card}/balance")).status_code == 200  # the pool holds live connections
    await drop_every_connection(ledger.settings.service_database_url)
    for _ in range(50):  # a 503 tells the client to retry; never a 500
        response = await ledger.get(f"/accounts/{card}/balance")
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            break
        assert "retry-after" in response.headers
        await asyncio.sleep(0.1)
    assert response.status_code == 200 and response.json()["posted"]["amount_minor"] == 1_000


async def drop_every_connection(database_url: str) -> None:
    """As a database restart or failover does to every open connection."""
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()


async def failed_checks(ledger) -> dict[str, str]:
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    report = await verify(ledger.parts.app, ledger.settings)
    return {check.name: check.detail for check in report.checks if not check.ok}


async def test_refusals_repeat_alike_after_a_restart_and_the_ledger_still_verifies(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 100)
    shop = uuid.uuid4()
    await writer.submit(c.OpenAccount(shop, "shop", "card", "RUB"))
    pay = c.PostTransfer("pay", (c.Leg(card, -150, "RUB"), c.Leg(settlement, 150, "RUB")), "p2p")
    with pytest.raises(InsufficientFunds) as first:
        await writer.submit(pay)
    hold = c.PlaceHold("h", card, shop, 80, "RUB", datetime.now(UTC) + timedelta(seconds=2), "purchase")
    await writer.submit(hold)
    await writer.submit(c.CaptureHold("h", "c1", 30))
    await writer.submit(c.VoidHold("h"))
    with pytest.raises(HoldNotActive) as capture_refused:
        await writer.submit(c.CaptureHold("h", "c2", 10))
    await writer.submit(c.PostTransfer("top", (c.Leg(settlement, -1_000, "RUB"), c.Leg(card, 1_000, "RUB")), "top_up"))
    async with uncached_writer(ledger.settings) as other:  # after a restart: nothing cached, ids assumed new

        with pytest.raises(InsufficientFunds) as again:
            await other.submit(pay)
        with pytest.raises(HoldNotActive) as capture_again:
            await other.submit(c.CaptureHold("h", "c2", 10))
        await ledger.parts.projection.wait_for(other.last_position)
    assert str(again.value) == str(first.value)
    assert str(capture_again.value) == str(capture_refused.value)
    assert await failed_checks(ledger) == {}


async def test_a_command_the_writer_cannot_answer_in_time_gets_503_and_its_retry_the_first_answer(ledger, monkeypatch):
    # A writer slow to answer (each look-up is bounded, but a batch may make several) must not
    # hold its callers for ever; the command may still commit, so the retry uses the same id.
    monkeypatch.setattr(writer_module, "ANSWER_WAIT_MAX_S", 0.2)
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    pay = c.PostTransfer("pay-late", (c.Leg(card, -100, "RUB"), c.Leg(settlement, 100, "RUB")), "card_purchase")
    async with uncached_writer(ledger.settings, running=False) as stuck:  # takes commands, answers none yet
        with pytest.raises(LedgerUnavailable, match="did not answer within"):
            await stuck.submit(pay)
        stuck.tasks.append(asyncio.create_task(stuck.run()))  # it gets going again: the queued command posts
        again = await stuck.submit(pay)
    assert again.replayed and await saved_balance(ledger.parts.pool, card) == (900, 0)


def a_commits_answer_is_lost_once(monkeypatch) -> None:
    """The next batch commits, then its connection drops before the answer reaches the writer
    (a failover, a network cut after COMMIT)."""
    append_batch = writer_module.append_batch
    lost = []

    async def committed_then_dropped(connection, *args, **kwargs):
        notification_ids = await append_batch(connection, *args, **kwargs)  # one statement: committed
        if not lost:
            lost.append(True)
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return notification_ids

    monkeypatch.setattr(writer_module, "append_batch", committed_then_dropped)


async def test_after_a_commit_whose_answer_was_lost_the_retry_waits_for_the_read_model_to_show_it(ledger, monkeypatch):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    a_commits_answer_is_lost_once(monkeypatch)
    pay = c.PostTransfer("answer-lost", (c.Leg(card, -100, "RUB"), c.Leg(settlement, 100, "RUB")), "card_purchase")
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await writer.submit(pay)
    assert (await writer.submit(pay)).replayed, "the first attempt was posted"
    assert writer.last_position == await writer.log_head(), "read-your-writes must cover the lost answer's commit"


@pytest.mark.parametrize(("action", "state"), [("freeze", "frozen"), ("open", "open")])
async def test_an_account_action_retried_after_its_commits_answer_was_lost_answers_the_account_as_it_now_is(
        ledger, monkeypatch, action, state):
    # Answered from a read model without the first attempt's commit, staff were told the
    # account they froze for fraud was open, or given an opening of null; and the key kept that answer.
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position, 10)
    a_commits_answer_is_lost_once(monkeypatch)
    path, body = {"freeze": (f"/accounts/{card}/freeze", {"reason": "fraud_suspected"}),
                  "open": ("/accounts", {"owner_id": "carol", "kind": "card", "currency": "RUB"})}[action]
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = await ledger.post(path, json=body, headers=key)
    assert first.status_code == 503, first.text
    retry = await ledger.post(path, json=body, headers=key)
    assert retry.status_code in (200, 201) and retry.json()["state"] == state, retry.text
    kept = await ledger.post(path, json=body, headers=key)
    assert kept.json() == retry.json(), "the key keeps the true answer"


async def test_a_ledger_started_while_the_broker_is_down_posts_and_its_events_wait_in_the_outbox(stack, unique_name):
    # Restarted during a Kafka outage (a crash, a deploy), the ledger must still take payments:
    # its events wait in the outbox for the relay, as they do when the broker goes down later.
    nothing_listens = f"127.0.0.1:{free_port()}"
    settings = stack.service_settings(f"ledger_{unique_name}", kafka_bootstrap_servers=nothing_listens)
    service, parts = build(settings)
    async with service.running():
        app = service.http_app()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ledger",
                                     headers=ledger_poster(settings.data_dir)) as client:
            opened = await client.post("/ledger/v1/accounts", json={"owner_id": "alice", "kind": "card", "currency": "RUB"},
                                       headers={"Idempotency-Key": str(uuid.uuid4())})
            ready = await client.get("/health/ready")
    assert opened.status_code == 201, opened.text
    assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    assert ready.json()["watched"]["broker"]["status"] != "up"
