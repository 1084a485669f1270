"""Reads answered by a ledger process that is not the active writer, on real PostgreSQL.

A standby is out of load balancing (not ready), but requests still reach one: a process
that has just lost the lead stays in rotation until its readiness is next probed, and a
caller may address a process directly."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from ledger.service import build
from services.ledger.tests.integration.ledger_support import open_account, transfer_body
from tests.support.tokens import ledger_poster

pytestmark = pytest.mark.integration


async def until_true(predicate, what: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


async def test_a_payment_the_leader_confirmed_is_in_every_read_a_standby_answers_after_the_confirmation(
        ledger, monkeypatch):
    # The customer's app is told "paid" by the active ledger process; her next request
    # reaches one that is not (one that led a moment ago, still in rotation until its next
    # readiness probe; here a standby). Its writer committed nothing since, so waiting for
    # "its" last write waited for nothing, and history, statement and past balance answered
    # from a read model a moment behind, without the payment her balance (saved with the
    # events) already showed.
    await until_true(lambda: ledger.parts.writer.is_active, "the fixture's ledger to lead")
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    start = datetime.now(UTC) - timedelta(seconds=1)
    standby_service, standby = build(ledger.settings)
    async with (
        standby_service.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=standby_service.http_app()),
                          base_url="http://standby/ledger/v1", headers=ledger_poster(ledger.settings.data_dir)) as reader,
    ):
        await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
        await standby.projection.wait_for(ledger.parts.writer.last_position)
        assert not standby.writer.is_active
        caught_up = asyncio.Event()
        for parts in (ledger.parts, standby):  # both processes' read models fall behind here
            apply_page = parts.projection.apply_page

            async def slow_apply_page(connection, page, apply_page=apply_page):
                await caught_up.wait()
                await apply_page(connection, page)

            monkeypatch.setattr(parts.projection, "apply_page", slow_apply_page)
        paid = await ledger.post("/transfers", json=transfer_body("paid", (settlement, -100), (card, 100)))
        assert paid.status_code == 201, paid.text
        confirmed = datetime.now(UTC)
        asyncio.get_running_loop().call_later(0.3, caught_up.set)

        now, balance, history, statement = await asyncio.gather(
            reader.get(f"/accounts/{card}/balance"),
            reader.get(f"/accounts/{card}/balance", params={"at": confirmed.isoformat()}),
            reader.get(f"/accounts/{card}/history"),
            reader.get(f"/accounts/{card}/statement", params={"since": start.isoformat(), "until": confirmed.isoformat()}))
    assert now.json()["posted"]["amount_minor"] == 100, now.text
    assert balance.json()["posted"]["amount_minor"] == 100, balance.text
    assert [line["transfer_id"] for line in history.json()["lines"]] == ["paid"], history.text
    assert statement.json()["closing_balance_minor"] == 100, statement.text
