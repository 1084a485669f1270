"""Rules of the readers of a service's own log (its outbox): the local read model applies
what the writer committed as soon as it is told, and a read model that cannot go on says
so in its health check instead of stalling in silence."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.projection import LocalProjection
from kabinet_chassis.service import Service
from tests.support.notes import Note, Notes

pytestmark = pytest.mark.integration

SEEN_SCHEMA = "CREATE TABLE IF NOT EXISTS seen (position bigint PRIMARY KEY, text text NOT NULL)"
# Far longer than any wait below: a projection that only catches up at its next poll fails the test.
IDLE_POLL_S = 30.0
APPLIED_WITHIN_S = 5.0


async def apply_seen(connection, page) -> None:
    await connection.executemany("INSERT INTO seen (position, text) VALUES ($1, $2)", [(p, e.text) for p, e in page])


def recorded_pairs(app, text: str) -> list[tuple[int, object]]:
    return [(r.notification.id, r.domain_event) for r in app.save(Note(text=text))]


@contextlib.asynccontextmanager
async def running(projection: LocalProjection):
    task = asyncio.create_task(projection.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(condition) -> None:
    while not condition():  # bounded by the caller's timeout
        await asyncio.sleep(0.01)


async def seen_texts(service) -> list[str]:
    return [row["text"] for row in await service.pool.fetch("SELECT text FROM seen ORDER BY position")]


async def test_events_committed_while_the_projection_reads_an_empty_log_are_applied_at_once_not_at_the_next_poll(
        stack, unique_name):
    """The writer commits and hands its page over while the projection's read of the log is
    under way and finds nothing (its snapshot came first). That hand-over must wake the
    projection: a read-your-writes wait (an account just opened) otherwise lasts a poll."""
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        async with service.pool.acquire() as connection:
            await connection.execute(SEEN_SCHEMA)
        projection = LocalProjection("seen", pool=service.pool, recorder=app.recorder, mapper=app.mapper,
                                     apply_page=apply_seen, threads=service.threads, idle_poll_s=IDLE_POLL_S)
        await projection.start()
        loop = asyncio.get_running_loop()
        select_notifications = app.recorder.select_notifications
        committed: list[tuple[int, object]] = []

        def read_then_commit_once(*args, **kwargs):
            found = select_notifications(*args, **kwargs)
            if not found and not committed:  # the writer commits just after this read's snapshot
                committed.extend(recorded_pairs(app, "opened while the log was read"))
                loop.call_soon_threadsafe(projection.notify, list(committed))
            return found

        app.recorder.select_notifications = read_then_commit_once
        async with running(projection):
            await asyncio.wait_for(_until(lambda: bool(committed)), APPLIED_WITHIN_S)
            await projection.wait_for(committed[-1][0], timeout_s=APPLIED_WITHIN_S)
        assert await seen_texts(service) == ["opened while the log was read"]
        app.close()
