"""Public events of the ledger, on `ledger.events.v1`."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from kabinet_contracts.registry import register, topic_for

LEDGER_TOPIC = topic_for("ledger")
# The owner_id of every bank-internal account (settlement, fee income, ...): never a customer's.
BANK_OWNER_ID = "bank"


class FreezeReason(StrEnum):
    """Why an account is frozen. Freezes stack: each is lifted by an unfreeze naming its
    reason, and the account stays frozen while any is left (a customer's own freeze lifted
    does not lift a court's)."""

    CUSTOMER_REQUEST = "customer_request"  # the customer's own, from the app or the support line
    FRAUD_SUSPECTED = "fraud_suspected"  # the bank's anti-fraud, until the customer confirms
    COURT_ORDER = "court_order"  # an arrest by a court or a bailiff
    COMPLIANCE_REVIEW = "compliance_review"  # an anti-money-laundering or know-your-customer review


# The reason of a freeze made before freezes named theirs: any unfreeze lifts it.
FREEZE_REASON_NOT_RECORDED = "not_recorded"


class CloseReason(StrEnum):
    """Why an account was closed."""

    CUSTOMER_REQUEST = "customer_request"
    BANK_DECISION = "bank_decision"  # the bank ended the relationship
    CUSTOMER_DECEASED = "customer_deceased"
    PRODUCT_ENDED = "product_ended"  # a deposit's term ran out, a loan was repaid


class ReversalReason(StrEnum):
    """Why a posted transfer was reversed (storno): a transfer posted stays in the history,
    and its reversal, moving the same money back, stands beside it."""

    POSTED_IN_ERROR = "posted_in_error"  # a wrong account or amount, found by the bank or the customer
    DUPLICATE = "duplicate"  # the same payment posted twice
    FRAUD_CONFIRMED = "fraud_confirmed"  # a payment the bank found was not the customer's
    DISPUTE_UPHELD = "dispute_upheld"  # the customer's claim against the payment was upheld


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MoneyDTO(_Payload):
    amount_minor: int
    currency: str


@register("ledger.account_opened", 1, LEDGER_TOPIC, "A customer or bank-internal account was opened.")
class AccountOpened(_Payload):
    account_id: str
    owner_id: str
    kind: str
    currency: str
    credit_limit_minor: int


@register("ledger.account_credit_limit_set", 2, LEDGER_TOPIC,
          "A customer account's credit limit (how far below zero it may go, in the account's currency) was set.")
class AccountCreditLimitSet(_Payload):
    account_id: str
    credit_limit_minor: int
    # So that a message can say "your limit is now 5 000 RUB" from the event alone, as every
    # other amount published says its currency. None: set before the ledger recorded it.
    currency: str | None


# A freeze's reason as published: a FreezeReason, or not_recorded for one made before freezes
# named theirs. compliance_review is the bank's to know: a message to the customer must not
# name it (tipping-off rules); the ledger's API shows it to her as by_the_bank.
PublishedFreezeReason = FreezeReason | Literal["not_recorded"]
assert FREEZE_REASON_NOT_RECORDED == "not_recorded"


@register("ledger.account_frozen", 2, LEDGER_TOPIC,
          "An account was frozen for a reason: no debits and no new holds while any freeze is left.")
class AccountFrozen(_Payload):
    account_id: str
    reason: PublishedFreezeReason
    # Every freeze on the account after this one, sorted. None only for a freeze stored
    # before the ledger recorded them (only development ledgers had such freezes).
    freezes_left: list[PublishedFreezeReason] | None


@register("ledger.account_unfrozen", 2, LEDGER_TOPIC,
          "One freeze of an account was lifted: the account is open again once no freeze is left.")
class AccountUnfrozen(_Payload):
    account_id: str
    reason: PublishedFreezeReason  # the freeze lifted; not_recorded: an unfreeze made before freezes named theirs
    freezes_left: list[PublishedFreezeReason] | None  # as in AccountFrozen: empty means open


@register("ledger.account_closed", 2, LEDGER_TOPIC, "An account with zero balance and no holds was closed, for a reason.")
class AccountClosed(_Payload):
    account_id: str
    reason: CloseReason | None  # None: closed before closings named their reason


# Version 1 of the three, published before they had reasons: records of it stay
# on the topic, and an analyst replaying it reads both. (Likewise TransferPostedV1, below.)

@register("ledger.account_frozen", 1, LEDGER_TOPIC, "An account was frozen: no debits until unfrozen.")
class AccountFrozenV1(_Payload):
    account_id: str


@register("ledger.account_unfrozen", 1, LEDGER_TOPIC, "A frozen account was unfrozen.")
class AccountUnfrozenV1(_Payload):
    account_id: str


@register("ledger.account_closed", 1, LEDGER_TOPIC, "An account with zero balance and no holds was closed.")
class AccountClosedV1(_Payload):
    account_id: str


@register("ledger.account_credit_limit_set", 1, LEDGER_TOPIC,
          "A customer account's credit limit (how far below zero it may go, in the account's currency) was set.")
class AccountCreditLimitSetV1(_Payload):
    account_id: str
    credit_limit_minor: int


class Leg(_Payload):
    account_id: str
    amount_minor: int  # positive credits the account, negative debits it
    currency: str


class PostedLeg(_Payload):
    account_id: str
    amount_minor: int  # positive credits the account, negative debits it
    currency: str
    # The customer owning the account: whom to tell "you paid" or "you were paid". None for
    # the bank's own accounts, and for every leg of a transfer stored before legs named
    # their customers (only development ledgers had such transfers).
    customer_id: str | None


@register("ledger.transfer_posted", 3, LEDGER_TOPIC,
          "A transfer of two or more legs summing to zero was posted; each leg names its account's customer, and a"
          " reversal names the transfer it reverses.")
class TransferPosted(_Payload):
    transfer_id: str
    code: str
    legs: list[PostedLeg]
    external_ref: str | None
    customer_ids: list[str]  # the client's free-form reference, as given: whom legs concern is on the legs
    metadata: dict[str, str]
    hold_id: str | None = None
    # A reversal (storno) names the transfer whose legs it moves back, and why; null otherwise.
    reverses: str | None
    reversal_reason: ReversalReason | None


@register("ledger.transfer_posted", 2, LEDGER_TOPIC,
          "A transfer of two or more legs summing to zero was posted; each leg names its account's customer.")
class TransferPostedV2(_Payload):
    transfer_id: str
    code: str
    legs: list[PostedLeg]
    external_ref: str | None
    customer_ids: list[str]
    metadata: dict[str, str]
    hold_id: str | None = None


@register("ledger.transfer_posted", 1, LEDGER_TOPIC, "A transfer of two or more legs summing to zero was posted.")
class TransferPostedV1(_Payload):
    transfer_id: str
    code: str
    legs: list[Leg]
    external_ref: str | None
    customer_ids: list[str]
    metadata: dict[str, str]
    hold_id: str | None = None


@register("ledger.hold_placed", 2, LEDGER_TOPIC,
          "Funds were reserved on an account until captured, voided or expired; with what they are for.")
class HoldPlaced(_Payload):
    hold_id: str
    debit_account_id: str
    credit_account_id: str
    amount: MoneyDTO
    expires_at: AwareDatetime
    code: str
    # Its poster's reference and what the hold is for (a card authorisation's RRN, the
    # merchant), which each capture's transfer carries too. None and {} on holds placed
    # before holds had references.
    external_ref: str | None
    metadata: dict[str, str]


@register("ledger.hold_placed", 1, LEDGER_TOPIC, "Funds were reserved on an account until captured, voided or expired.")
class HoldPlacedV1(_Payload):
    hold_id: str
    debit_account_id: str
    credit_account_id: str
    amount: MoneyDTO
    expires_at: AwareDatetime
    code: str


@register("ledger.hold_captured", 1, LEDGER_TOPIC, "Part or all of a hold was captured into a transfer.")
class HoldCaptured(_Payload):
    hold_id: str
    capture_id: str
    amount_minor: int
    transfer_id: str
    # ISO 4217, the hold's. Optional: holds captured before it was published have none.
    currency: str | None = None


@register("ledger.hold_voided", 1, LEDGER_TOPIC, "The remainder of a hold was released.")
class HoldVoided(_Payload):
    hold_id: str
    released_minor: int
    currency: str | None = None  # as in HoldCaptured


@register("ledger.hold_expired", 1, LEDGER_TOPIC, "A hold reached its deadline; its remainder was released.")
class HoldExpired(_Payload):
    hold_id: str
    released_minor: int
    currency: str | None = None  # as in HoldCaptured
