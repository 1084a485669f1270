"""Business refusals of the ledger: a small tree, each with a stable code and HTTP status."""


class LedgerError(Exception):
    code = "ledger_error"
    status = 409


class AccountNotFound(LedgerError):
    code, status = "account_not_found", 404


class InsufficientFunds(LedgerError):
    code, status = "insufficient_funds", 409


class AccountFrozen(LedgerError):
    code, status = "account_frozen", 409


class AccountClosed(LedgerError):
    code, status = "account_closed", 409


class AccountNotEmpty(LedgerError):
    code, status = "account_not_empty", 409


class LegCurrencyMismatch(LedgerError):
    code, status = "currency_mismatch", 422


class UnbalancedTransfer(LedgerError):
    code, status = "unbalanced_transfer", 422


class InvalidTransfer(LedgerError):
    code, status = "invalid_transfer", 422


class InvalidAccount(LedgerError):
    code, status = "invalid_account", 422


class IdempotencyConflict(LedgerError):
    code, status = "idempotency_conflict", 409


class HoldNotFound(LedgerError):
    code, status = "hold_not_found", 404


class HoldNotActive(LedgerError):
    code, status = "hold_not_active", 409


class CaptureExceedsHold(LedgerError):
    code, status = "capture_exceeds_hold", 409
