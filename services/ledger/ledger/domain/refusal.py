"""A refused command that carried a client id (a transfer, a hold, a capture).

The refusal takes the id the command would have created, so a repeat of the request gets
the same refusal, never a later success (ARCHITECTURE.md §5: a repeat returns the first
answer): a payment its customer was told had failed for want of funds must not be posted
by a redelivery after the next salary. A new attempt takes a new id.

Only refusals that depend on the ledger's state are kept (funds, account states, hold
states, deadlines): a malformed request is refused the same way every time anyway, and a
conflict names an id that is taken already.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from ledger.domain.errors import LedgerError, refusal_for


class Refusal(Aggregate):
    """Kept under the id of what the command would have created (its transfer, hold or
    capture transfer): the writer's look-ups, the event store's unique (id, version) and a
    retry after a restart treat it exactly like what it stands in for."""

    @staticmethod
    def create_id(refused_id: UUID) -> UUID:
        return refused_id

    @event("Recorded")
    def __init__(self, refused_id: UUID, client_id: str, request_fingerprint: str, code: str, detail: str,
                 timestamp: datetime, requested_by: str | None = None) -> None:
        self.client_id = client_id
        self.request_fingerprint = request_fingerprint
        self.code = code
        self.detail = detail

    def error(self) -> LedgerError:
        """The refusal as it was first given."""
        return refusal_for(self.code, self.detail)
