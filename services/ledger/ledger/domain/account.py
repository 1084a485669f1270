"""An account: customer product or bank-internal, with its balance rules."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from uuid import UUID

from eventsourcing.domain import Aggregate, event


class AccountKind(StrEnum):
    # customer products
    CARD = "card"
    SAVINGS = "savings"
    DEPOSIT = "deposit"
    LOAN = "loan"
    REWARDS = "rewards"
    # bank-internal
    SETTLEMENT = "settlement"
    FEE_INCOME = "fee_income"
    INTEREST_EXPENSE = "interest_expense"
    INTEREST_INCOME = "interest_income"
    CASHBACK_EXPENSE = "cashback_expense"
    MARKETPLACE_CLEARING = "marketplace_clearing"
    SUSPENSE = "suspense"


INTERNAL_KINDS = frozenset({
    AccountKind.SETTLEMENT, AccountKind.FEE_INCOME, AccountKind.INTEREST_EXPENSE, AccountKind.INTEREST_INCOME,
    AccountKind.CASHBACK_EXPENSE, AccountKind.MARKETPLACE_CLEARING, AccountKind.SUSPENSE,
})
BANK_OWNER = "bank"


class AccountState(StrEnum):
    OPEN = "open"
    FROZEN = "frozen"  # no debits, no new holds; credits still arrive
    CLOSED = "closed"


class Account(Aggregate):
    """Balances: posted (settled), held (reserved by live holds), available (what may be spent).

    Balance changes arrive as one `Posted` event per writer batch carrying all of this
    account's entries, and one `HoldsChanged` for its reservations: the single writer
    saves a batch at once, so a hot account (the bank's fee account) is appended to
    once per batch, not once per transfer.
    """

    @staticmethod
    def create_id(account_id: UUID) -> UUID:
        return account_id

    @event("Opened")
    def __init__(self, account_id: UUID, owner_id: str, kind: str, currency: str, credit_limit_minor: int) -> None:
        self.owner_id = owner_id
        self.kind = kind
        self.currency = currency
        self.credit_limit_minor = credit_limit_minor
        self.state = AccountState.OPEN.value
        self.posted_minor = 0
        self.held_minor = 0

    @property
    def is_internal(self) -> bool:
        return self.kind in INTERNAL_KINDS

    @property
    def available_minor(self) -> int:
        return self.posted_minor - self.held_minor + self.credit_limit_minor

    @event("Frozen")
    def freeze(self) -> None:
        self.state = AccountState.FROZEN.value

    @event("Unfrozen")
    def unfreeze(self) -> None:
        self.state = AccountState.OPEN.value

    @event("Closed")
    def close(self) -> None:
        self.state = AccountState.CLOSED.value

    @event("CreditLimitSet")
    def set_credit_limit(self, credit_limit_minor: int) -> None:
        self.credit_limit_minor = credit_limit_minor

    @event("Posted")
    def post(self, entries: list[dict], posted_at: datetime) -> None:
        """entries: {"transfer_id": str, "amount_minor": int (+credit / -debit), "code": str}"""
        self.posted_minor += sum(entry["amount_minor"] for entry in entries)

    @event("HoldsChanged")
    def change_holds(self, changes: list[dict]) -> None:
        """changes: {"hold_id": str, "held_delta_minor": int}"""
        self.held_minor += sum(change["held_delta_minor"] for change in changes)
