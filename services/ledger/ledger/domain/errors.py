"""Business refusals of the ledger: a small tree, each with a stable code and HTTP status.

`code` is part of the public contract (problem+json `code`): never rename one.
Messages name the account, hold or amounts concerned; they are shown to callers.
"""


class LedgerError(Exception):
    code = "ledger_error"
    status = 409


class AccountNotFound(LedgerError):
    """No account with that id (or the id belongs to something that is not an account)."""

    code, status = "account_not_found", 404


class InsufficientFunds(LedgerError):
    """A debit or a new hold would take a customer account below minus its credit limit."""

    code, status = "insufficient_funds", 409


class AccountFrozen(LedgerError):
    """A frozen account takes credits only: no debits, no new holds; and it does not close
    while a freeze other than the customer's own is left."""

    code, status = "account_frozen", 409


class AccountClosed(LedgerError):
    """A closed account takes nothing."""

    code, status = "account_closed", 409


class AccountNotEmpty(LedgerError):
    """Closing needs a zero posted balance and no live holds."""

    code, status = "account_not_empty", 409


class LegCurrencyMismatch(LedgerError):
    """A leg's (or hold's) currency differs from its account's."""

    code, status = "currency_mismatch", 422


class UnbalancedTransfer(LedgerError):
    """The legs do not sum to zero in every currency."""

    code, status = "unbalanced_transfer", 422


class InvalidTransfer(LedgerError):
    """A malformed transfer: leg count, zero amounts, repeated accounts, bad ids or codes, limits."""

    code, status = "invalid_transfer", 422


class InvalidHold(InvalidTransfer):
    """A malformed hold or capture: non-positive amount, same account twice, bad ids, past expiry."""

    code, status = "invalid_hold", 422


class InvalidAccount(LedgerError):
    """A malformed account: unknown kind, bad currency, owner or credit limit."""

    code, status = "invalid_account", 422


class IdempotencyConflict(LedgerError):
    """A client-given id was used before with another body."""

    code, status = "idempotency_conflict", 409


class TransferNotFound(LedgerError):
    code, status = "transfer_not_found", 404


class HoldNotFound(LedgerError):
    code, status = "hold_not_found", 404


class HoldNotActive(LedgerError):
    """The hold was fully captured, voided or expired (or its deadline has passed)."""

    code, status = "hold_not_active", 409


class CaptureExceedsHold(LedgerError):
    """A capture larger than what is left on the hold."""

    code, status = "capture_exceeds_hold", 409


def _by_code() -> dict[str, type[LedgerError]]:
    by_code: dict[str, type[LedgerError]] = {}
    kinds: list[type[LedgerError]] = [LedgerError]
    for _ in range(100):  # the tree is small; bounded all the same
        if not kinds:
            break
        kind = kinds.pop()
        by_code[kind.code] = kind
        kinds.extend(kind.__subclasses__())
    return by_code


_REFUSALS_BY_CODE = _by_code()  # once, the tree being complete above


def refusal_for(code: str, detail: str) -> LedgerError:
    """The refusal a stored `code` names, with its first message (a repeat gets the same answer)."""
    return _REFUSALS_BY_CODE.get(code, LedgerError)(detail)
