"""A hold: funds reserved on one account for a later capture into another, until a deadline."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

_HOLD_IDS = UUID("5d2c1e7a-3b4f-4c6d-8e9f-0a1b2c3d4e02")


class HoldState(StrEnum):
    ACTIVE = "active"
    CAPTURED = "captured"  # fully
    VOIDED = "voided"
    EXPIRED = "expired"


class Hold(Aggregate):
    @staticmethod
    def create_id(client_hold_id: str) -> UUID:
        return uuid5(_HOLD_IDS, client_hold_id)

    @classmethod
    def id_for(cls, client_hold_id: str) -> UUID:
        return cls.create_id(client_hold_id)

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
    ) -> None:
        self.client_hold_id = client_hold_id
        self.debit_account_id = debit_account_id
        self.credit_account_id = credit_account_id
        self.amount_minor = amount_minor
        self.currency = currency
        self.expires_at = expires_at
        self.code = code
        self.request_fingerprint = request_fingerprint
        self.captured_minor = 0
        self.released_minor = 0
        self.state = HoldState.ACTIVE.value
        self.captures: dict[str, int] = {}  # capture id -> amount, for idempotent retries

    @property
    def remaining_minor(self) -> int:
        return self.amount_minor - self.captured_minor - self.released_minor

    @event("Captured")
    def capture(self, client_hold_id: str, capture_id: str, amount_minor: int, transfer_id: str) -> None:
        self.captured_minor += amount_minor
        self.captures[capture_id] = amount_minor
        if self.remaining_minor == 0:
            self.state = HoldState.CAPTURED.value

    @event("Voided")
    def void(self, client_hold_id: str, released_minor: int) -> None:
        self.released_minor += released_minor
        self.state = HoldState.VOIDED.value

    @event("Expired")
    def expire(self, client_hold_id: str, released_minor: int) -> None:
        self.released_minor += released_minor
        self.state = HoldState.EXPIRED.value
