"""A posted transfer: two or more legs summing to zero per currency; keyed by the client's id."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

IDS_CACHED_MAX = 4096
_TRANSFER_IDS = UUID("0b8f7e4c-7d0e-4d8a-9a4f-2f6f1c3b5a01")


class Transfer(Aggregate):
    """Immutable once posted: the record of who paid whom, why, and when.

    Its id is uuid5 of the client's transfer id, so a retried request finds it; the
    stored `request_fingerprint` tells a retry (same body) from a conflict (other body).
    A capture of a hold posts a transfer too, with the client id
    `capture_transfer_id(hold_id, capture_id)` (see batch.py) and `hold_id`/`capture_id` set.

    `customer_ids` is the client's free-form reference, kept as given; the customers the
    transfer concerns are those owning its legs' accounts: `leg_owner_ids` on the event, the
    customer of each leg's account in leg order (None for the bank's internal accounts),
    which the Batch gives from the accounts it loaded. Events stored before that field lack
    it (see `stored_later` in ledger/domain/stored.py); the defaults only let them replay. Of
    those, the later ones carry `leg_customer_ids` instead: the same customers as
    `customers_of` lists them, but no longer telling which leg is whose.
    """

    @staticmethod
    @lru_cache(maxsize=IDS_CACHED_MAX)  # the writer asks three times per command of a batch
    def create_id(client_transfer_id: str) -> UUID:
        return uuid5(_TRANSFER_IDS, client_transfer_id)

    @classmethod
    def id_for(cls, client_transfer_id: str) -> UUID:
        return cls.create_id(client_transfer_id=client_transfer_id)  # as eventsourcing calls it: one cache key

    @event("Posted")
    def __init__(
        self,
        client_transfer_id: str,
        legs: list[dict],
        code: str,
        external_ref: str | None,
        customer_ids: list[str],
        metadata: dict[str, str],
        request_fingerprint: str,
        posted_at: datetime,
        timestamp: datetime,  # = posted_at: the batch's time, as for every ledger event (see account.py)
        hold_id: str | None = None,
        capture_id: str | None = None,
        leg_customer_ids: list[str] | None = None,
        requested_by: str | None = None,
        leg_owner_ids: list[str | None] | None = None,
        reverses: str | None = None,
        reversal_reason: str | None = None,
        reversal_case_ref: str | None = None,
    ) -> None:
        self.client_transfer_id = client_transfer_id
        self.legs = legs  # {"account_id": str, "amount_minor": int, "currency": str}
        self.code = code
        self.external_ref = external_ref
        self.customer_ids = customer_ids
        self.metadata = metadata
        self.request_fingerprint = request_fingerprint
        self.posted_at = posted_at
        self.hold_id = hold_id  # set when this transfer is a hold's capture
        self.capture_id = capture_id
        self.reverses = reverses  # set when this transfer is a reversal: the client id of the one it reverses
        self.reversal_reason = reversal_reason
        self.reversal_case_ref = reversal_case_ref  # the bank's case that decided the reversal, if staff named one


def customers_of(legs: list[dict], leg_owner_ids: list[str | None]) -> list[str]:
    """The customers a transfer concerns, each once: payers (debited) first, then payees,
    each in leg order; the bank's internal accounts (None) name no one."""
    paying = [owner for leg, owner in zip(legs, leg_owner_ids, strict=True) if leg["amount_minor"] < 0]
    paid = [owner for leg, owner in zip(legs, leg_owner_ids, strict=True) if leg["amount_minor"] >= 0]
    return list(dict.fromkeys(owner for owner in paying + paid if owner is not None))
