"""What the ledger's integration tests share: opening accounts and posting through the
HTTP API, a funded card, a second writer with nothing cached, saved balances, and a
forger's hand on the event history and on what is derived from it."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager

import anyio
import asyncpg
import typer
from typer.testing import CliRunner

from kabinet_chassis import append_only, history_seals
from kabinet_chassis.eventstore import event_store_env, events_table
from kabinet_chassis.settings import ServiceSettings
from ledger import cli
from ledger.application import LedgerApplication
from ledger.clock import system_clock
from ledger.domain import commands as c
from ledger.projections import READ_MODEL_PROJECTION, apply_page
from ledger.verify import verify
from ledger.writer import BatchedWriter


async def queued(writer: BatchedWriter, commands: list) -> list[asyncio.Task]:
    """Submit the commands to a writer that is not running yet: they wait in its queue, in order."""
    submitted = [asyncio.create_task(writer.submit(command)) for command in commands]
    for _ in range(100):  # bounded: the tasks only have to reach the queue
        if writer.queue.qsize() == len(commands):
            break
        await asyncio.sleep(0.01)
    assert writer.queue.qsize() == len(commands)
    return submitted


async def open_account(client, kind="card", owner="alice", currency="RUB", limit=0, account_id=None) -> str:
    response = await client.post("/accounts", json={"owner_id": "bank" if kind in ("settlement", "fee_income") else owner,
                                                    "kind": kind, "currency": currency, "credit_limit_minor": limit,
                                                    **({"account_id": str(account_id)} if account_id else {})},
                                 headers={"Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 201, response.text
    return response.json()["account_id"]


async def as_an_older_ledger_left_it(pool, statements: str) -> None:
    """Undo a newer version's schema by `statements`, and forget the schema scripts it ran:
    the next start runs today's scripts, as on a database an older ledger made."""
    await pool.execute(f"{statements}; DELETE FROM schema_scripts_applied")


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


async def relayed(ledger, position: int) -> None:
    """Wait until the outbox relay has recorded `position` as published. It then writes its
    position no more until new events come, so a page still in flight cannot overwrite a
    forged position, nor record one past a forger's deletion."""
    for _ in range(1_000):
        if ledger.parts.relay.position >= position:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the relay did not publish up to {position} in 10 s (it is at {ledger.parts.relay.position})")


async def forge_history(ledger, statement: str, *args) -> None:
    """Change the event history as only the events table's owner can: switch its append-only
    guard off, change it, and switch the guard back on, covering the tracks. What verify must
    find then is in the events themselves. `statement` names the table `{table}`."""
    table = events_table(ledger.parts.app.recorder)
    await relayed(ledger, ledger.parts.writer.last_position)  # the forger waits for a quiet moment
    # The history so far sealed first, as the sealer does every few seconds: the forgery
    # then changes sealed events, as it would on any ledger that has run a while.
    await history_seals.seal_new_events(ledger.parts.pool, table, history_seals.seal_key_for(ledger.settings))
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {table} DISABLE TRIGGER {guard}")
        await connection.execute(statement.format(table=table), *args)
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {guard}")


EVENTS_AT_MOST = 10_000  # what a test's ledger holds: the forger reads it all at once


async def cover_up(ledger) -> None:
    """Make everything derived agree with the events as they now stand: the read model
    rebuilt from them, its position at their head, the saved balances their sums."""
    app, pool = ledger.parts.app, ledger.parts.pool
    notifications = app.recorder.select_notifications(start=0, limit=EVENTS_AT_MOST)
    assert len(notifications) < EVENTS_AT_MOST
    page = [(notification.id, app.mapper.to_domain_event(notification)) for notification in notifications]
    posted, held, incoming = defaultdict(int), defaultdict(int), defaultdict(int)
    holds = {}
    for _, event in page:
        kind = type(event).__qualname__
        if kind == "Transfer.Posted":
            for leg in event.legs:
                posted[uuid.UUID(leg["account_id"])] += leg["amount_minor"]
        elif kind == "Hold.Placed":
            holds[event.client_hold_id] = (uuid.UUID(event.debit_account_id), uuid.UUID(event.credit_account_id))
            debit, credit = holds[event.client_hold_id]
            held[debit] += event.amount_minor
            incoming[credit] += event.amount_minor
        elif kind in ("Hold.Captured", "Hold.Voided", "Hold.Expired"):
            debit, credit = holds[event.client_hold_id]
            minor = event.amount_minor if kind == "Hold.Captured" else event.released_minor
            held[debit] -= minor
            incoming[credit] -= minor
    async with pool.acquire() as connection, connection.transaction():
        # The read model's position locked first, as the live projection and rebuild lock it:
        # a projection batch caught between the two locks would otherwise deadlock with us.
        await connection.execute("SELECT position FROM projection_position WHERE projection = $1 FOR UPDATE",
                                 READ_MODEL_PROJECTION)
        await connection.execute("TRUNCATE ledger_accounts, ledger_entries, ledger_transfers, ledger_holds")
        await apply_page(connection, page)
        await connection.execute("UPDATE projection_position SET position = $2 WHERE projection = $1",
                                 READ_MODEL_PROJECTION, page[-1][0])
        await connection.execute("UPDATE ledger_balances SET posted_minor = 0, held_minor = 0, incoming_held_minor = 0")
        for account_id in {*posted, *held, *incoming}:
            await connection.execute(
                "UPDATE ledger_balances SET posted_minor = $2, held_minor = $3, incoming_held_minor = $4"
                " WHERE account_id = $1", account_id, posted[account_id], held[account_id], incoming[account_id])


async def run_cli(ledger, monkeypatch, command: str, *args: str, settings: ServiceSettings | None = None):
    """`kabinet ledger <command> [args]` on this ledger's database, with its settings or others (an
    auditor's role, say), in a thread: verify runs its own event loop."""
    monkeypatch.setattr("ledger.cli.ledger_settings", lambda: settings or ledger.settings)
    kabinet = typer.Typer()
    kabinet.add_typer(cli.app, name="ledger")  # as the `kabinet.cli` entry point registers it
    return await anyio.to_thread.run_sync(lambda: CliRunner().invoke(kabinet, ["ledger", command, *args]))


async def pages_after(client, path: str, params: dict, first_page: dict, pages_max: int = 10) -> list[dict]:
    """The first page and every page after it, following `next_cursor` (at most `pages_max`)."""
    pages = [first_page]
    for _ in range(pages_max):
        if pages[-1]["next_cursor"] is None:
            break
        pages.append((await client.get(path, params={**params, "cursor": pages[-1]["next_cursor"]})).json())
    return pages


async def failed_checks(ledger, settings: ServiceSettings | None = None) -> dict[str, str]:
    """`kabinet ledger verify`'s failed checks and what each says (with the ledger's own
    settings, or others: another seal key, say)."""
    report = await verify(ledger.parts.app, settings or ledger.settings)
    return {check.name: check.detail for check in report.checks if not check.ok}


def read_model_held_back(ledger, monkeypatch) -> asyncio.Event:
    """The history read model stops applying what the writer commits until the event returned
    is set: a read model behind, as under load."""
    projection = ledger.parts.projection
    apply_page, caught_up = projection.apply_page, asyncio.Event()

    async def slow_apply_page(connection, page):
        await caught_up.wait()  # the read model falls behind here
        await apply_page(connection, page)

    monkeypatch.setattr(projection, "apply_page", slow_apply_page)
    return caught_up
