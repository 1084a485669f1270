"""What the ledger answers for each command."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any


class _Result:
    def to_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class AccountResult(_Result):
    account_id: str
    state: str
    replayed: bool = False


@dataclass(frozen=True)
class TransferResult(_Result):
    transfer_id: str
    code: str
    legs: list[dict]
    posted_at: datetime
    hold_id: str | None = None
    replayed: bool = False


@dataclass(frozen=True)
class HoldResult(_Result):
    hold_id: str
    state: str
    amount_minor: int
    captured_minor: int
    remaining_minor: int
    expires_at: datetime
    transfer_id: str | None = None  # set for a capture
    replayed: bool = False
