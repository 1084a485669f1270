"""The ledger's eventsourcing Application: its aggregates and how they are stored."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from eventsourcing.application import Application
from psycopg.sql import SQL, Identifier

from ledger.domain.account import Account


class LedgerApplication(Application):
    name = "ledger"
    # A hot account gets one event per writer batch; snapshots keep reloads short.
    snapshotting_intervals = {Account: 500}

    def existing_ids(self, aggregate_ids: Iterable[UUID]) -> set[UUID]:
        """Which of these aggregates have events: one query for a whole writer batch.

        Most commands name a new transfer id; asking the store about each one separately
        would cost a round trip per transfer just to learn that it is new.
        """
        ids = [str(aggregate_id) for aggregate_id in set(aggregate_ids)]  # text, cast in SQL: psycopg dumps str lists fastest
        if not ids:
            return set()
        recorder = self.recorder
        statement = SQL("SELECT DISTINCT originator_id FROM {schema}.{table} WHERE originator_id = ANY(%s::uuid[])").format(
            schema=Identifier(recorder.datastore.schema), table=Identifier(recorder.events_table_name)
        )
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute(statement, (ids,))
            return {row["originator_id"] for row in cursor.fetchall()}
