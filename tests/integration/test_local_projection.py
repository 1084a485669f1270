"""Rules of a service's own read model: every stored event is applied once, in log order,
whether the writer handed the events over or the projection read them from the log."""

from __future__ import annotations

import pytest

from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.projection import LocalProjection
from kabinet_chassis.service import Service
from tests.support.notes import Note, Notes

pytestmark = pytest.mark.integration

SEEN_SCHEMA = "CREATE TABLE IF NOT EXISTS seen (position bigint PRIMARY KEY, text text NOT NULL)"


async def apply_seen(connection, page) -> None:
    # A plain INSERT: applying any position twice fails the page, so the test would see it.
    await connection.executemany("INSERT INTO seen (position, text) VALUES ($1, $2)", [(p, e.text) for p, e in page])


def recorded_pairs(app, text: str) -> list[tuple[int, object]]:
    note = Note(text=text)
    recordings = app.save(note)
    return [(r.notification.id, r.domain_event) for r in recordings]


async def test_handed_over_pages_are_applied_without_reading_the_log_and_a_gap_falls_back_to_the_log(stack, unique_name):
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        log_reads = {"count": 0}
        select_notifications = app.recorder.select_notifications

        def counting_select(*args, **kwargs):
            log_reads["count"] += 1
            return select_notifications(*args, **kwargs)

        app.recorder.select_notifications = counting_select
        async with service.pool.acquire() as connection:
            await connection.execute(SEEN_SCHEMA)
        projection = LocalProjection("seen", pool=service.pool, recorder=app.recorder, mapper=app.mapper,
                                     apply_page=apply_seen, threads=service.threads)
        await projection.start()

        # Handed over in order, right after the projection's position: no log read.
        first, second = recorded_pairs(app, "one"), recorded_pairs(app, "two")
        projection.notify(first)
        projection.notify(second)
        assert await projection.catch_up_once()
        assert log_reads["count"] == 0
        assert projection.position == second[-1][0]

        # An event the projection was never told about, then one it was: the gap sends it to the log.
        recorded_pairs(app, "three (not handed over)")
        fourth = recorded_pairs(app, "four")
        projection.notify(fourth)
        assert await projection.catch_up_once()
        assert log_reads["count"] == 1
        assert projection.position == fourth[-1][0]

        # Handed over again after the log caught up: pages already applied are dropped, not applied twice.
        projection.notify(fourth)
        assert not await projection.catch_up_once()

        rows = await service.pool.fetch("SELECT position, text FROM seen ORDER BY position")
        assert [r["text"] for r in rows] == ["one", "two", "three (not handed over)", "four"]
        stored = await service.pool.fetchval("SELECT position FROM projection_position WHERE projection = 'seen'")
        assert stored == fourth[-1][0]
        app.close()


async def test_pages_the_database_lost_in_a_crash_are_applied_again_not_skipped(stack, unique_name):
    """A page is committed without waiting for the WAL flush: a server crash can take it and
    its tracked position back, while the running projection remembers being further on."""
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        async with service.pool.acquire() as connection:
            await connection.execute(SEEN_SCHEMA)
        projection = LocalProjection("seen", pool=service.pool, recorder=app.recorder, mapper=app.mapper,
                                     apply_page=apply_seen, threads=service.threads)
        await projection.start()
        first = recorded_pairs(app, "kept")
        projection.notify(first)
        assert await projection.catch_up_once()
        second = recorded_pairs(app, "lost in the crash")
        projection.notify(second)
        assert await projection.catch_up_once()

        # What crash recovery leaves: the second page's rows and position never reached disk.
        async with service.pool.acquire() as connection:
            await connection.execute("DELETE FROM seen WHERE position = $1", second[-1][0])
            await connection.execute("UPDATE projection_position SET position = $1 WHERE projection = 'seen'", first[-1][0])

        third = recorded_pairs(app, "after the crash")
        projection.notify(third)
        for _ in range(5):  # bounded: one pass notices the loss, the next replays from the log
            if not await projection.catch_up_once():
                break
        rows = await service.pool.fetch("SELECT text FROM seen ORDER BY position")
        assert [r["text"] for r in rows] == ["kept", "lost in the crash", "after the crash"]
        assert projection.position == third[-1][0]
        app.close()
