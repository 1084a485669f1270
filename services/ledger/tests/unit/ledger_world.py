"""An in-memory ledger for domain tests: the batch, a dict of live aggregates and one of
balances (the writer's cache), and an eventsourcing Application on POPO storage that
every batch is saved into, so events really go through the transcoder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.application import Application

from ledger.domain import commands as c
from ledger.domain.account import INTERNAL_KINDS, Account
from ledger.domain.balance import Balance, available_minor
from ledger.domain.batch import Batch
from ledger.domain.errors import LedgerError

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


class World:
    def __init__(self, store: dict[UUID, Any] | None = None, balances: dict[UUID, Balance] | None = None,
                 now: datetime = T0) -> None:
        """With a `store` given (a copy of another world's), batches are not saved to an event store."""
        self.store: dict[UUID, Any] = {} if store is None else store  # live aggregates, as the writer caches them
        self.balances: dict[UUID, Balance] = {} if balances is None else balances  # as saved with the events
        self.app = Application() if store is None else None  # default (POPO, in-memory) persistence
        self.saved_events: list[Any] = []
        self.now = now

    def run(self, *commands: Any) -> list[Any]:
        """One writer batch: results or the LedgerError of each command, then save all in one go."""
        batch = Batch(self.store.get, self.balances.__getitem__, self.now)
        outcomes = []
        for command in commands:
            try:
                outcomes.append(batch.execute(command))
            except LedgerError as error:
                outcomes.append(error)
        self.last_saved, new_balances = batch.finish()
        if self.last_saved and self.app is not None:
            recordings = self.app.save(*self.last_saved)
            self.saved_events.extend(r.domain_event for r in recordings)
        for aggregate in self.last_saved:
            aggregate.collect_events()  # saved above, or dropped by a world without a store
            self.store[aggregate.id] = aggregate
        for account_id, balance in new_balances.items():
            assert balance.version == self.balances.get(account_id, Balance()).version + 1, "a balance skipped a version"
            self.balances[account_id] = balance
        return outcomes

    def one(self, command: Any) -> Any:
        outcome = self.run(command)[0]
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    def open(self, kind: str = "card", owner: str = "alice", currency: str = "RUB", limit: int = 0) -> UUID:
        account_id = uuid4()
        self.one(c.OpenAccount(account_id, "bank" if kind in INTERNAL_KINDS else owner, kind, currency, limit))
        return account_id

    def account(self, account_id: UUID) -> Account:
        return self.store[account_id]

    def balance(self, account_id: UUID) -> Balance:
        return self.balances[account_id]

    def available(self, account_id: UUID) -> int:
        balance = self.balance(account_id)
        return available_minor(balance.posted_minor, balance.held_minor, self.account(account_id).credit_limit_minor)

    def events_of(self, aggregate_id: UUID, since: int = 0) -> list[str]:
        return [type(e).__qualname__ for e in self.saved_events[since:] if e.originator_id == aggregate_id]

    def later(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def transfer(transfer_id: str, *legs: tuple[UUID, int], code: str = "p2p", currency: str = "RUB") -> c.PostTransfer:
    return c.PostTransfer(transfer_id, tuple(c.Leg(a, amount, currency) for a, amount in legs), code)


def funded(world: World, amount_minor: int = 1_000, **opening: Any) -> tuple[UUID, UUID]:
    """A settlement account and a card (opened with `opening`) holding `amount_minor` from it."""
    settlement = world.open("settlement")
    card = world.open(**opening)
    world.one(transfer(f"fund-{card}", (settlement, -amount_minor), (card, amount_minor), code="top_up"))
    return settlement, card
