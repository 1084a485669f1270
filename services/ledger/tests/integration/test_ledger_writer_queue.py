"""The writer's queue: full, a caller is told at once to come back later (503 with
Retry-After), never left waiting; a caller that gives up does not lose its command nor
have it posted twice."""

from __future__ import annotations

import asyncio
import time

import pytest

from ledger.domain import commands as c
from ledger.writer import _Request
from services.ledger.tests.integration.ledger_support import funded_card, saved_balance, transfer_body, uncached_writer

pytestmark = pytest.mark.integration


async def test_a_full_queue_answers_503_with_retry_after_at_once(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    writer = ledger.parts.writer
    taken = writer.queue
    full = asyncio.Queue(maxsize=1)
    full.put_nowait(_Request(c.FreezeAccount(card, "customer_request"), asyncio.get_running_loop().create_future()))
    writer.queue = full  # the running writer still waits on `taken`: nothing drains this one
    try:
        started = time.monotonic()
        response = await ledger.post("/transfers", json=transfer_body("busy-1", (str(card), -10), (str(settlement), 10)))
        waited_s = time.monotonic() - started
    finally:
        writer.queue = taken
    assert response.status_code == 503 and response.json()["code"] == "ledger_busy", response.text
    assert response.headers["retry-after"] and waited_s < 1.0
    again = await ledger.post("/transfers", json=transfer_body("busy-1", (str(card), -10), (str(settlement), 10)))
    assert again.status_code == 201 and not again.json()["replayed"]  # nothing was posted the first time
    assert await saved_balance(ledger.parts.pool, card) == (990, 0)


async def test_a_caller_that_gives_up_has_its_command_posted_once_and_its_retry_answered_with_it(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    pay = c.PostTransfer("given-up", (c.Leg(card, -300, "RUB"), c.Leg(settlement, 300, "RUB")), "card_purchase")
    async with uncached_writer(ledger.settings, running=False) as writer:
        caller = asyncio.create_task(writer.submit(pay))
        for _ in range(100):  # bounded: the command only has to reach the queue
            if writer.queue.qsize() == 1:
                break
            await asyncio.sleep(0.01)
        caller.cancel()  # the client hung up while its command waited
        await asyncio.gather(caller, return_exceptions=True)
        retry = asyncio.create_task(writer.submit(pay))
        writer.tasks.append(asyncio.create_task(writer.run()))
        answered = await retry
    assert answered.transfer_id == "given-up" and answered.replayed  # the first was posted, the retry told so
    assert await saved_balance(ledger.parts.pool, card) == (700, 0)

