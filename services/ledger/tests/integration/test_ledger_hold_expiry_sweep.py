"""The hold expiry sweep: holds are released at their deadline by the ledger itself, many
at once when many fall due together, and a writer too busy to take them delays them with one
warning, not a traceback a second."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest

from ledger import service as ledger_service
from ledger.domain import commands as c
from ledger.writer import _Request
from services.ledger.tests.integration.ledger_support import funded_card, saved_balance

pytestmark = pytest.mark.integration


async def test_holds_falling_due_together_are_expired_page_after_page_in_one_sweep(stack, unique_name, monkeypatch):
    monkeypatch.setattr(ledger_service, "EXPIRY_SWEEP_INTERVAL_S", 3600)  # no sweep but the test's own
    monkeypatch.setattr(ledger_service, "EXPIRY_SWEEP_BATCH_MAX", 2)  # five holds are three pages
    service, parts = ledger_service.build(stack.service_settings(f"ledger_{unique_name}"))
    async with service.running():
        settlement, card = await funded_card(parts.writer, 1_000)
        due_s = 0.5
        for number in range(5):
            await parts.writer.submit(c.PlaceHold(f"together-{number}", card, settlement, 100, "RUB",
                                                  parts.writer.ledger_time() + timedelta(seconds=due_s), "card_purchase"))
        await parts.projection.wait_for(parts.writer.last_position)
        await asyncio.sleep(due_s + 0.1)
        await ledger_service.sweep_due_holds(parts)
        assert await saved_balance(parts.pool, card) == (1_000, 0)  # all five released, not the first page only
        await parts.projection.wait_for(parts.writer.last_position)
        states = await parts.pool.fetch("SELECT DISTINCT state FROM ledger_holds")
        assert [row["state"] for row in states] == ["expired"]


async def test_holds_due_while_the_queue_is_full_wait_quietly_and_expire_once_it_drains(ledger, caplog):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    writer = ledger.parts.writer
    due_s = 1.0
    await writer.submit(c.PlaceHold("due-while-busy", card, settlement, 300, "RUB",
                                    writer.ledger_time() + timedelta(seconds=due_s), "card_purchase"))
    taken = writer.queue
    full = asyncio.Queue(maxsize=1)
    full.put_nowait(_Request(c.FreezeAccount(card, "customer_request"), asyncio.get_running_loop().create_future()))
    with caplog.at_level(logging.INFO, logger="ledger.service"):
        writer.queue = full  # the running writer still waits on `taken`: nothing drains this one
        try:
            await asyncio.sleep(due_s + 3.5)  # three sweeps or more find the hold due and the queue full
        finally:
            writer.queue = taken
        for _ in range(50):  # bounded: the next sweep expires it
            if await saved_balance(ledger.parts.pool, card) == (1_000, 0):
                break
            await asyncio.sleep(0.1)
    assert await saved_balance(ledger.parts.pool, card) == (1_000, 0)  # the money held is free again
    said = [record for record in caplog.records if record.name == "ledger.service"]
    waits = [record for record in said if "waits for the writer" in record.getMessage()]
    assert len(waits) == 1 and waits[0].levelno == logging.WARNING and waits[0].exc_info is None, said
    assert not [record for record in said if record.levelno >= logging.ERROR], said
    assert any("goes on" in record.getMessage() for record in said), said
