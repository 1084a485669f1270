"""Two small services that exercise the chassis end to end.

`notes` keeps a Note aggregate in its event store and relays its events; `noteboard`
is another service whose read model counts every event it applies, so a double
application shows as a count above the number of events.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from kabinet_chassis.consumers import ReadModelConsumer
from kabinet_chassis.eventstore import TracingMapper, event_store_env
from kabinet_chassis.outbox import OutboxRelay, RelayConfig
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings
from kabinet_contracts.envelope import IntegrationEvent, event_id_for


class Note(Aggregate):
    @event("Written")
    def __init__(self, text: str) -> None:
        self.text = text

    @event("Edited")
    def edit(self, text: str) -> None:
        self.text = text


class Notes(Application):
    def write(self, text: str) -> UUID:
        note = Note(text=text)
        self.save(note)
        return note.id

    def edit(self, note_id: UUID, text: str) -> None:
        note = self.repository.get(note_id)
        note.edit(text)
        self.save(note)


def note_to_integration(source: str):
    def to_integration(domain_event: Any, position: int) -> IntegrationEvent | None:
        kind = type(domain_event).__name__.lower()
        return IntegrationEvent(
            event_id=event_id_for(source, position),
            type=f"notes.note_{kind}",
            schema_version=1,
            source=source,
            position=position,
            aggregate_id=str(domain_event.originator_id),
            aggregate_version=domain_event.originator_version,
            occurred_at=domain_event.timestamp if getattr(domain_event, "timestamp", None) else datetime.now(UTC),
            payload={"text": domain_event.text},
        )

    return to_integration


def build_notes_service(settings: ServiceSettings, topic: str, **relay_options: Any) -> tuple[Service, dict]:
    service = Service(settings, title="notes")
    parts: dict[str, Any] = {}

    @service.on_start
    async def start(svc: Service) -> None:
        app = Notes(env=event_store_env(settings))
        assert isinstance(app.mapper, TracingMapper)
        relay = OutboxRelay(
            RelayConfig(source=settings.service_name, topic=topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                        broker_check_interval_s=0.5),
            recorder=app.recorder, mapper=app.mapper, to_integration=note_to_integration(settings.service_name),
            database_url=settings.service_database_url, **relay_options,
        )
        parts.update(app=app, relay=relay)
        svc.run_in_background(relay.run)

    @service.on_stop
    async def stop(svc: Service) -> None:
        parts["app"].close()

    return service, parts


BOARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS note_board (
    note_id text PRIMARY KEY,
    text text NOT NULL,
    applied_count integer NOT NULL
)
"""


async def apply_to_board(connection: asyncpg.Connection, events) -> None:
    for note_event in events:
        if "text" not in note_event.payload:
            raise ValueError("note event without text")
        await connection.execute(
            "INSERT INTO note_board (note_id, text, applied_count) VALUES ($1, $2, 1)"
            " ON CONFLICT (note_id) DO UPDATE SET text = EXCLUDED.text, applied_count = note_board.applied_count + 1",
            note_event.aggregate_id, note_event.payload["text"],
        )


def build_board_service(settings: ServiceSettings, topic: str) -> tuple[Service, dict]:
    service = Service(settings, title="noteboard")
    parts: dict[str, Any] = {}

    @service.on_start
    async def start(svc: Service) -> None:
        async with svc.pool.acquire() as connection:
            await connection.execute(BOARD_SCHEMA)
        consumer = ReadModelConsumer(f"{settings.service_name}_board", svc.pool, apply_to_board, svc.dead_letters)
        svc.subscribe(topic, consumer)
        parts["consumer"] = consumer

    return service, parts
