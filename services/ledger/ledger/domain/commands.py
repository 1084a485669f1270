"""Commands to the ledger (imperative), and the shape rules every one must pass first."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from ledger.domain.errors import InvalidTransfer, UnbalancedTransfer

LEGS_MIN = 2
LEGS_MAX = 64
METADATA_KEYS_MAX = 32
METADATA_VALUE_CHARS_MAX = 256
CUSTOMER_IDS_MAX = 16
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


@dataclass(frozen=True)
class OpenAccount:
    account_id: UUID
    owner_id: str
    kind: str
    currency: str
    credit_limit_minor: int = 0


@dataclass(frozen=True)
class FreezeAccount:
    account_id: UUID


@dataclass(frozen=True)
class UnfreezeAccount:
    account_id: UUID


@dataclass(frozen=True)
class CloseAccount:
    account_id: UUID


@dataclass(frozen=True)
class SetCreditLimit:
    account_id: UUID
    credit_limit_minor: int


@dataclass(frozen=True)
class Leg:
    account_id: UUID
    amount_minor: int  # positive credits the account, negative debits it
    currency: str


@dataclass(frozen=True)
class PostTransfer:
    transfer_id: str
    legs: tuple[Leg, ...]
    code: str
    external_ref: str | None = None
    customer_ids: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlaceHold:
    hold_id: str
    debit_account_id: UUID
    credit_account_id: UUID
    amount_minor: int
    currency: str
    expires_at: datetime
    code: str


@dataclass(frozen=True)
class CaptureHold:
    hold_id: str
    capture_id: str
    amount_minor: int


@dataclass(frozen=True)
class VoidHold:
    hold_id: str


@dataclass(frozen=True)
class ExpireHold:
    hold_id: str


def fingerprint(command: Any) -> str:
    """sha256 of the command's canonical JSON: the same body gives the same fingerprint."""
    canonical = json.dumps(asdict(command), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_client_id(value: str, what: str) -> None:
    if not _CLIENT_ID.match(value):
        raise InvalidTransfer(f"{what} {value!r} must be 1-128 letters, digits, '.', '_', ':' or '-'")


def check_code(code: str) -> None:
    if not _CODE.match(code):
        raise InvalidTransfer(f"code {code!r} must be lower_snake_case, at most 64 characters")


def check_transfer_shape(command: PostTransfer) -> None:
    check_client_id(command.transfer_id, "transfer_id")
    check_code(command.code)
    if not LEGS_MIN <= len(command.legs) <= LEGS_MAX:
        raise InvalidTransfer(f"a transfer has {LEGS_MIN} to {LEGS_MAX} legs, got {len(command.legs)}")
    accounts = [leg.account_id for leg in command.legs]
    if len(set(accounts)) != len(accounts):
        raise InvalidTransfer("each account may appear in only one leg of a transfer")
    sums: dict[str, int] = {}
    for index, leg in enumerate(command.legs):
        if type(leg.amount_minor) is not int or leg.amount_minor == 0:
            raise InvalidTransfer(f"legs[{index}].amount_minor must be a non-zero integer")
        sums[leg.currency] = sums.get(leg.currency, 0) + leg.amount_minor
    unbalanced = {currency: total for currency, total in sums.items() if total != 0}
    if unbalanced:
        raise UnbalancedTransfer(f"legs must sum to zero per currency; off by {unbalanced}")
    if len(command.metadata) > METADATA_KEYS_MAX or any(
        len(k) > METADATA_VALUE_CHARS_MAX or len(v) > METADATA_VALUE_CHARS_MAX for k, v in command.metadata.items()
    ):
        raise InvalidTransfer(f"metadata holds at most {METADATA_KEYS_MAX} keys of at most {METADATA_VALUE_CHARS_MAX} chars")
    if len(command.customer_ids) > CUSTOMER_IDS_MAX:
        raise InvalidTransfer(f"at most {CUSTOMER_IDS_MAX} customer ids")


def check_hold_shape(command: PlaceHold) -> None:
    check_client_id(command.hold_id, "hold_id")
    check_code(command.code)
    if type(command.amount_minor) is not int or command.amount_minor <= 0:
        raise InvalidTransfer("a hold's amount_minor must be a positive integer")
    if command.debit_account_id == command.credit_account_id:
        raise InvalidTransfer("a hold's debit and credit accounts must differ")
    if command.expires_at.tzinfo is None:
        raise InvalidTransfer("expires_at must carry a timezone")
