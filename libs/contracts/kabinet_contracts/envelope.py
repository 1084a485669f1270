"""The integration-event envelope every service publishes (ARCHITECTURE.md §4).

Domain events are private; what crosses service boundaries is this envelope with a
versioned, documented payload. No ciphertext and no Python class paths on the wire.
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

# Event ids are derived, not random: republishing the same notification (after a
# relay crash or a broker that lost its data) yields the same event_id.
# A record header the relay sets: the position of the event it published before this one
# on the same partition (0 for the first). A consumer that has applied position t and
# receives a record whose previous position is above t has missed events in between:
# the broker lost data and this partition now holds a different sequence.
PREVIOUS_POSITION_HEADER = "previous-position"

_EVENT_ID_NAMESPACE = UUID("6f1c7c52-3f4e-4f7e-9a55-5b0c1a2d9e10")
_EVENT_ID_NAMESPACE_BYTES = _EVENT_ID_NAMESPACE.bytes
# The version (5) and RFC 4122 variant bits of a name-based SHA-1 UUID, over the 128-bit integer.
_UUID_VERSION_AND_VARIANT_MASK = (0xF000 << 64) | (0xC000 << 48)
_UUID_VERSION_5_AND_VARIANT_BITS = (0x5000 << 64) | (0x8000 << 48)


def event_id_for(source: str, position: int) -> UUID:
    """uuid5(_EVENT_ID_NAMESPACE, "source:position"), computed directly.

    The relay derives one per published event; `uuid.uuid5` re-imports hashlib and
    validates its arguments on every call, which cost as much as the hash. Same values.
    """
    digest = hashlib.sha1(_EVENT_ID_NAMESPACE_BYTES + f"{source}:{position}".encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    return UUID(int=(value & ~_UUID_VERSION_AND_VARIANT_MASK) | _UUID_VERSION_5_AND_VARIANT_BITS)


# The service an event comes from: its name, as its tracking and dead letters are keyed.
SOURCE_PATTERN = r"^[a-z][a-z0-9_]*$"
SOURCE_CHARS_MAX = 64


class IntegrationEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID
    type: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$", max_length=128)
    schema_version: int = Field(ge=1)
    source: str = Field(pattern=SOURCE_PATTERN, max_length=SOURCE_CHARS_MAX)
    position: int = Field(ge=1, description="notification id in the source's event log")
    aggregate_id: str = Field(max_length=128)
    aggregate_version: int = Field(ge=1)
    # RFC 3339, as the published document says: a time without an offset names no instant.
    occurred_at: AwareDatetime
    customer_id: str | None = Field(default=None, max_length=128)
    payload: dict[str, Any]

    def json_bytes(self) -> bytes:
        """What `model_dump_json().encode()` gives, straight from pydantic-core: the relay
        encodes every event, and the Python-level argument handling of `model_dump_json`
        was a third of that cost."""
        return self.__pydantic_serializer__.to_json(self)
