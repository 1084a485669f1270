"""Rebuilding the ledger's read model from its event store, while the ledger runs.

When `kabinet ledger verify` finds the read model differs from the event store (a
projection bug since fixed, a row changed by hand), or a read model's new column needs its
past filled in, the read model is rebuilt from the events. It is built beside the live one,
in a schema of its own, page by page. Then one short transaction applies the events
committed meanwhile and puts the new tables in place of the old, together with the
projection's position. Readers never see a read model half built: until that transaction
commits they read the old one, and the new one after it. Transfers go on posting meanwhile
(the read model is not on their path), and the ledger's running projections carry on from
the new position (several processes may project one read model: each skips what is stored
already, kabinet_chassis.projection). A rebuild that fails midway changes nothing: the live
tables are untouched and its schema is dropped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import asyncpg

from kabinet_chassis.eventstore import events_table, quoted
from ledger import projections
from ledger.application import LedgerApplication

REBUILD_SCHEMA = "ledger_read_model_rebuild"
REBUILD_LOCK = "ledger_read_model_rebuild"  # one rebuild at a time
PAGE_EVENTS = 2_000  # events applied in one transaction while building
PAGES_MAX = 10_000_000  # 20 billion events: a limit, not an expectation
# Rounds of catching up with the events committed while building, before the swap applies
# the rest under the projection's lock (which holds up the live read model meanwhile).
CATCH_UP_ROUNDS_MAX = 10
# A reader holding a live table this long fails the swap (tried again), not the readers queued behind it.
SWAP_LOCK_TIMEOUT_S = 10
SWAP_ATTEMPTS_MAX = 3


class RebuildNotDone(Exception):
    """The read model was not rebuilt, and nothing changed: the command may simply be run again."""


class RebuildRunning(RebuildNotDone):
    """Another rebuild of the read model is running."""


class ReadModelBusy(RebuildNotDone):
    """Readers held the live read model's tables through every attempt to put the new one live."""


@dataclass(frozen=True)
class Rebuilt:
    events_applied: int
    position: int  # the log position the new read model stood at when it went live
    took_s: float


async def rebuild_read_model(app: LedgerApplication, database_url: str,
                             on_progress: Callable[[int, int], None] | None = None) -> Rebuilt:
    """Build the read model again from every event, then put it live in one transaction.
    `on_progress(position, head)` is told after each page applied how far the new read model
    has come, and where the log's head was when that round began (it moves on while the ledger posts)."""
    started = time.monotonic()
    connection = await asyncpg.connect(database_url)
    try:
        if not await connection.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", REBUILD_LOCK):
            raise RebuildRunning("another rebuild of the ledger's read model is running; wait for it to finish")
        live = quoted(await connection.fetchval("SELECT current_schema()"))
        building = quoted(REBUILD_SCHEMA)
        await connection.execute(f"DROP SCHEMA IF EXISTS {building} CASCADE")  # left by a rebuild killed midway
        await connection.execute(f"CREATE SCHEMA {building}")
        try:
            # The read model's tables are made and found in the building schema first; the
            # events, balances and positions are the live ones.
            await connection.execute(f"SET search_path = {building}, {live}")
            await connection.execute(projections.SCHEMA)
            position, applied = 0, 0
            for _ in range(CATCH_UP_ROUNDS_MAX):
                position, round_applied = await _apply_events(app, connection, position, up_to=None,
                                                              on_progress=on_progress)
                applied += round_applied
                if round_applied < PAGE_EVENTS:
                    break
            for attempt in range(1, SWAP_ATTEMPTS_MAX + 1):
                try:
                    position, last_applied = await _swap(app, connection, live, building, position)
                    break
                except asyncpg.LockNotAvailableError:
                    if attempt == SWAP_ATTEMPTS_MAX:
                        raise ReadModelBusy(
                            f"readers held the live read model's tables for more than {SWAP_LOCK_TIMEOUT_S} s at each"
                            f" of {SWAP_ATTEMPTS_MAX} attempts to put the rebuilt one live; nothing changed: run it"
                            " again once the long reads (reports, exports) are done") from None
            applied += last_applied
        except BaseException:
            with contextlib.suppress(Exception):  # the database may be what failed: the next rebuild drops it
                await connection.execute(f"DROP SCHEMA IF EXISTS {building} CASCADE")
            raise
        await connection.execute(f"DROP SCHEMA {building}")  # empty now
    finally:
        await connection.close()  # frees the advisory lock with the session
    return Rebuilt(applied, position, time.monotonic() - started)


async def _swap(app: LedgerApplication, connection: asyncpg.Connection, live: str, building: str, position: int
                ) -> tuple[int, int]:
    """In one transaction: the events committed since `position` applied to the new tables,
    which then replace the live ones, with the projection's position. The position reached
    and how many events it applied."""
    async with connection.transaction():
        await connection.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT_S}s'")
        # Holds up the live projections until the new tables are in place.
        await connection.execute(f"INSERT INTO {live}.projection_position (projection, position) VALUES ($1, 0)"
                                 " ON CONFLICT (projection) DO NOTHING", projections.READ_MODEL_PROJECTION)
        await connection.fetchval(f"SELECT position FROM {live}.projection_position WHERE projection = $1 FOR UPDATE",
                                  projections.READ_MODEL_PROJECTION)
        head = await connection.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {events_table(app.recorder)}")
        position, applied = await _apply_events(app, connection, position, up_to=head)
        for table in projections.READ_MODEL_TABLES:
            await _take_over_privileges(connection, f"{live}.{table}", f"{building}.{table}")
            await connection.execute(f"DROP TABLE {live}.{table}")
            await connection.execute(f"ALTER TABLE {building}.{table} SET SCHEMA {live}")
        await connection.execute(f"UPDATE {live}.projection_position SET position = $2 WHERE projection = $1",
                                 projections.READ_MODEL_PROJECTION, position)
    return position, applied


async def _take_over_privileges(connection: asyncpg.Connection, live_table: str, new_table: str) -> None:
    """The new table gets the live one's owner and grants: a rebuild run under another role (an
    operator's) must not leave the service's own role unable to write its read model, nor take
    away a reporting role's right to read it."""
    owner = await connection.fetchval("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = $1::regclass",
                                      live_table)
    await connection.execute(f"ALTER TABLE {new_table} OWNER TO {quoted(owner)}")
    grants = await connection.fetch(
        "SELECT CASE WHEN grantee = 0 THEN NULL ELSE pg_get_userbyid(grantee) END AS grantee, privilege_type, is_grantable"
        " FROM aclexplode((SELECT relacl FROM pg_class WHERE oid = $1::regclass))", live_table)
    for grant in grants:
        grantee = "PUBLIC" if grant["grantee"] is None else quoted(grant["grantee"])
        await connection.execute(f"GRANT {grant['privilege_type']} ON {new_table} TO {grantee}"
                                 + (" WITH GRANT OPTION" if grant["is_grantable"] else ""))


async def _apply_events(app: LedgerApplication, connection: asyncpg.Connection, after: int, up_to: int | None,
                        on_progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Apply the events after position `after` (up to `up_to`, or as many as there are) to the
    read model the connection finds first; the position reached and how many were applied."""
    applied = 0
    if on_progress is not None:
        head = up_to if up_to is not None else await connection.fetchval(
            f"SELECT coalesce(max(notification_id), 0) FROM {events_table(app.recorder)}")
    for _ in range(PAGES_MAX):
        notifications = await anyio.to_thread.run_sync(lambda after=after: app.recorder.select_notifications(
            start=after, limit=PAGE_EVENTS, stop=up_to, inclusive_of_start=False))
        if not notifications:
            break
        page = [(notification.id, app.mapper.to_domain_event(notification)) for notification in notifications]
        async with connection.transaction():
            await projections.apply_page(connection, page)
        after, applied = page[-1][0], applied + len(page)
        if on_progress is not None:
            on_progress(after, max(after, head))  # events committed since the round began are in it too
    return after, applied
