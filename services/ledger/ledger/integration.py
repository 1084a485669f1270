"""Domain events of the ledger -> its public integration events (kabinet_contracts.ledger).

The public facts are accounts opening, their credit limits, freezing and closing,
transfers and holds. Balances are not events of their own: subscribers add up transfer
legs and holds (and the credit limit, for what may be spent), or ask the ledger's API.
Every event about a customer's account or payment names her in the envelope's
customer_id; the bank, owner of the internal accounts, is never named there. A transfer
names the first customer owning one of its legs' accounts: the payer if a customer pays,
else the first customer paid; never one its client merely listed in `customer_ids`, a
free-form reference published as given. Each of its legs names its account's customer, so
that the payee is told "you were paid" from the event alone, with no account directory.
"""

from __future__ import annotations

from typing import Any

from kabinet_contracts import ledger as public
from kabinet_contracts.envelope import IntegrationEvent, event_id_for
from ledger.domain.stored import stored_later
from ledger.domain.transfer import customers_of

SOURCE = "ledger"

# Each published domain event: its public type and the schema version published now.
PUBLISHED_AS: dict[str, tuple[str, int]] = {
    "Account.Opened": ("ledger.account_opened", 1), "Account.CreditLimitSet": ("ledger.account_credit_limit_set", 2),
    "Account.Frozen": ("ledger.account_frozen", 2), "Account.Unfrozen": ("ledger.account_unfrozen", 2),
    "Account.Closed": ("ledger.account_closed", 2),
    "Transfer.Posted": ("ledger.transfer_posted", 3), "Hold.Placed": ("ledger.hold_placed", 2),
    "Hold.Captured": ("ledger.hold_captured", 1), "Hold.Voided": ("ledger.hold_voided", 1),
    "Hold.Expired": ("ledger.hold_expired", 1),
}


def _customer(owner_id: str | None) -> str | None:
    return None if owner_id in (None, public.BANK_OWNER_ID) else owner_id


def _transfer_customer(event: Any) -> str | None:
    """The customer a transfer concerns: the first of its legs' customers, payers first
    (`customers_of`). A transfer stored before its legs named their customers lists them
    (`leg_customer_ids`), or, stored earlier still, names the first customer its client
    gave, as the ledger published it then."""
    leg_owner_ids = stored_later(event, "leg_owner_ids")
    if leg_owner_ids is not None:
        named = customers_of(event.legs, leg_owner_ids)
    else:
        leg_customer_ids = stored_later(event, "leg_customer_ids")
        named = event.customer_ids if leg_customer_ids is None else leg_customer_ids
    return next((c for c in map(_customer, named) if c is not None), None)


def _freezes_left(event: Any, frozen: bool) -> list[str] | None:
    """The freezes a Frozen (`frozen`) or Unfrozen event left, as it recorded them. One stored
    before freezes had reasons left exactly one (its own) or none; one stored after that but
    before the list was recorded left an unknown set (None)."""
    if stored_later(event, "reason") is None:
        return [public.FREEZE_REASON_NOT_RECORDED] if frozen else []
    return stored_later(event, "freezes_left")


def to_integration(event: Any, position: int) -> IntegrationEvent | None:
    kind = type(event).__qualname__
    if kind not in PUBLISHED_AS:
        return None
    name, schema_version = PUBLISHED_AS[kind]
    occurred_at = event.timestamp  # the writer's batch time (domain/account.py), as statements have it
    payload: Any
    if kind == "Account.Opened":
        payload = public.AccountOpened(account_id=str(event.originator_id), owner_id=event.owner_id, kind=event.kind,
                                       currency=event.currency, credit_limit_minor=event.credit_limit_minor)
        customer_id = _customer(event.owner_id)
    elif kind == "Transfer.Posted":
        leg_owner_ids = stored_later(event, "leg_owner_ids") or [None] * len(event.legs)
        payload = public.TransferPosted(
            transfer_id=event.client_transfer_id, code=event.code,
            legs=[public.PostedLeg(**leg, customer_id=_customer(owner))
                  for leg, owner in zip(event.legs, leg_owner_ids, strict=True)],
            external_ref=event.external_ref, customer_ids=list(event.customer_ids), metadata=dict(event.metadata),
            hold_id=event.hold_id, reverses=stored_later(event, "reverses"),
            reversal_reason=stored_later(event, "reversal_reason"),
        )  # a reversal's case_ref is the bank's own case file: for staff and auditors, not published
        customer_id = _transfer_customer(event)
        # The posting time, which statements and balances at an instant read (the same as
        # the event's timestamp, which transfers stored before that rule did not have).
        occurred_at = event.posted_at
    elif kind == "Account.CreditLimitSet":
        payload = public.AccountCreditLimitSet(account_id=str(event.originator_id),
                                               credit_limit_minor=event.credit_limit_minor,
                                               currency=stored_later(event, "currency"))
        customer_id = _customer(stored_later(event, "customer_id"))
    elif kind in ("Account.Frozen", "Account.Unfrozen"):
        frozen = kind == "Account.Frozen"
        payload = (public.AccountFrozen if frozen else public.AccountUnfrozen)(
            account_id=str(event.originator_id), reason=stored_later(event, "reason") or public.FREEZE_REASON_NOT_RECORDED,
            freezes_left=_freezes_left(event, frozen))
        customer_id = _customer(stored_later(event, "customer_id"))
    elif kind == "Account.Closed":
        payload = public.AccountClosed(account_id=str(event.originator_id), reason=stored_later(event, "reason"))
        customer_id = _customer(stored_later(event, "customer_id"))
    elif kind == "Hold.Placed":
        payload = public.HoldPlaced(
            hold_id=event.client_hold_id, debit_account_id=event.debit_account_id,
            credit_account_id=event.credit_account_id,
            amount=public.MoneyDTO(amount_minor=event.amount_minor, currency=event.currency),
            expires_at=event.expires_at, code=event.code, external_ref=stored_later(event, "external_ref"),
            metadata=stored_later(event, "metadata") or {},
        )
        customer_id = _customer(stored_later(event, "debit_customer_id"))
    elif kind == "Hold.Captured":
        payload = public.HoldCaptured(hold_id=event.client_hold_id, capture_id=event.capture_id,
                                      amount_minor=event.amount_minor, transfer_id=event.transfer_id,
                                      currency=stored_later(event, "currency"))
        customer_id = _customer(stored_later(event, "debit_customer_id"))
    elif kind == "Hold.Voided":
        payload = public.HoldVoided(hold_id=event.client_hold_id, released_minor=event.released_minor,
                                    currency=stored_later(event, "currency"))
        customer_id = _customer(stored_later(event, "debit_customer_id"))
    else:  # Hold.Expired
        payload = public.HoldExpired(hold_id=event.client_hold_id, released_minor=event.released_minor,
                                     currency=stored_later(event, "currency"))
        customer_id = _customer(stored_later(event, "debit_customer_id"))
    return IntegrationEvent(
        event_id=event_id_for(SOURCE, position), type=name, schema_version=schema_version, source=SOURCE, position=position,
        aggregate_id=str(event.originator_id), aggregate_version=event.originator_version, occurred_at=occurred_at,
        customer_id=customer_id, payload=payload.model_dump(mode="json"),
    )
