"""An account: customer product or bank-internal, with its balance rules."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from kabinet_contracts.ledger import BANK_OWNER_ID, FREEZE_REASON_NOT_RECORDED, CloseReason, FreezeReason
from ledger.domain.errors import AccountClosed, AccountFrozen, AccountNotEmpty, InsufficientFunds, InvalidAccount
from ledger.domain.stored import stored_later


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
BANK_OWNER = BANK_OWNER_ID
# Far below PostgreSQL's bigint (9.2e18), so that sums of many amounts still fit.
CREDIT_LIMIT_MINOR_MAX = 10**13


class AccountState(StrEnum):
    OPEN = "open"
    FROZEN = "frozen"  # no debits, no new holds; credits still arrive
    CLOSED = "closed"


FREEZE_REASONS = frozenset(FreezeReason)
CLOSE_REASONS = frozenset(CloseReason)
# The one freeze an account closes under: the customer's own. Another (a court's arrest, an
# anti-fraud or compliance block, one whose reason was not recorded) is lifted first, by
# whoever imposed it: a closed account can no longer be unfrozen, so closing under it would
# leave the freeze unanswerable, and the customer walks off with an account still arrested.
FREEZES_AN_ACCOUNT_CLOSES_UNDER = frozenset({FreezeReason.CUSTOMER_REQUEST})


def frozen_for(reasons: tuple[str, ...], reason: str | None) -> tuple[str, ...]:
    """The freezes left after a Frozen event of `reason` (None: one stored before reasons were)."""
    return tuple(sorted({*reasons, reason or FREEZE_REASON_NOT_RECORDED}))


def unfrozen_for(reasons: tuple[str, ...], reason: str | None) -> tuple[str, ...]:
    """The freezes left after an Unfrozen event of `reason`: it lifts its own and one older
    than reasons; one stored before reasons were (None) lifted the only freeze there was."""
    return () if reason is None else tuple(r for r in reasons if r not in (reason, FREEZE_REASON_NOT_RECORDED))


def state_with(freeze_reasons: tuple[str, ...]) -> str:
    """An account's state while it is not closed: frozen exactly while a freeze is left."""
    return (AccountState.FROZEN if freeze_reasons else AccountState.OPEN).value


def freezes_after(event: Any, freeze_reasons: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """The freezes left, and the account's state, after its Frozen or Unfrozen event: what
    the read model and verify apply, as the aggregate does (an event stored before freezes
    had reasons has none)."""
    reason = stored_later(event, "reason")
    left = (frozen_for if isinstance(event, Account.Frozen) else unfrozen_for)(freeze_reasons, reason)
    return left, state_with(left)


class Account(Aggregate):
    """What an account is and may do: owner, kind, currency, credit limit, state.

    Its money is not in its stream. Every posting is a leg of a `Transfer.Posted` event
    (and every reservation a `Hold` event); the account's `Balance` (balance.py) is their
    sum, kept by the writer and saved in the same transaction as those events. So a
    transfer appends one event, however many accounts it touches, and a hot account (the
    bank's fee account) is never a stream that every transfer must append to.
    """

    @staticmethod
    def create_id(account_id: UUID) -> UUID:
        return account_id

    # Every event takes `timestamp`, eventsourcing's own field: the writer passes its batch
    # time, so an event is stamped with the ledger's clock (which never goes back along the
    # log), not with the moment Python made the object.

    @event("Opened")
    def __init__(self, account_id: UUID, owner_id: str, kind: str, currency: str, credit_limit_minor: int,
                 timestamp: datetime, requested_by: str | None = None) -> None:
        self.owner_id = owner_id
        self.kind = kind
        self.currency = currency
        self.credit_limit_minor = credit_limit_minor
        self.opened_with_credit_limit_minor = credit_limit_minor  # a retried opening must ask the same
        self.state = AccountState.OPEN.value
        self.freeze_reasons: tuple[str, ...] = ()  # every freeze not lifted yet, sorted
        self.close_reason: str | None = None

    @property
    def is_internal(self) -> bool:
        return self.kind in INTERNAL_KINDS

    @property
    def customer_id(self) -> str | None:
        """The customer this account belongs to; None for the bank's own (internal) accounts."""
        return None if self.owner_id == BANK_OWNER else self.owner_id

    # Public commands check their rule, then trigger the event (a private method), so a
    # replay of stored events never re-runs a rule that may have changed since.

    def freeze(self, reason: str, at: datetime, requested_by: str | None) -> None:
        """Freezes stack, one per reason: freezing again for a reason it is frozen for changes nothing."""
        self.check_freeze(reason)
        if self.adds_a_freeze(reason):
            self._freeze(reason=reason, freezes_left=list(frozen_for(self.freeze_reasons, reason)),
                         customer_id=self.customer_id, timestamp=at, requested_by=requested_by)

    def unfreeze(self, reason: str, at: datetime, requested_by: str | None) -> None:
        """Lifts the freeze of `reason` (and one older than reasons); the account stays frozen
        while another is left. Lifting a freeze it does not have changes nothing."""
        self.check_freeze(reason)
        if self.lifts_a_freeze(reason):
            self._unfreeze(reason=reason, freezes_left=list(unfrozen_for(self.freeze_reasons, reason)),
                           customer_id=self.customer_id, timestamp=at, requested_by=requested_by)

    def adds_a_freeze(self, reason: str) -> bool:
        return reason not in self.freeze_reasons

    def lifts_a_freeze(self, reason: str) -> bool:
        return reason in self.freeze_reasons or FREEZE_REASON_NOT_RECORDED in self.freeze_reasons

    def close(self, reason: str, posted_minor: int, held_minor: int, incoming_held_minor: int, at: datetime,
              requested_by: str | None) -> None:
        """Only an empty account closes, that no live hold will pay into: the caller gives
        its balance as it stands now."""
        self.check_close(reason, posted_minor, held_minor, incoming_held_minor)
        self._close(reason=reason, customer_id=self.customer_id, timestamp=at, requested_by=requested_by)

    def set_credit_limit(self, credit_limit_minor: int, posted_minor: int, held_minor: int, at: datetime,
                         requested_by: str | None) -> None:
        self.check_credit_limit(credit_limit_minor, posted_minor, held_minor)
        self._set_credit_limit(credit_limit_minor=credit_limit_minor, customer_id=self.customer_id, timestamp=at,
                               requested_by=requested_by, currency=self.currency)

    # The rules, given balances: the Batch asks them with its own view (this batch's
    # postings included) before it changes anything.

    def check_not_closed(self) -> None:
        if self.state == AccountState.CLOSED:
            raise AccountClosed(f"account {self.id} is closed")

    def check_freeze(self, reason: str) -> None:
        self.check_not_closed()
        if reason not in FREEZE_REASONS:
            raise InvalidAccount(f"{reason!r} is no reason to freeze or unfreeze an account: one of"
                                 f" {', '.join(sorted(FREEZE_REASONS))}")

    def check_close(self, reason: str, posted_minor: int, held_minor: int, incoming_held_minor: int) -> None:
        self.check_not_closed()
        if reason not in CLOSE_REASONS:
            raise InvalidAccount(f"{reason!r} is no reason to close an account: one of {', '.join(sorted(CLOSE_REASONS))}")
        blocking = [r for r in self.freeze_reasons if r not in FREEZES_AN_ACCOUNT_CLOSES_UNDER]
        if blocking:
            raise AccountFrozen(f"account {self.id} is frozen for {', '.join(blocking)}: that freeze must be lifted"
                                " before the account closes")
        if posted_minor != 0 or held_minor != 0:
            raise AccountNotEmpty(
                f"account {self.id} has balance {posted_minor} and holds {held_minor}"
                f" {self.currency} (minor units); both must be zero"
            )
        if incoming_held_minor != 0:
            # Its capture would be refused for good: the payee side of a card payment never paid.
            raise AccountNotEmpty(
                f"account {self.id} is to be paid {incoming_held_minor} {self.currency} (minor units) by live holds;"
                " they must be captured, voided or expire first"
            )

    def check_credit_limit(self, credit_limit_minor: int, posted_minor: int, held_minor: int) -> None:
        self.check_not_closed()
        if self.is_internal:
            raise InvalidAccount(f"account {self.id} is bank-internal: internal accounts carry no credit limit")
        if type(credit_limit_minor) is not int or not 0 <= credit_limit_minor <= CREDIT_LIMIT_MINOR_MAX:
            raise InvalidAccount(f"credit_limit_minor must be an integer from 0 to {CREDIT_LIMIT_MINOR_MAX}")
        if posted_minor - held_minor < -credit_limit_minor:
            raise InsufficientFunds(
                f"account {self.id} already uses {held_minor - posted_minor} {self.currency} (minor units),"
                f" more than a credit limit of {credit_limit_minor}"
            )

    # The events after the opening name the account's customer too (None for the bank's
    # own), so that a subscriber can tell her "your card was frozen" from the event alone,
    # without the account's opening, which may reach it later or not at all. Events stored
    # before they did lack the field (see `stored_later` in ledger/domain/stored.py); the
    # default only lets the aggregate replay them.
    #
    # A freeze's and an unfreeze's event record the freezes left after it too, so that a
    # subscriber (cards blocking and unblocking, notifications) knows from the event alone
    # whether the account is still frozen. Replays fold the reasons (events stored before
    # record no freezes_left); the recorded list is what was published.

    @event("Frozen")
    def _freeze(self, timestamp: datetime, customer_id: str | None = None, requested_by: str | None = None,
                reason: str | None = None, freezes_left: list[str] | None = None) -> None:
        self.freeze_reasons = frozen_for(self.freeze_reasons, reason)
        self.state = state_with(self.freeze_reasons)

    @event("Unfrozen")
    def _unfreeze(self, timestamp: datetime, customer_id: str | None = None, requested_by: str | None = None,
                  reason: str | None = None, freezes_left: list[str] | None = None) -> None:
        self.freeze_reasons = unfrozen_for(self.freeze_reasons, reason)
        self.state = state_with(self.freeze_reasons)

    @event("Closed")
    def _close(self, timestamp: datetime, customer_id: str | None = None, requested_by: str | None = None,
               reason: str | None = None) -> None:
        self.state = AccountState.CLOSED.value
        self.close_reason = reason

    @event("CreditLimitSet")
    def _set_credit_limit(self, credit_limit_minor: int, timestamp: datetime, customer_id: str | None = None,
                          requested_by: str | None = None, currency: str | None = None) -> None:
        self.credit_limit_minor = credit_limit_minor
