"""How the ledger is stored: its eventsourcing Application (aggregates, mapper, reads)
and the one statement that commits a writer batch, events and balances together."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from uuid import UUID

import anyio
import asyncpg
from eventsourcing.application import Application
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg.sql import SQL, Identifier

from kabinet_chassis.databases import SCHEMA_CHANGE_TIMEOUT_S, change_schema, schema_is_current
from kabinet_chassis.eventstore import events_table
from ledger.domain.balance import Balance

# The inline balance projection: one row per account, written in the same transaction as
# the events that move its money, so a balance read from here is never behind, never
# ahead, and survives any crash together with its events.
BALANCES_TABLE = """
CREATE TABLE IF NOT EXISTS ledger_balances (
    account_id uuid PRIMARY KEY,
    posted_minor bigint NOT NULL,
    held_minor bigint NOT NULL,
    version bigint NOT NULL CHECK (version > 0),
    incoming_held_minor bigint NOT NULL DEFAULT 0
)"""

# A database made before balances tracked what holds will pay in: the column (filled in
# from the live holds' events, `incoming_held_by_account`), and the append function's old
# signatures gone (a new signature is another function to PostgreSQL).
HAS_INCOMING_HELD = ("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
                     " AND table_name = 'ledger_balances' AND column_name = 'incoming_held_minor')")
STORE_BEFORE_NOW = """
ALTER TABLE ledger_balances ADD COLUMN IF NOT EXISTS incoming_held_minor bigint NOT NULL DEFAULT 0;
DROP FUNCTION IF EXISTS ledger_append_batch(uuid[], bigint[], text[], bytea[], uuid[], bigint[], bigint[], bigint[],
                                            timestamptz);
DROP FUNCTION IF EXISTS ledger_append_batch(uuid[], bigint[], text[], bytea[], uuid[], bigint[], bigint[], bigint[],
                                            bigint[], timestamptz)"""

# The time of the last committed batch. Entries are summed into running balances in log
# order; a statement or a balance at an instant reads them by time. So posting times must
# never go back along the log: not when the clock steps back, not between two writers.
POSTING_CLOCK_TABLE = """
CREATE TABLE IF NOT EXISTS ledger_posting_clock (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    posted_at timestamptz NOT NULL
)"""

# A batch time further ahead of the database's clock than this is a clock gone wrong: were
# it committed, every later batch would post at it (times never go back) until real time
# caught up. It is refused instead, loudly (the writer answers 503).
CLOCK_AHEAD_MAX_S = 60
CLOCK_AHEAD_SQLSTATE = "LD001"

# One call commits a batch. It takes eventsourcing's recorder's table lock (notification
# ids must become visible in commit order, or a reader of the log would pass over a gap
# that fills in later) and its NOTIFY, moves the posting clock forward (never back),
# saves the new balances only over the versions they were computed from (version - 1; a
# new account's row must not exist yet), checks that the balances the batch judged by but
# does not save (a refusal's account) are still at the versions it read, and that the
# accounts and holds it found absent (read at version 0) still have no events, and appends
# the events. A writer that read a
# stale balance or an old posting time gets an integrity error and validates its batch
# again instead of overwriting money it never saw; an event already stored at its
# (id, version) is refused by the table's primary key the same way.
APPEND_BATCH_FUNCTION = """
CREATE OR REPLACE FUNCTION ledger_append_batch(
    event_ids uuid[], event_versions bigint[], event_topics text[], event_states bytea[],
    balance_ids uuid[], balances_posted bigint[], balances_held bigint[], balance_versions bigint[],
    balances_incoming_held bigint[], read_ids uuid[], read_versions bigint[], batch_posted_at timestamptz)
RETURNS TABLE (notification_id bigint, originator_id uuid, originator_version bigint)
LANGUAGE plpgsql AS $$
DECLARE
    saved bigint;
BEGIN
    LOCK TABLE {events} IN EXCLUSIVE MODE;
    PERFORM pg_notify({channel}, '');
    IF batch_posted_at > clock_timestamp() + make_interval(secs => {clock_ahead_max_s}) THEN
        RAISE EXCEPTION 'the ledger''s clock says %, the database''s % : more than % s ahead; not posting',
            batch_posted_at, clock_timestamp(), {clock_ahead_max_s} USING ERRCODE = '{clock_ahead_sqlstate}';
    END IF;
    INSERT INTO ledger_posting_clock AS clock (singleton, posted_at) VALUES (true, batch_posted_at)
    ON CONFLICT (singleton) DO UPDATE SET posted_at = excluded.posted_at WHERE clock.posted_at <= excluded.posted_at;
    GET DIAGNOSTICS saved = ROW_COUNT;
    IF saved = 0 THEN
        RAISE EXCEPTION 'a ledger batch at % is earlier than the last one committed', batch_posted_at
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    INSERT INTO ledger_balances AS current (account_id, posted_minor, held_minor, version, incoming_held_minor)
    SELECT * FROM unnest(balance_ids, balances_posted, balances_held, balance_versions, balances_incoming_held)
    ON CONFLICT (account_id) DO UPDATE
        SET posted_minor = excluded.posted_minor, held_minor = excluded.held_minor, version = excluded.version,
            incoming_held_minor = excluded.incoming_held_minor
        WHERE current.version = excluded.version - 1;
    GET DIAGNOSTICS saved = ROW_COUNT;
    IF saved <> cardinality(balance_ids) OR cardinality(read_ids) <> (
        SELECT count(*) FROM unnest(read_ids, read_versions) AS read(id, version)
        WHERE CASE WHEN read.version = 0 THEN NOT EXISTS (SELECT FROM {events} stored WHERE stored.originator_id = read.id)
                   ELSE EXISTS (SELECT FROM ledger_balances current
                                WHERE current.account_id = read.id AND current.version = read.version) END) THEN
        RAISE EXCEPTION 'another writer came first (% of % balances saved, or one read moved on, or one found absent was made)',
            saved, cardinality(balance_ids)
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN QUERY
        INSERT INTO {events} AS stored (originator_id, originator_version, topic, state)
        SELECT * FROM unnest(event_ids, event_versions, event_topics, event_states)
        RETURNING stored.notification_id, stored.originator_id, stored.originator_version;
END
$$"""


class LedgerApplication(Application):
    """The ledger's aggregates in PostgreSQL. The writer commits through `append_batch`;
    eventsourcing reads them back (repository, notification log)."""

    name = "ledger"

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__(env)
        assert isinstance(self.recorder, PostgresApplicationRecorder), "the ledger is stored in PostgreSQL only"

    def look_up(self, aggregate_ids: Iterable[UUID]) -> tuple[set[UUID], dict[UUID, Balance]]:
        """Which of these aggregates have events, and the saved balance of those that are
        accounts: one query for a whole writer batch.

        Most commands name a new transfer id; asking the store about each one separately
        would cost a round trip per transfer just to learn that it is new.
        """
        ids = [str(aggregate_id) for aggregate_id in set(aggregate_ids)]  # text, cast in SQL: psycopg dumps str lists fastest
        if not ids:
            return set(), {}
        recorder = self.recorder
        statement = SQL(
            "SELECT asked.id, balance.posted_minor, balance.held_minor, balance.version, balance.incoming_held_minor"
            " FROM unnest(%s::uuid[]) AS asked(id) LEFT JOIN ledger_balances balance ON balance.account_id = asked.id"
            " WHERE EXISTS (SELECT 1 FROM {schema}.{table} WHERE originator_id = asked.id)"
        ).format(schema=Identifier(recorder.datastore.schema), table=Identifier(recorder.events_table_name))
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(statement, (ids,))
            rows = cursor.fetchall()
        existing = {row["id"] for row in rows}
        balances = {row["id"]: Balance(row["posted_minor"], row["held_minor"], row["version"], row["incoming_held_minor"])
                    for row in rows if row["version"] is not None}
        return existing, balances


async def ensure_store_schema(pool: asyncpg.Pool, app: LedgerApplication) -> None:
    """The balances table and the batch append function (the events table is eventsourcing's)."""
    recorder = app.recorder
    function = APPEND_BATCH_FUNCTION.format(events=events_table(recorder), channel=_literal(recorder.channel_name),
                                            clock_ahead_max_s=CLOCK_AHEAD_MAX_S, clock_ahead_sqlstate=CLOCK_AHEAD_SQLSTATE)
    # Run at the service's start, one process at a time (databases.one_process_starting_at_a_time),
    # and only when the script is new to this database (databases.SCHEMA_SCRIPTS_TABLE says why).
    # The statements hashed are the statements run: one list, so no statement is added to
    # one and not the other (a database would never run it).
    statements = (BALANCES_TABLE, STORE_BEFORE_NOW, POSTING_CLOCK_TABLE, function)
    script = ";\n".join(statements)
    async with pool.acquire() as connection:
        if await schema_is_current(connection, "ledger_store", script):
            return
        await change_schema(connection, "ledger_store", script,
                            functools.partial(_make_store_schema, connection, app, statements))


async def _make_store_schema(connection: asyncpg.Connection, app: LedgerApplication, statements: Sequence[str]) -> None:
    """The store's tables and the batch append function, and a database made before balances tracked what holds
    will pay in: the column, filled in from the live holds' events (in the same transaction, so no batch
    commits between the column and its filling)."""
    wait_s = SCHEMA_CHANGE_TIMEOUT_S  # an upgrade of a big ledger takes long
    balances_exist = await connection.fetchval("SELECT to_regclass('ledger_balances') IS NOT NULL")
    upgrading = balances_exist and not await connection.fetchval(HAS_INCOMING_HELD)
    for statement in statements:
        await connection.execute(statement, timeout=wait_s)
    if upgrading:
        incoming = await anyio.to_thread.run_sync(incoming_held_by_account, app)
        await connection.executemany("UPDATE ledger_balances SET incoming_held_minor = $2 WHERE account_id = $1",
                                     list(incoming.items()), timeout=wait_s)


HOLD_TOPICS = tuple(f"ledger.domain.hold:Hold.{kind}" for kind in ("Placed", "Captured", "Voided", "Expired"))
HOLD_EVENTS_PAGE_SIZE = 5000
HOLD_EVENTS_PAGES_MAX = 1_000_000  # a limit, not an expectation


def incoming_held_by_account(app: LedgerApplication) -> dict[UUID, int]:
    """What live holds will pay into each account, from their events (once, on upgrade)."""
    remaining: dict[UUID, list] = {}  # hold id: [credit account id, minor units left]
    position = 0
    for _ in range(HOLD_EVENTS_PAGES_MAX):
        page = app.recorder.select_notifications(start=position, limit=HOLD_EVENTS_PAGE_SIZE, topics=HOLD_TOPICS,
                                                 inclusive_of_start=False)
        if not page:
            break
        for notification in page:
            event = app.mapper.to_domain_event(notification)
            kind = type(event).__name__
            if kind == "Placed":
                remaining[event.originator_id] = [UUID(event.credit_account_id), event.amount_minor]
            elif kind == "Captured":
                remaining[event.originator_id][1] -= event.amount_minor
            else:  # voided or expired: what was left is released
                remaining[event.originator_id][1] -= event.released_minor
        position = page[-1].id
    incoming: dict[UUID, int] = {}
    for account_id, minor in remaining.values():
        incoming[account_id] = incoming.get(account_id, 0) + minor
    return incoming


async def last_posted_at(pool: asyncpg.Pool) -> datetime | None:
    """The time of the last committed batch; a new batch may not be earlier."""
    return await pool.fetchval("SELECT posted_at FROM ledger_posting_clock")


async def append_batch(
    connection: asyncpg.Connection, stored_events: Sequence[StoredEvent], balances: Mapping[UUID, Balance],
    versions_only_read: Mapping[UUID, int], posted_at: datetime,
) -> dict[tuple[UUID, int], int]:
    """Commit a batch in one statement (one round trip, its own transaction): returns the
    notification id of each event by (originator id, version). Raises asyncpg's
    IntegrityConstraintViolationError, saving nothing, if another writer got there first
    (or committed a later batch time)."""
    rows = await connection.fetch(
        "SELECT * FROM ledger_append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        [event.originator_id for event in stored_events],
        [event.originator_version for event in stored_events],
        [event.topic for event in stored_events],
        [event.state for event in stored_events],
        list(balances),
        [balance.posted_minor for balance in balances.values()],
        [balance.held_minor for balance in balances.values()],
        [balance.version for balance in balances.values()],
        [balance.incoming_held_minor for balance in balances.values()],
        list(versions_only_read),
        list(versions_only_read.values()),
        posted_at,
    )
    return {(row["originator_id"], row["originator_version"]): row["notification_id"] for row in rows}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
