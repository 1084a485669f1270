"""An in-memory ledger for domain tests: a dict of aggregates and the batch around it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from ledger.domain import commands as c
from ledger.domain.batch import Batch
from ledger.domain.errors import LedgerError

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


class World:
    def __init__(self) -> None:
        self.store: dict[UUID, Any] = {}
        self.saved_events: list[Any] = []
        self.now = T0

    def run(self, *commands: Any) -> list[Any]:
        """One writer batch: results or the LedgerError of each command, then 'save'."""
        batch = Batch(self.store.get, self.now)
        outcomes = []
        for command in commands:
            try:
                outcomes.append(batch.execute(command))
            except LedgerError as error:
                outcomes.append(error)
        for aggregate in batch.finish():
            self.saved_events.extend(aggregate.collect_events())
            self.store[aggregate.id] = aggregate
        return outcomes

    def one(self, command: Any) -> Any:
        outcome = self.run(command)[0]
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    def open(self, kind: str = "card", owner: str = "alice", currency: str = "RUB", limit: int = 0) -> UUID:
        account_id = uuid4()
        self.one(c.OpenAccount(account_id, owner if kind not in INTERNAL else "bank", kind, currency, limit))
        return account_id

    def account(self, account_id: UUID):
        return self.store[account_id]

    def later(self, **delta) -> None:
        self.now += timedelta(**delta)


INTERNAL = {"settlement", "fee_income", "interest_expense", "interest_income", "cashback_expense",
            "marketplace_clearing", "suspense"}


def transfer(transfer_id: str, *legs: tuple[UUID, int], code: str = "p2p", currency: str = "RUB") -> c.PostTransfer:
    return c.PostTransfer(transfer_id, tuple(c.Leg(a, amount, currency) for a, amount in legs), code)
