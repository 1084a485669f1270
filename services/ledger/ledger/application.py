"""The ledger's eventsourcing Application: its aggregates and how they are stored."""

from __future__ import annotations

from eventsourcing.application import Application

from ledger.domain.account import Account


class LedgerApplication(Application):
    name = "ledger"
    # A hot account gets one event per writer batch; snapshots keep reloads short.
    snapshotting_intervals = {Account: 500}
