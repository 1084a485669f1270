"""Registry of integration event types: name, schema version, topic, payload model."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


def topic_for(context: str) -> str:
    return f"{context}.events.v1"


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlq"


@dataclass(frozen=True)
class EventType:
    name: str  # "ledger.transfer_posted"
    schema_version: int
    topic: str
    payload: type[BaseModel]
    summary: str


class EventRegistry:
    def __init__(self) -> None:
        self._types: dict[tuple[str, int], EventType] = {}

    def register(self, event_type: EventType) -> EventType:
        key = (event_type.name, event_type.schema_version)
        if key in self._types:
            raise ValueError(f"event type {event_type.name} v{event_type.schema_version} is registered twice")
        self._types[key] = event_type
        return event_type

    def get(self, name: str, schema_version: int) -> EventType:
        try:
            return self._types[(name, schema_version)]
        except KeyError:
            raise KeyError(f"unknown event type {name} v{schema_version}") from None

    def all(self) -> list[EventType]:
        return sorted(self._types.values(), key=lambda t: (t.topic, t.name, t.schema_version))


REGISTRY = EventRegistry()


def register(name: str, schema_version: int, topic: str, summary: str):
    """Class decorator: `@register("ledger.transfer_posted", 1, LEDGER_TOPIC, "…")`."""

    def decorate(payload: type[BaseModel]) -> type[BaseModel]:
        REGISTRY.register(EventType(name, schema_version, topic, payload, summary))
        return payload

    return decorate
