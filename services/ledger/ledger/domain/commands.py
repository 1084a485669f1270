"""Commands to the ledger (imperative), and the shape rules every one must pass first."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, is_dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar
from uuid import UUID

from kabinet_contracts.ledger import ReversalReason
from ledger.domain.account import BANK_OWNER, CREDIT_LIMIT_MINOR_MAX, INTERNAL_KINDS, AccountKind
from ledger.domain.errors import InvalidAccount, InvalidHold, InvalidTransfer, UnbalancedTransfer

LEGS_MIN = 2
LEGS_MAX = 64
METADATA_KEYS_MAX = 32
METADATA_VALUE_CHARS_MAX = 256
CUSTOMER_IDS_MAX = 16
ID_CHARS_MAX = 128  # owner ids, customer ids, external refs
# One leg, hold or capture moves at most 10^15 minor units (10^13 roubles): far below
# PostgreSQL's bigint (9.2e18) in the read model, so balances summing many still fit.
AMOUNT_MINOR_MAX = 10**15
# A capture posts a transfer whose client id is f"{hold_id}{CAPTURE_INFIX}{capture_id}".
# Client transfer ids may not contain the infix, so no client id can ever equal a
# capture's. Hold and capture ids may not contain it either, nor touch it from outside (a
# hold id ending in ":capture", a capture id starting with "capture:": the infix begins
# and ends with ':'), so the infix occurs once and two different (hold, capture) pairs
# never give the same id.
CAPTURE_INFIX = ":capture:"
# A reversal posts a transfer whose client id is the reversed one's with this suffix, so a
# transfer has at most one. Client transfer ids and capture ids may not end with it (a
# capture's transfer id ends with its capture id), so none can be taken for a reversal's.
REVERSAL_SUFFIX = ":reversal"
REVERSAL_CODE = "reversal"
REVERSAL_REASONS = frozenset(ReversalReason)
# The longest client id a posted transfer can have: a capture's, f"{hold_id}{CAPTURE_INFIX}{capture_id}".
POSTED_TRANSFER_ID_CHARS_MAX = 2 * ID_CHARS_MAX + len(CAPTURE_INFIX)
REQUESTED_BY_LEDGER = "ledger"  # who asks for what the ledger does by itself (a hold's expiry)
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# Instants a hold may expire at: far wider than any card authorisation, and narrow enough
# that converting one to UTC can never leave the calendar Python and PostgreSQL know.
INSTANT_MIN = datetime(2000, 1, 1, tzinfo=UTC)
INSTANT_MAX = datetime(9000, 1, 1, tzinfo=UTC)


def is_storable_text(value: Any) -> bool:
    """Text PostgreSQL can store and UTF-8 can encode: no NUL, no lone surrogate.

    One such character in a committed event would stop every reader of the log at it
    (the read model, the relay), so the ledger refuses it at the door.
    """
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Command:
    """What every command carries besides its request: who asked for it (the access token's
    subject: a service, a member of staff, a customer; REQUESTED_BY_LEDGER for what the
    ledger does by itself), recorded on its events for auditors. It is not part of the
    request (`fingerprint`): the same body from another caller is the same request."""

    requested_by: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class OpenAccount(Command):
    account_id: UUID
    owner_id: str
    kind: str
    currency: str
    credit_limit_minor: int = 0


@dataclass(frozen=True)
class FreezeAccount(Command):
    account_id: UUID
    reason: str  # a FreezeReason


@dataclass(frozen=True)
class UnfreezeAccount(Command):
    account_id: UUID
    reason: str  # the FreezeReason of the freeze it lifts


@dataclass(frozen=True)
class CloseAccount(Command):
    account_id: UUID
    reason: str  # a CloseReason


@dataclass(frozen=True)
class SetCreditLimit(Command):
    account_id: UUID
    credit_limit_minor: int


@dataclass(frozen=True)
class Leg:
    account_id: UUID
    amount_minor: int  # positive credits the account, negative debits it
    currency: str


@dataclass(frozen=True)
class PostTransfer(Command):
    transfer_id: str
    legs: tuple[Leg, ...]
    code: str
    external_ref: str | None = None
    customer_ids: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReverseTransfer(Command):
    """Move a posted transfer's money back (storno): a new transfer of its legs negated."""

    transfer_id: str  # the client id of the transfer to reverse
    reason: str  # a ReversalReason
    case_ref: str | None = None  # the bank's case that decided it (a dispute, a ticket, a memo): for auditors

    FINGERPRINTED_ONLY_IF_GIVEN: ClassVar[tuple[str, ...]] = ("case_ref",)


@dataclass(frozen=True)
class PlaceHold(Command):
    hold_id: str
    debit_account_id: UUID
    credit_account_id: UUID
    amount_minor: int
    currency: str
    expires_at: datetime
    code: str
    # What the hold is for, as a transfer's references say it (a card authorisation's RRN,
    # the merchant): each of its captures posts with them.
    external_ref: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Given later than the fields above: left out of the fingerprint while empty, so a
    # retry of a hold placed before them still fingerprints as it did.
    FINGERPRINTED_ONLY_IF_GIVEN: ClassVar[tuple[str, ...]] = ("external_ref", "metadata")


@dataclass(frozen=True)
class CaptureHold(Command):
    hold_id: str
    capture_id: str
    amount_minor: int


@dataclass(frozen=True)
class VoidHold(Command):
    hold_id: str


@dataclass(frozen=True)
class ExpireHold(Command):
    hold_id: str


def _canonical(value: Any) -> Any:
    if is_dataclass(value):
        return value.__dict__  # a Leg inside a command: json.dumps walks its fields
    if isinstance(value, datetime):
        # One instant, one fingerprint, whatever offset the caller wrote it in.
        # (str() of a UTC datetime, as fingerprints were computed before this rule.)
        return str(value.astimezone(UTC))
    return str(value)


def fingerprint(command: Any) -> str:
    """sha256 of the command's canonical JSON: the same body gives the same fingerprint.

    Keys sorted, no whitespace, UUIDs as strings, datetimes in UTC; tuples and lists
    are the same JSON array. A field a command gained later counts only when given.
    """
    # command.__dict__ rather than asdict(): the same JSON without asdict's deep copy,
    # which was the writer's costliest step per transfer.
    only_if_given = getattr(command, "FINGERPRINTED_ONLY_IF_GIVEN", ())
    request = {name: value for name, value in command.__dict__.items()
               if name != "requested_by" and (name not in only_if_given or value)}
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_client_id(value: str, what: str, error: type[InvalidTransfer] = InvalidTransfer) -> None:
    if not isinstance(value, str) or not _CLIENT_ID.match(value):
        raise error(f"{what} {value!r} must be 1-128 letters, digits, '.', '_', ':' or '-'")


def check_code(code: str, error: type[InvalidTransfer] = InvalidTransfer) -> None:
    if not isinstance(code, str) or not _CODE.match(code):
        raise error(f"code {code!r} must be lower_snake_case, at most 64 characters")
    if code == REVERSAL_CODE:  # else a plain transfer would show in history as a reversal of nothing
        raise error(f"code {code!r} is the ledger's own: a transfer is reversed by asking for its reversal,"
                    " which names the transfer it reverses")


def _check_amount(amount_minor: Any, what: str, error: type[InvalidTransfer]) -> None:
    if type(amount_minor) is not int or not 0 < abs(amount_minor) <= AMOUNT_MINOR_MAX:
        raise error(f"{what} must be a non-zero integer of at most {AMOUNT_MINOR_MAX} in absolute value, got {amount_minor!r}")


def check_account_shape(command: OpenAccount) -> None:
    """Kind, currency, owner and credit limit of a new account (InvalidAccount)."""
    try:
        kind = AccountKind(command.kind)
    except ValueError:
        raise InvalidAccount(f"unknown account kind {command.kind!r}; one of {[k.value for k in AccountKind]}") from None
    if not isinstance(command.currency, str) or not _CURRENCY.match(command.currency):
        raise InvalidAccount(f"currency must be an ISO 4217 code like 'RUB', got {command.currency!r}")
    if not is_storable_text(command.owner_id) or not 1 <= len(command.owner_id) <= ID_CHARS_MAX:
        raise InvalidAccount(f"owner_id must be 1-{ID_CHARS_MAX} characters, without NUL or lone surrogates")
    if type(command.credit_limit_minor) is not int or not 0 <= command.credit_limit_minor <= CREDIT_LIMIT_MINOR_MAX:
        raise InvalidAccount(f"credit_limit_minor must be an integer from 0 to {CREDIT_LIMIT_MINOR_MAX}")
    if kind in INTERNAL_KINDS:
        if command.owner_id != BANK_OWNER:
            raise InvalidAccount(f"bank-internal accounts ({kind.value}) belong to {BANK_OWNER!r}, not {command.owner_id!r}")
        if command.credit_limit_minor:
            raise InvalidAccount("bank-internal accounts carry no credit limit")
    elif command.owner_id == BANK_OWNER:
        raise InvalidAccount(f"customer accounts ({kind.value}) belong to a customer, not to the bank")


def check_transfer_shape(command: PostTransfer) -> None:
    check_client_id(command.transfer_id, "transfer_id")
    if CAPTURE_INFIX in command.transfer_id:
        raise InvalidTransfer(f"transfer_id {command.transfer_id!r} must not contain {CAPTURE_INFIX!r} (reserved for captures)")
    if command.transfer_id.endswith(REVERSAL_SUFFIX):
        raise InvalidTransfer(f"transfer_id {command.transfer_id!r} must not end with {REVERSAL_SUFFIX!r}"
                              " (reserved for reversals)")
    check_code(command.code)
    if not LEGS_MIN <= len(command.legs) <= LEGS_MAX:
        raise InvalidTransfer(f"a transfer has {LEGS_MIN} to {LEGS_MAX} legs, got {len(command.legs)}")
    accounts = [leg.account_id for leg in command.legs]
    if len(set(accounts)) != len(accounts):
        repeated = sorted({str(a) for a in accounts if accounts.count(a) > 1})
        raise InvalidTransfer(f"each account may appear in only one leg of a transfer; repeated: {repeated}")
    sums: dict[str, int] = {}
    for index, leg in enumerate(command.legs):
        _check_amount(leg.amount_minor, f"legs[{index}].amount_minor", InvalidTransfer)
        if not isinstance(leg.currency, str) or not _CURRENCY.match(leg.currency):
            raise InvalidTransfer(f"legs[{index}].currency must be an ISO 4217 code like 'RUB', got {leg.currency!r}")
        sums[leg.currency] = sums.get(leg.currency, 0) + leg.amount_minor
    unbalanced = {currency: total for currency, total in sorted(sums.items()) if total != 0}
    if unbalanced:
        raise UnbalancedTransfer(f"legs must sum to zero per currency; off by {unbalanced} (minor units)")
    _check_references(command.external_ref, command.metadata, InvalidTransfer)
    if len(command.customer_ids) > CUSTOMER_IDS_MAX or any(
        not is_storable_text(i) or not 1 <= len(i) <= ID_CHARS_MAX for i in command.customer_ids
    ):
        raise InvalidTransfer(f"at most {CUSTOMER_IDS_MAX} customer ids of 1-{ID_CHARS_MAX} characters,"
                              " without NUL or lone surrogates")


def _check_references(external_ref: Any, metadata: Any, error: type[InvalidTransfer]) -> None:
    """A transfer's or a hold's external_ref and metadata."""
    if not isinstance(metadata, dict) or len(metadata) > METADATA_KEYS_MAX or any(
        not is_storable_text(k) or not is_storable_text(v) or len(k) > METADATA_VALUE_CHARS_MAX
        or len(v) > METADATA_VALUE_CHARS_MAX
        for k, v in metadata.items()
    ):
        raise error(
            f"metadata holds at most {METADATA_KEYS_MAX} string keys and values of at most {METADATA_VALUE_CHARS_MAX} chars,"
            " without NUL or lone surrogates"
        )
    if external_ref is not None and (not is_storable_text(external_ref) or not 1 <= len(external_ref) <= ID_CHARS_MAX):
        raise error(f"external_ref must be 1-{ID_CHARS_MAX} characters, without NUL or lone surrogates")


def _check_hold_id(hold_id: Any) -> None:
    check_client_id(hold_id, "hold_id", InvalidHold)
    if CAPTURE_INFIX in hold_id or hold_id.endswith(CAPTURE_INFIX[:-1]):
        raise InvalidHold(f"hold_id {hold_id!r} must not contain {CAPTURE_INFIX!r} nor end with {CAPTURE_INFIX[:-1]!r}")


def check_hold_shape(command: PlaceHold) -> None:
    _check_hold_id(command.hold_id)
    check_code(command.code, InvalidHold)
    _check_amount(command.amount_minor, "a hold's amount_minor", InvalidHold)
    if command.amount_minor < 0:
        raise InvalidHold(f"a hold's amount_minor must be positive, got {command.amount_minor}")
    if not isinstance(command.currency, str) or not _CURRENCY.match(command.currency):
        raise InvalidHold(f"currency must be an ISO 4217 code like 'RUB', got {command.currency!r}")
    if command.debit_account_id == command.credit_account_id:
        raise InvalidHold(f"a hold's debit and credit accounts must differ; both are {command.debit_account_id}")
    if not isinstance(command.expires_at, datetime) or command.expires_at.utcoffset() is None:
        raise InvalidHold("expires_at must be a datetime with a timezone")
    if not INSTANT_MIN <= command.expires_at < INSTANT_MAX:
        raise InvalidHold(f"expires_at must be from {INSTANT_MIN.isoformat()} to before {INSTANT_MAX.isoformat()}")
    _check_references(command.external_ref, command.metadata, InvalidHold)


def check_capture_shape(command: CaptureHold) -> None:
    # A hold id no hold can have is malformed, not a hold that is not there (which is kept, refusal.py).
    _check_hold_id(command.hold_id)
    check_client_id(command.capture_id, "capture_id", InvalidHold)
    if CAPTURE_INFIX in command.capture_id or command.capture_id.startswith(CAPTURE_INFIX[1:]):
        raise InvalidHold(
            f"capture_id {command.capture_id!r} must not contain {CAPTURE_INFIX!r} nor start with {CAPTURE_INFIX[1:]!r}"
        )
    if command.capture_id.endswith(REVERSAL_SUFFIX):
        raise InvalidHold(f"capture_id {command.capture_id!r} must not end with {REVERSAL_SUFFIX!r} (reserved for reversals)")
    _check_amount(command.amount_minor, "a capture's amount_minor", InvalidHold)
    if command.amount_minor < 0:
        raise InvalidHold(f"a capture's amount_minor must be positive, got {command.amount_minor}")


def check_reversal_shape(command: ReverseTransfer) -> None:
    """A transfer id one could have posted or captured under, which is not a reversal's own."""
    if not isinstance(command.transfer_id, str) or not 1 <= len(command.transfer_id) <= POSTED_TRANSFER_ID_CHARS_MAX:
        raise InvalidTransfer(f"transfer_id must be 1-{POSTED_TRANSFER_ID_CHARS_MAX} characters")
    if command.transfer_id.endswith(REVERSAL_SUFFIX):
        raise InvalidTransfer(f"transfer {command.transfer_id} is a reversal; to move its money again, post a transfer")
    if command.reason not in REVERSAL_REASONS:
        raise InvalidTransfer(f"unknown reversal reason {command.reason!r}; one of {sorted(REVERSAL_REASONS)}")
    if command.case_ref is not None and (not is_storable_text(command.case_ref)
                                         or not 1 <= len(command.case_ref) <= ID_CHARS_MAX):
        raise InvalidTransfer(f"case_ref must be 1-{ID_CHARS_MAX} characters, without NUL or lone surrogates")
