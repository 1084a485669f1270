"""What the ledger shows operators as metrics (OpenTelemetry, sent by OTLP): every answer
counted by its outcome, refusals by their code; each batch's size and time; the commands
waiting; and the position of the last commit, which the relay and the history projection
reach once they have published and applied everything."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ledger import writer as writer_module
from ledger.domain import commands as c
from ledger.integration import SOURCE
from ledger.projections import READ_MODEL_PROJECTION
from ledger.writer import BatchedWriter, LedgerBusy, LedgerUnavailable
from services.ledger.tests.integration.ledger_support import open_account, queued, transfer_body, uncached_writer
from tests.support.metrics import Measured

pytestmark = pytest.mark.integration

COMMANDS = "kabinet.ledger.commands"
POSITION_REACHED_WAIT_S = 10.0


def answered(before: Measured, after: Measured, **attributes: str) -> int:
    return after.value(COMMANDS, **attributes) - before.value(COMMANDS, **attributes)


async def test_every_answer_of_the_ledger_is_counted_by_its_outcome_and_a_refusal_by_its_code(ledger, measured):
    before = measured()
    settlement = await open_account(ledger, kind="settlement")
    card = await open_account(ledger)
    assert (await ledger.post("/transfers", json=transfer_body("top-up", (settlement, -1_000), (card, 1_000)))).status_code == 201
    overspent = await ledger.post("/transfers", json=transfer_body("too-dear", (card, -5_000), (settlement, 5_000)))
    assert overspent.status_code == 409
    frozen = await ledger.post(f"/accounts/{card}/freeze", json={"reason": "customer_request"},
                               headers={"Idempotency-Key": str(uuid.uuid4())})
    assert frozen.status_code == 200, frozen.text
    assert (await ledger.post("/transfers", json=transfer_body("after-freeze", (card, -10), (settlement, 10)))).status_code == 409
    after = measured()

    assert answered(before, after, outcome="done") == 4  # two openings, the top-up, the freeze
    assert answered(before, after, outcome="refused", code="insufficient_funds") == 1
    assert answered(before, after, outcome="refused", code="account_frozen") == 1
    batches_before = before.histogram("kabinet.ledger.batch.commands")
    batches_after = after.histogram("kabinet.ledger.batch.commands")
    assert batches_after.count - (batches_before.count if batches_before else 0) == 6  # one at a time: one a batch
    durations_before = before.histogram("kabinet.ledger.batch.duration")
    durations_after = after.histogram("kabinet.ledger.batch.duration")
    assert durations_after.count - (durations_before.count if durations_before else 0) == 6
    assert 0 < durations_after.max < writer_module.ANSWER_WAIT_MAX_S  # seconds, not milliseconds


async def test_commands_waiting_and_the_size_of_the_batch_they_make_are_measured(ledger):
    settlement = uuid.UUID(await open_account(ledger, kind="settlement"))
    cards = [uuid.UUID(await open_account(ledger)) for _ in range(5)]
    async with uncached_writer(ledger.settings, running=False) as writer:
        waiting = await queued(writer, [c.PostTransfer(f"pay-{i}", (c.Leg(settlement, -10, "RUB"), c.Leg(card, 10, "RUB")),
                                                       "p2p") for i, card in enumerate(cards)])
        before = Measured()
        writer.tasks.append(asyncio.create_task(writer.run()))
        await asyncio.gather(*waiting)
        after = Measured()
    assert after.value("kabinet.ledger.queue.commands") == 5
    batches_before = before.histogram("kabinet.ledger.batch.commands")
    batches_after = after.histogram("kabinet.ledger.batch.commands")
    assert (batches_after.count - batches_before.count, batches_after.sum - batches_before.sum) == (1, 5)
    assert batches_after.max >= 5


async def test_a_full_queue_a_process_that_does_not_lead_and_a_clock_far_ahead_count_once_each_as_the_503s_they_answer(
        ledger, measured, monkeypatch):
    settlement = uuid.UUID(await open_account(ledger, kind="settlement"))
    card = uuid.UUID(await open_account(ledger))

    def pay(transfer_id):
        return c.PostTransfer(transfer_id, (c.Leg(settlement, -10, "RUB"), c.Leg(card, 10, "RUB")), "p2p")

    monkeypatch.setattr(writer_module, "QUEUE_MAX", 1)
    monkeypatch.setattr(writer_module, "STANDBY_WAIT_S", 0.05)
    before = measured()
    async with uncached_writer(ledger.settings, running=False) as writer:
        waiting = await queued(writer, [pay("first")])
        with pytest.raises(LedgerBusy):
            await writer.submit(pay("second"))
        waiting[0].cancel()
    not_leading = BatchedWriter(ledger.parts.writer.app, ledger.parts.pool, ledger.parts.writer.clock)
    with pytest.raises(LedgerUnavailable, match="not the active writer"):
        await not_leading.submit(pay("third"))
    # Refused by the batch, not at the door: counted once, by the batch.
    ahead = BatchedWriter(ledger.parts.writer.app, ledger.parts.pool, lambda: datetime.now(UTC) + timedelta(minutes=5))
    await ahead.start()
    running = asyncio.create_task(ahead.run())
    try:
        with pytest.raises(LedgerUnavailable, match="clock"):
            await ahead.submit(pay("fourth"))
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    after = measured()
    assert answered(before, after, outcome="queue_full") == 1
    assert answered(before, after, outcome="unavailable") == 2


async def test_the_relay_and_the_history_projection_show_the_position_of_the_last_commit_once_they_reach_it(
        ledger, measured):
    settlement = await open_account(ledger, kind="settlement")
    card = await open_account(ledger)
    assert (await ledger.post("/transfers", json=transfer_body("top-up", (settlement, -1_000), (card, 1_000)))).status_code == 201
    committed = ledger.parts.writer.last_position
    assert measured().value("kabinet.ledger.position") == committed
    deadline = asyncio.get_running_loop().time() + POSITION_REACHED_WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        now = measured()
        relayed = now.value("kabinet.outbox.relay.position", source=SOURCE)
        projected = now.value("kabinet.projection.position", projection=READ_MODEL_PROJECTION)
        if relayed == projected == committed:
            break
        await asyncio.sleep(0.05)
    assert (relayed, projected) == (committed, committed)


async def test_each_request_is_measured_by_its_route_not_by_the_ids_in_its_path(ledger, measured):
    # One series per route: a series per account would swamp the operators' metrics store.
    account = await open_account(ledger, kind="settlement")
    assert (await ledger.get(f"/accounts/{account}")).status_code == 200
    routes = {dict(point.attributes).get("http.target") for point in measured().points["http.server.duration"]}
    assert "/ledger/v1/accounts/{account_id}" in routes
    assert not [route for route in routes if route and account in route]
