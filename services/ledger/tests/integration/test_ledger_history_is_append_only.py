"""The ledger's history is append-only in the database itself (ARCHITECTURE.md §6): no
UPDATE, DELETE or TRUNCATE of its events gets through, not from the service's own
connection, not from a superuser; only a role that alters the table can switch the guard
off, and `kabinet ledger verify` fails while it is off."""

from __future__ import annotations

import asyncpg
import pytest

from kabinet_chassis import append_only
from kabinet_chassis.eventstore import events_table
from ledger.domain import commands as c
from services.ledger.tests.integration.ledger_support import failed_checks, funded_card

pytestmark = pytest.mark.integration

GUARD_CHECK = "event history is append-only"


async def history(ledger) -> list[tuple]:
    table = events_table(ledger.parts.app.recorder)
    rows = await ledger.parts.pool.fetch(
        f"SELECT notification_id, originator_id, originator_version, topic, state FROM {table} ORDER BY notification_id")
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("change", [
    "UPDATE {table} SET state = state || 'x'::bytea WHERE originator_version = 1",
    "DELETE FROM {table} WHERE notification_id = (SELECT max(notification_id) FROM {table})",
    "TRUNCATE {table}",
])
async def test_no_one_changes_or_deletes_a_posted_event_not_even_the_service_itself(ledger, change):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    before = await history(ledger)
    table = events_table(ledger.parts.app.recorder)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="the event history is append-only"):
        await ledger.parts.pool.execute(change.format(table=table))
    assert await history(ledger) == before
    assert await failed_checks(ledger) == {}


async def test_a_superuser_who_turns_replication_mode_on_still_cannot_change_history(ledger):
    # session_replication_role = replica skips ordinary triggers (a common trick to bypass them).
    await funded_card(ledger.parts.writer, 1_000)
    before = await history(ledger)
    table = events_table(ledger.parts.app.recorder)
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        await connection.execute("SET LOCAL session_replication_role = replica")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(f"DELETE FROM {table}")
    assert await history(ledger) == before


async def test_posting_after_the_guard_is_in_place_still_works_and_the_guard_survives_a_restart(ledger, stack):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    answer = await ledger.parts.writer.submit(
        c.PostTransfer("spend", (c.Leg(card, -100, "RUB"), c.Leg(settlement, 100, "RUB")), "card_purchase"))
    assert answer.transfer_id == "spend"
    async with ledger.parts.pool.acquire() as connection:
        # A second start (a restart, a second process) re-creates it in place, not beside it.
        await append_only.guard(ledger.parts.pool, events_table(ledger.parts.app.recorder))
        assert await append_only.missing_guards(connection, events_table(ledger.parts.app.recorder)) == []
        assert await connection.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = ANY($1::text[]) AND tgrelid = $2::regclass",
            list(append_only.GUARDS), events_table(ledger.parts.app.recorder)) == len(append_only.GUARDS)


@pytest.mark.parametrize("switch_off", ["DISABLE TRIGGER {guard}", "ENABLE TRIGGER {guard}"])
async def test_verify_fails_while_the_guard_is_switched_off(ledger, switch_off):
    # ENABLE (not ENABLE ALWAYS) lets session_replication_role = replica skip it: off for a forger.
    await funded_card(ledger.parts.writer, 1_000)
    table = events_table(ledger.parts.app.recorder)
    await ledger.parts.pool.execute(f"ALTER TABLE {table} {switch_off.format(guard=append_only.ROW_GUARD)}")
    failed = await failed_checks(ledger)
    assert list(failed) == [GUARD_CHECK]
    assert append_only.ROW_GUARD in failed[GUARD_CHECK]
