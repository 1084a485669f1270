"""Holds expire by the ledger's own time, the one its batches post at: never earlier than
the last batch committed, even when this process's clock is behind it (a node whose clock
was ahead wrote last, or the clock stepped back)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ledger.domain import commands as c
from ledger.domain.errors import HoldNotActive
from ledger.service import build
from services.ledger.tests.integration.ledger_support import funded_card, saved_balance

pytestmark = pytest.mark.integration


class MovableClock:
    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.ahead


@pytest.fixture
async def ledger_on_a_movable_clock(stack, unique_name):
    settings = stack.service_settings(f"ledger_{unique_name}")
    clock = MovableClock()
    service, parts = build(settings, clock=clock)
    async with service.running():
        yield parts, clock


async def test_a_hold_the_ledger_no_longer_lets_be_captured_releases_its_money_though_the_clock_is_behind(
        ledger_on_a_movable_clock):
    parts, clock = ledger_on_a_movable_clock
    writer = parts.writer
    clock.ahead = timedelta(seconds=40)  # within what the database accepts (60 s)
    settlement, card = await funded_card(writer, 1_000)
    deadline = datetime.now(UTC) + timedelta(seconds=45)
    await writer.submit(c.PlaceHold("auth-1", card, settlement, 400, "RUB", deadline, "card_purchase"))
    clock.ahead = timedelta(seconds=50)
    await writer.submit(c.OpenAccount(uuid.uuid4(), "bob", "card", "RUB"))  # the ledger's time is now past the deadline
    clock.ahead = timedelta(0)  # the clock is put right (or another node, on time, takes over)

    with pytest.raises(HoldNotActive, match="expired"):  # the shop may no longer take the money...
        await writer.submit(c.CaptureHold("auth-1", "clearing-1", 400))
    for _ in range(100):  # ...so the customer must get it back (the sweep runs every second)
        if await saved_balance(parts.pool, card) == (1_000, 0):
            break
        await asyncio.sleep(0.1)
    assert await saved_balance(parts.pool, card) == (1_000, 0)
