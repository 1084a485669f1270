"""The ledger's eventsourcing Application: its aggregates, how they are stored, and the
balances saved with them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from psycopg.sql import SQL, Identifier

from kabinet_chassis.eventstore import ArrayInsertRecorder
from ledger.domain.balance import Balance

# The inline balance projection: one row per account, written in the same transaction as
# the events that move its money, so a balance read from here is never behind, never
# ahead, and survives any crash together with its events.
BALANCES_TABLE = SQL("""
CREATE TABLE IF NOT EXISTS ledger_balances (
    account_id uuid PRIMARY KEY,
    posted_minor bigint NOT NULL,
    held_minor bigint NOT NULL,
    version bigint NOT NULL CHECK (version > 0)
)""")
# Saves new balances only over the versions they were computed from (version - 1; a new
# account's row must not exist yet). A writer that read a stale balance gets an
# integrity error and validates its batch again, instead of overwriting money it never saw.
SAVE_BALANCES_FUNCTION = SQL("""
CREATE OR REPLACE FUNCTION ledger_save_balances(ids uuid[], posted bigint[], held bigint[], versions bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    saved bigint;
BEGIN
    INSERT INTO ledger_balances AS current (account_id, posted_minor, held_minor, version)
    SELECT * FROM unnest(ids, posted, held, versions)
    ON CONFLICT (account_id) DO UPDATE
        SET posted_minor = excluded.posted_minor, held_minor = excluded.held_minor, version = excluded.version
        WHERE current.version = excluded.version - 1;
    GET DIAGNOSTICS saved = ROW_COUNT;
    IF saved <> cardinality(ids) THEN
        RAISE EXCEPTION 'ledger balances were changed by another writer (% of % saved)', saved, cardinality(ids)
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
END
$$""")


class LedgerRecorder(ArrayInsertRecorder):
    """Saves a batch's new balances (`save(..., balances=...)`) in the transaction of its events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sql_create_statements += [BALANCES_TABLE, SAVE_BALANCES_FUNCTION]

    def _write_alongside(self, curs: Any, *, balances: Mapping[UUID, Balance] | None = None, **_: Any) -> None:
        if not balances:
            return
        curs.execute(
            "SELECT ledger_save_balances(%s::uuid[], %s::bigint[], %s::bigint[], %s::bigint[])",
            (
                [str(account_id) for account_id in balances],
                [balance.posted_minor for balance in balances.values()],
                [balance.held_minor for balance in balances.values()],
                [balance.version for balance in balances.values()],
            ),
        )


class LedgerApplication(Application):
    """Stored in PostgreSQL only: its balances are saved by `LedgerRecorder`."""

    name = "ledger"

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__({**env, "APPLICATION_RECORDER_TOPIC": "ledger.application:LedgerRecorder"})

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
            "SELECT asked.id, balance.posted_minor, balance.held_minor, balance.version"
            " FROM unnest(%s::uuid[]) AS asked(id) LEFT JOIN ledger_balances balance ON balance.account_id = asked.id"
            " WHERE EXISTS (SELECT 1 FROM {schema}.{table} WHERE originator_id = asked.id)"
        ).format(schema=Identifier(recorder.datastore.schema), table=Identifier(recorder.events_table_name))
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(statement, (ids,))
            rows = cursor.fetchall()
        existing = {row["id"] for row in rows}
        balances = {row["id"]: Balance(row["posted_minor"], row["held_minor"], row["version"])
                    for row in rows if row["version"] is not None}
        return existing, balances
