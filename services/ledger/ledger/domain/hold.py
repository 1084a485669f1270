"""A hold: funds reserved on one account for a later capture into another, until a deadline."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from ledger.domain.errors import CaptureExceedsHold, HoldNotActive, IdempotencyConflict, InvalidHold

IDS_CACHED_MAX = 4096
# A hold is settled in at most this many captures. Each capture is an event on the hold's
# stream, which the one writer replays whenever it loads the hold (there are no snapshots):
# a client capturing a kopeck at a time would otherwise grow it without end and stall every
# payment behind that load. Card networks split one purchase's clearing into far fewer parts.
CAPTURES_PER_HOLD_MAX = 100
_HOLD_IDS = UUID("5d2c1e7a-3b4f-4c6d-8e9f-0a1b2c3d4e02")


class HoldState(StrEnum):
    ACTIVE = "active"
    CAPTURED = "captured"  # fully
    VOIDED = "voided"
    EXPIRED = "expired"


class Hold(Aggregate):
    """Funds reserved on `debit_account_id` until captured (in parts) into `credit_account_id`,
    voided, or expired at `expires_at`. Keyed by the client's hold id (uuid5).

    The reservation counts in the debit account's `Balance.held_minor`, kept by the writer
    from these events; the hold remembers each capture id and its amount, so a retried
    capture is answered, not applied twice.
    """

    @staticmethod
    @lru_cache(maxsize=IDS_CACHED_MAX)  # the writer asks three times per command of a batch
    def create_id(client_hold_id: str) -> UUID:
        return uuid5(_HOLD_IDS, client_hold_id)

    @classmethod
    def id_for(cls, client_hold_id: str) -> UUID:
        return cls.create_id(client_hold_id=client_hold_id)  # as eventsourcing calls it: one cache key

    @event("Placed")
    def __init__(
        self,
        client_hold_id: str,
        debit_account_id: str,
        credit_account_id: str,
        amount_minor: int,
        currency: str,
        expires_at: datetime,
        code: str,
        request_fingerprint: str,
        timestamp: datetime,  # the batch's time, as for every ledger event (see account.py)
        debit_customer_id: str | None = None,
        requested_by: str | None = None,
        external_ref: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.client_hold_id = client_hold_id
        self.debit_account_id = debit_account_id
        self.credit_account_id = credit_account_id
        self.amount_minor = amount_minor
        self.currency = currency
        self.expires_at = expires_at
        self.code = code
        # What the hold is for (a card authorisation's RRN, the merchant), which each of its
        # captures posts with; none on holds placed before holds had references.
        self.external_ref = external_ref
        self.metadata = metadata or {}
        self.request_fingerprint = request_fingerprint
        self.captured_minor = 0
        self.released_minor = 0
        self.state = HoldState.ACTIVE.value
        self.captures: dict[str, int] = {}  # capture id -> amount, for idempotent retries

    @property
    def remaining_minor(self) -> int:
        return self.amount_minor - self.captured_minor - self.released_minor

    # Public commands check their rule, then trigger the event (a private method). The
    # Batch checks the same rules (and the deadline, which needs `now`) before calling.

    # Every event of a hold names the customer who pays (the debit account's; None for the
    # bank's own), given by the Batch, which has that account at hand: a subscriber tells
    # her "500 RUB were authorised on your card" from the event alone. The later events name
    # the hold's currency too, so that an amount on its own is never "500 of something".
    # Events stored before they did lack these fields (see `stored_later` in
    # ledger/domain/stored.py); the defaults only let the aggregate replay them.

    def capture(self, client_hold_id: str, capture_id: str, amount_minor: int, transfer_id: str,
                debit_customer_id: str | None, at: datetime, requested_by: str | None) -> None:
        self._check_active()
        if type(amount_minor) is not int or amount_minor <= 0:
            raise InvalidHold(f"a capture of hold {self.client_hold_id} must be a positive integer amount_minor")
        if amount_minor > self.remaining_minor:
            raise CaptureExceedsHold(
                f"capture of {amount_minor} exceeds the {self.remaining_minor} {self.currency} (minor units)"
                f" left on hold {self.client_hold_id}"
            )
        if capture_id in self.captures:
            raise IdempotencyConflict(f"capture {capture_id} of hold {self.client_hold_id} was recorded before")
        self.check_room_for_a_capture()
        self._capture(client_hold_id=client_hold_id, capture_id=capture_id, amount_minor=amount_minor,
                      transfer_id=transfer_id, timestamp=at, currency=self.currency,
                      debit_customer_id=debit_customer_id, requested_by=requested_by)

    def void(self, client_hold_id: str, released_minor: int, debit_customer_id: str | None, at: datetime,
             requested_by: str | None) -> None:
        self._check_release(released_minor)
        self._void(client_hold_id=client_hold_id, released_minor=released_minor, timestamp=at, currency=self.currency,
                   debit_customer_id=debit_customer_id, requested_by=requested_by)

    def expire(self, client_hold_id: str, released_minor: int, debit_customer_id: str | None, at: datetime,
               requested_by: str | None) -> None:
        self._check_release(released_minor)
        self._expire(client_hold_id=client_hold_id, released_minor=released_minor, timestamp=at,
                     currency=self.currency, debit_customer_id=debit_customer_id, requested_by=requested_by)

    def check_room_for_a_capture(self) -> None:
        if len(self.captures) >= CAPTURES_PER_HOLD_MAX:
            raise CaptureExceedsHold(
                f"hold {self.client_hold_id} has had its {CAPTURES_PER_HOLD_MAX} captures, the most a hold takes;"
                f" the {self.remaining_minor} {self.currency} (minor units) left are released by a void or at expiry"
            )

    def _check_active(self) -> None:
        if self.state != HoldState.ACTIVE:
            raise HoldNotActive(f"hold {self.client_hold_id} is {self.state}")

    def _check_release(self, released_minor: int) -> None:
        self._check_active()
        # Programmer error, not a refusal: a release frees exactly what is left.
        assert released_minor == self.remaining_minor, (released_minor, self.remaining_minor)

    @event("Captured")
    def _capture(self, client_hold_id: str, capture_id: str, amount_minor: int, transfer_id: str,
                 timestamp: datetime, currency: str | None = None, debit_customer_id: str | None = None,
                 requested_by: str | None = None) -> None:
        self.captured_minor += amount_minor
        self.captures[capture_id] = amount_minor
        if self.remaining_minor == 0:
            self.state = HoldState.CAPTURED.value

    @event("Voided")
    def _void(self, client_hold_id: str, released_minor: int, timestamp: datetime, currency: str | None = None,
              debit_customer_id: str | None = None, requested_by: str | None = None) -> None:
        self.released_minor += released_minor
        self.state = HoldState.VOIDED.value

    @event("Expired")
    def _expire(self, client_hold_id: str, released_minor: int, timestamp: datetime, currency: str | None = None,
                debit_customer_id: str | None = None, requested_by: str | None = None) -> None:
        self.released_minor += released_minor
        self.state = HoldState.EXPIRED.value
