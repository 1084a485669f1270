"""The relay and a local read model retry every error for ever (events must not be skipped),
so a database down for hours or a poison event makes them fail a round every few seconds
for as long. Their checks say so in /health/ready; the log says so with the traceback at
the first failures, then in one line about once a minute, not a traceback per round (which
buries every other line of the service and is paid for by the gigabyte)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from kabinet_chassis.projection import LocalProjection
from kabinet_chassis.service import Service
from tests.integration.test_log_readers import SEEN_SCHEMA, recorded_pairs, running
from tests.integration.test_outbox_to_consumer import eventually, topic_for
from tests.support.notes import Notes, build_notes_service

pytestmark = pytest.mark.integration

ROUNDS = 12
LINES_MAX = 3  # the first failures, and at most one more within the minute


def lines_from(caplog, logger: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == logger and record.levelno >= logging.WARNING]


async def test_a_relay_failing_every_round_logs_its_error_without_a_traceback_per_round(stack, unique_name, caplog):
    caplog.set_level(logging.INFO, logger="kabinet_chassis.outbox")
    notes, parts = build_notes_service(stack.service_settings(unique_name), topic_for(unique_name))
    async with notes.running():
        relay = parts["relay"]
        relay.config = dataclasses.replace(relay.config, backoff_max_s=0.05)  # many rounds, quickly

        def broken_mapping(event, position):
            raise ValueError(f"cannot map the event at {position}")

        relay.to_integration = broken_mapping
        parts["app"].write("a note")

        async def failed_many_rounds() -> bool:
            return relay.failed_rounds >= ROUNDS

        await eventually(failed_many_rounds, what=f"{ROUNDS} failed rounds")
        lines = lines_from(caplog, "kabinet_chassis.outbox")
        assert 1 <= len(lines) <= LINES_MAX, [line.getMessage() for line in lines]
        assert lines[0].exc_info is not None, "the first failure's traceback is what finds the bug"
        assert "cannot map the event at 1" in lines[-1].getMessage()


async def test_a_read_model_failing_every_round_logs_its_error_without_a_traceback_per_round(
        stack, unique_name, caplog, monkeypatch):
    from kabinet_chassis import projection as projection_module

    monkeypatch.setattr(projection_module, "BACKOFF_MAX_S", 0.05)  # many rounds, quickly
    caplog.set_level(logging.INFO, logger="kabinet_chassis.projection")
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=_event_store_env(service))
        async with service.pool.acquire() as connection:
            await connection.execute(SEEN_SCHEMA)

        async def apply_nothing(connection, page) -> None:
            raise ValueError("cannot apply the page")

        projection = LocalProjection("seen", pool=service.pool, recorder=app.recorder, mapper=app.mapper,
                                     apply_page=apply_nothing, threads=service.threads)
        await projection.start()
        recorded_pairs(app, "poison")
        async with running(projection):
            async def failed_many_rounds() -> bool:
                return projection.failed_rounds >= ROUNDS

            await eventually(failed_many_rounds, what=f"{ROUNDS} failed rounds")
        lines = lines_from(caplog, "kabinet_chassis.projection")
        assert 1 <= len(lines) <= LINES_MAX, [line.getMessage() for line in lines]
        assert lines[0].exc_info is not None
        app.close()


def _event_store_env(service: Service) -> dict[str, str]:
    from kabinet_chassis.eventstore import event_store_env

    return event_store_env(service.settings)
