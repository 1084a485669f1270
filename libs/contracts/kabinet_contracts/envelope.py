"""The integration-event envelope every service publishes (ARCHITECTURE.md §4).

Domain events are private; what crosses service boundaries is this envelope with a
versioned, documented payload. No ciphertext and no Python class paths on the wire.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from pydantic import BaseModel, ConfigDict, Field

# Event ids are derived, not random: republishing the same notification (after a
# relay crash or a broker that lost its data) yields the same event_id.
_EVENT_ID_NAMESPACE = UUID("6f1c7c52-3f4e-4f7e-9a55-5b0c1a2d9e10")


def event_id_for(source: str, position: int) -> UUID:
    return uuid5(_EVENT_ID_NAMESPACE, f"{source}:{position}")


class IntegrationEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID
    type: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$", max_length=128)
    schema_version: int = Field(ge=1)
    source: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)
    position: int = Field(ge=1, description="notification id in the source's event log")
    aggregate_id: str = Field(max_length=128)
    aggregate_version: int = Field(ge=1)
    occurred_at: datetime
    customer_id: str | None = Field(default=None, max_length=128)
    payload: dict[str, Any]
