"""Rules of the readers of a service's own log (its outbox): the local read model applies
what the writer committed as soon as it is told, and a read model that cannot go on says
so in its health check instead of stalling in silence."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kabinet_chassis import projection as projection_module
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.projection import LocalProjection
from kabinet_chassis.service import Service
from tests.support.notes import Note, Notes

pytestmark = pytest.mark.integration

SEEN_SCHEMA = "CREATE TABLE IF NOT EXISTS seen (position bigint PRIMARY KEY, text text NOT NULL)"
# Far longer than any wait below: a projection that only catches up at its next poll fails the test.
IDLE_POLL_S = 30.0
APPLIED_WITHIN_S = 5.0
# The backoff's first rounds add up to about 1.6 s before a read model counts as stuck.
STUCK_WITHIN_S = 10.0


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


async def stuck_reason(projection: LocalProjection) -> str | None:
    try:
        await projection.check()
    except projection_module.ProjectionStuck as stuck:
        return str(stuck)
    return None


async def test_a_read_model_stuck_on_an_event_it_cannot_apply_says_so_in_its_check_and_goes_on_once_mended(
        stack, unique_name):
    """A bug in applying one event stops the read model there (the history after it must not
    be shown without it), retried for ever, so the loop never dies and liveness never names
    it. Its check must: where it stopped and why, while the service still takes payments."""
    service = Service(stack.service_settings(unique_name), title="seen")
    async with service.running():
        app = Notes(env=event_store_env(service.settings))
        async with service.pool.acquire() as connection:
            await connection.execute(SEEN_SCHEMA)
        mended = asyncio.Event()

        async def apply_all_but_poison(connection, page) -> None:
            if not mended.is_set() and any(event.text == "poison" for _, event in page):
                raise ValueError("cannot apply 'poison'")
            await apply_seen(connection, page)

        projection = LocalProjection("seen", pool=service.pool, recorder=app.recorder, mapper=app.mapper,
                                     apply_page=apply_all_but_poison, threads=service.threads)
        await projection.start()
        before = recorded_pairs(app, "before")
        async with running(projection) as task:
            await projection.wait_for(before[-1][0], timeout_s=APPLIED_WITHIN_S)
            assert await stuck_reason(projection) is None

            recorded_pairs(app, "poison")
            after = recorded_pairs(app, "after")
            reason = None
            for _ in range(int(STUCK_WITHIN_S / 0.1)):
                reason = await stuck_reason(projection)
                if reason:
                    break
                await asyncio.sleep(0.1)
            assert reason is not None, "a read model failing on every round still looked healthy"
            assert f"at position {before[-1][0]}" in reason and "ValueError: cannot apply 'poison'" in reason, reason
            assert not task.done()
            assert await seen_texts(service) == ["before"]

            mended.set()
            await projection.wait_for(after[-1][0], timeout_s=projection_module.BACKOFF_MAX_S + APPLIED_WITHIN_S)
            assert await stuck_reason(projection) is None
        assert await seen_texts(service) == ["before", "poison", "after"]
        app.close()
