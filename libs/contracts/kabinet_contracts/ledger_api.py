"""The bodies the ledger's HTTP API answers with (`/ledger/v1`), which the gateway's customer
API (`/v1/me`) passes on as they are: the success schemas of both OpenAPI documents.

Documentation only: the routes write these bodies themselves (ledger.projections and the
domain's results), so serving them changes no byte of an answer; tests/contract checks
real answers against these models. Every amount is an integer of minor units (kopecks,
cents), in the currency named beside it.
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Currency = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Money(_Body):
    amount_minor: int = Field(description="in minor units of `currency`; never a fraction")
    currency: str = Currency


class Balances(_Body):
    """An account's balances now."""

    posted: Money = Field(description="what the posted transfers leave on the account")
    pending: Money = Field(description="what its live holds reserve")
    available: Money = Field(description="what may be spent now: posted less pending plus the credit limit;"
                                         " 0 on a frozen or closed account")


class BalanceAt(_Body):
    """The posted balance as it stood just before `at` (what a statement from `at` opens with)."""

    at: AwareDatetime
    posted: Money


class Account(_Body):
    account_id: UUID
    owner_id: str = Field(description="the customer id (an access token's subject), or `bank` for internal accounts")
    kind: str = Field(description="card, savings, deposit, loan, rewards; or a bank-internal kind (settlement,"
                                  " fee_income, interest_expense, interest_income, cashback_expense,"
                                  " marketplace_clearing, suspense)")
    currency: str = Currency
    state: Literal["open", "frozen", "closed"] = Field(description="frozen: no debits; closed: no movements")
    freeze_reasons: list[str] = Field(description="why it is frozen: every freeze not lifted yet, by reason"
                                                  " (customer_request, fraud_suspected, court_order,"
                                                  " compliance_review; not_recorded for a freeze older than reasons);"
                                                  " empty unless frozen, or closed while she had frozen it herself"
                                                  " (customer_request: the one freeze an account closes under)."
                                                  " A customer's own token sees by_the_bank"
                                                  " for a reason the bank does not disclose (compliance_review)")
    close_reason: str | None = Field(description="why it was closed (customer_request, bank_decision,"
                                                 " customer_deceased, product_ended); null unless closed, or closed"
                                                 " before reasons were recorded")
    credit_limit_minor: int = Field(description="how far below zero the account may go, in its currency")
    balances: Balances
    opened_at: AwareDatetime


class AccountsPage(_Body):
    accounts: list[Account] = Field(description="in the order they were opened")
    next_cursor: UUID | None = Field(description="the next page's `cursor`; null on the last page")


class Line(_Body):
    """One movement of the account: its part of a transfer."""

    transfer_id: str
    code: str = Field(description="why the money moved (`top_up`, `card_payment`…)")
    amount_minor: int = Field(description="in the account's currency: positive credits the account, negative debits it")
    balance_after_minor: int = Field(description="the posted balance after this line, in the account's currency")
    occurred_at: AwareDatetime
    counterparty_account_ids: list[UUID] = Field(description="the accounts the money came from (a credit) or went to"
                                                             " (a debit)")
    external_ref: str | None
    metadata: dict[str, str] = Field(description="what its poster said the movement is for (the merchant of a card"
                                                 " purchase, a transfer's message), as shown to the accounts' owners")
    reverses: str | None = Field(description="on a reversal's line (code `reversal`): the transfer it moves back,"
                                             " whose line is on this account too")
    reversed_by: str | None = Field(description="the transfer that moved this line's money back, if one did: the"
                                                " movement was corrected, and the reversal's line is on this account")


class HistoryPage(_Body):
    """An account's lines, newest first."""

    account_id: UUID
    currency: str = Currency
    lines: list[Line]
    next_cursor: str | None = Field(description="the next page's `cursor`; null on the last page")


class StatementPage(_Body):
    """A statement of the period [since, until): its balances and totals, and its lines in
    posting order, a page at a time, every page as the period stood at the first."""

    account_id: UUID
    currency: str = Currency
    since: AwareDatetime
    until: AwareDatetime
    opening_balance_minor: int = Field(description="the posted balance just before `since`")
    closing_balance_minor: int = Field(description="the posted balance just before `until`")
    credits_minor: int = Field(ge=0, description="the period's credits, in total")
    debits_minor: int = Field(ge=0, description="the period's debits, in total (a positive number)")
    lines: list[Line]
    next_cursor: str | None = Field(description="the next page's `cursor`; null on the last page")


class Leg(_Body):
    account_id: UUID
    amount_minor: int = Field(description="positive credits the account, negative debits it")
    currency: str = Currency


class TransferPosted(_Body):
    transfer_id: str = Field(description="the client-given id")
    code: str
    legs: list[Leg] = Field(description="summing to zero per currency")
    posted_at: AwareDatetime
    hold_id: str | None = Field(description="the hold it captured, if it did")
    replayed: bool = Field(description="true when this transfer id was already posted: nothing moved again")


class Transfer(_Body):
    """A posted transfer as its poster gave it, and who asked for it: for the bank's
    services, staff and auditors."""

    transfer_id: str = Field(description="the client-given id")
    code: str
    legs: list[Leg] = Field(description="summing to zero per currency")
    external_ref: str | None
    customer_ids: list[str] = Field(description="the customers its poster named, as given")
    metadata: dict[str, str]
    posted_at: AwareDatetime
    requested_by: str | None = Field(description="the subject of the access token that asked for it (a service, a"
                                                 " member of staff), or `ledger` for what the ledger did by itself;"
                                                 " null on transfers posted before the ledger recorded it")
    reverses: str | None = Field(description="on a reversal (code `reversal`): the transfer whose legs it moves back")
    reversal_reason: str | None = Field(description="on a reversal: why (posted_in_error, duplicate, fraud_confirmed,"
                                                    " dispute_upheld)")
    reversal_case_ref: str | None = Field(description="on a reversal: the bank's case that decided it, if staff named"
                                                      " one")
    reversed_by: str | None = Field(description="the transfer that reversed this one, if one did")


class TransfersPage(_Body):
    transfers: list[Transfer] = Field(description="in posting order")
    next_cursor: str | None = Field(description="the next page's `cursor`; null on the last page")


class Hold(_Body):
    hold_id: str = Field(description="the client-given id")
    state: Literal["active", "captured", "voided", "expired"]
    amount_minor: int = Field(description="what was held, in the currency it was placed in")
    captured_minor: int = Field(description="what its captures took, in that currency")
    remaining_minor: int = Field(description="what it still holds, in that currency")
    expires_at: AwareDatetime
    transfer_id: str | None = Field(description="on a capture: the transfer that moved the captured money")
    replayed: bool = Field(description="true when this command had already been applied: nothing changed again")



class PlacedHold(_Body):
    """A hold as it stands: what it reserves on the debit account for the credit account."""

    hold_id: str = Field(description="the client-given id")
    state: Literal["active", "captured", "voided", "expired"]
    debit_account_id: UUID = Field(description="the account whose money it reserves")
    credit_account_id: UUID = Field(description="the account its captures pay into")
    currency: str = Currency
    amount_minor: int = Field(description="what was held, in `currency`")
    captured_minor: int = Field(description="what its captures took")
    remaining_minor: int = Field(description="what it still reserves: 0 once captured in full, voided or expired")
    code: str = Field(description="why the money is held (`card_purchase`…)")
    external_ref: str | None = Field(description="its poster's reference (a card authorisation's RRN, say)")
    metadata: dict[str, str] = Field(description="what its poster said it is for (the merchant, say)")
    placed_at: AwareDatetime
    expires_at: AwareDatetime = Field(description="when what is left is released, unless captured or voided first")


class HoldsPage(_Body):
    holds: list[PlacedHold] = Field(description="in the order they were placed")
    next_cursor: str | None = Field(description="the next page's `cursor`; null on the last page")


class PendingHold(_Body):
    """A live hold on the account: money reserved but not moved yet (a card purchase awaiting
    its clearing, say)."""

    hold_id: str
    code: str = Field(description="why the money is held (`card_purchase`…)")
    external_ref: str | None = Field(description="its poster's reference (a card authorisation's RRN, say)")
    metadata: dict[str, str] = Field(description="what its poster said it is for (the merchant, say)")
    amount_minor: int = Field(description="what it still reserves, in the account's currency: negative reserves the"
                                          " account's money, positive will pay into it")
    captured_minor: int = Field(description="what its captures have moved already")
    counterparty_account_id: UUID = Field(description="the account the money will go to (negative) or come from")
    placed_at: AwareDatetime
    expires_at: AwareDatetime = Field(description="when it is released, unless captured or voided first")


class PendingHoldsPage(_Body):
    """An account's live holds, newest first: the amounts of those reserving its money (negative)
    add up to its `pending` balance, negated."""

    account_id: UUID
    currency: str = Currency
    holds: list[PendingHold]
    next_cursor: str | None = Field(description="the next page's `cursor`; null on the last page")


# The query parameters of the customer API's reads, as the gateway passes them on to the
# ledger (which checks them: the ledger declares its own, and tests/contract checks the two agree).

class AccountsQuery(BaseModel):
    cursor: UUID | None = Field(default=None, description="the `next_cursor` of the page before")
    limit: int = Field(default=100, ge=1, le=100, description="the most accounts on the page")


class BalanceQuery(BaseModel):
    at: AwareDatetime | None = Field(default=None, description="the posted balance as it stood just before this"
                                                               " instant, instead of the balances now")


class HistoryQuery(BaseModel):
    since: AwareDatetime | None = Field(default=None, description="lines from this instant on")
    until: AwareDatetime | None = Field(default=None, description="lines before this instant")
    amount_min_minor: int | None = Field(default=None, ge=0, le=10**15,
                                         description="lines of at least this amount, credit or debit")
    amount_max_minor: int | None = Field(default=None, ge=0, le=10**15,
                                         description="lines of at most this amount, credit or debit")
    counterparty_account_id: UUID | None = Field(default=None, description="lines with money from or to this account")
    code: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,63}$", description="lines of this code")
    cursor: str | None = Field(default=None, pattern=r"^\d{1,18}\.\d{1,4}$",
                               description="the `next_cursor` of the page before")
    limit: int = Field(default=50, ge=1, le=200, description="the most lines on the page")


class PendingHoldsQuery(BaseModel):
    cursor: str | None = Field(default=None, pattern=r"^\d{1,18}$", description="the `next_cursor` of the page before")
    limit: int = Field(default=50, ge=1, le=200, description="the most holds on the page")


class StatementQuery(BaseModel):
    since: AwareDatetime = Field(description="the period's first instant")
    until: AwareDatetime = Field(description="the instant the period ends before")
    cursor: str | None = Field(default=None, pattern=r"^\d{1,18}\.\d{1,4}\.\d{1,18}$",
                               description="the `next_cursor` of the page before")
    limit: int = Field(default=5000, ge=1, le=5000, description="the most lines on the page")
