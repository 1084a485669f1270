"""What the ledger's integration tests share: opening accounts and posting through the
HTTP API, a funded card, a second writer with nothing cached, saved balances, and a
forger's hand on the event history."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager

import asyncpg

from kabinet_chassis import append_only
from kabinet_chassis.eventstore import event_store_env, events_table
from ledger.application import LedgerApplication
from ledger.clock import system_clock
from ledger.domain import commands as c
from ledger.writer import BatchedWriter


async def open_account(client, kind="card", owner="alice", currency="RUB", limit=0) -> str:
    response = await client.post("/accounts", json={"owner_id": "bank" if kind in ("settlement", "fee_income") else owner,
                                                    "kind": kind, "currency": currency, "credit_limit_minor": limit},
                                 headers={"Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 201, response.text
    return response.json()["account_id"]


def transfer_body(transfer_id, *legs, code="p2p"):
    return {"transfer_id": transfer_id, "code": code,
            "legs": [{"account_id": a, "amount_minor": amount, "currency": "RUB"} for a, amount in legs]}


@asynccontextmanager
async def uncached_writer(settings, *, running: bool = True):
    """Another writer on the same database with nothing cached: another ledger process
    that believes it is the active one (as for the seconds before a lost lead is noticed),
    or this one's after a restart. With `running` False, commands wait in its queue until
    `writer.tasks` gets a `run()` (to make one batch of them)."""
    app = LedgerApplication(env=event_store_env(settings))
    pool = await asyncpg.create_pool(settings.service_database_url, min_size=1, max_size=2)
    writer = BatchedWriter(app, pool, system_clock)
    await writer.start()
    writer.tasks = [asyncio.create_task(writer.run())] if running else []
    try:
        yield writer
    finally:
        for task in writer.tasks:
            task.cancel()
        await asyncio.gather(*writer.tasks, return_exceptions=True)
        await pool.close()
        app.close()


async def funded_card(writer, amount_minor: int) -> tuple[uuid.UUID, uuid.UUID]:
    """A settlement account and Alice's card holding `amount_minor` from it."""
    settlement, card = uuid.uuid4(), uuid.uuid4()
    await writer.submit(c.OpenAccount(settlement, "bank", "settlement", "RUB"))
    await writer.submit(c.OpenAccount(card, "alice", "card", "RUB"))
    await writer.submit(c.PostTransfer(f"fund-{card}", (c.Leg(settlement, -amount_minor, "RUB"),
                                                        c.Leg(card, amount_minor, "RUB")), "top_up"))
    return settlement, card


async def saved_balance(pool, account_id) -> tuple[int, int]:
    """The account's (posted, held) minor units, read straight from the store."""
    row = await pool.fetchrow("SELECT posted_minor, held_minor FROM ledger_balances WHERE account_id = $1", account_id)
    return row["posted_minor"], row["held_minor"]


async def forge_history(ledger, statement: str, *args) -> None:
    """Change the event history as only the events table's owner can: switch its append-only
    guard off, change it, and switch the guard back on, covering the tracks. What verify must
    find then is in the events themselves. `statement` names the table `{table}`."""
    table = events_table(ledger.parts.app.recorder)
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {table} DISABLE TRIGGER {guard}")
        await connection.execute(statement.format(table=table), *args)
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {guard}")
