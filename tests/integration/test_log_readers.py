"""Rules of the readers of a service's own log (its outbox): the local read model applies
what the writer committed as soon as it is told, a read model that cannot go on says so
in its health check instead of stalling in silence, and the relay never waits for ever
on a database connection that answers nothing."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import pytest

from kabinet_chassis import projection as projection_module
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.outbox import OutboxRelay, RelayConfig
from kabinet_chassis.projection import LocalProjection
from kabinet_chassis.service import Service
from tests.support.notes import Note, Notes, note_to_integration

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


class BlackHoleProxy:
    """A TCP proxy to the database. `black_hole()` swallows everything sent either way on
    the connections open so far, as a network black hole does, while new connections go
    through; a connection's end still gets through (the server's session ends with it)."""

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self._target = (parts.hostname, parts.port)
        self._parts = parts
        self._generation = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Starts listening; returns the database URL through the proxy."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    def black_hole(self) -> None:
        self._generation += 1

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._target)
        self._writers += [client_writer, server_writer]
        generation = self._generation

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    if generation == self._generation:  # else swallowed
                        writer.write(data)
                        await writer.drain()
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer),
                             return_exceptions=True)


RELAY_COMMAND_TIMEOUT_S = 1.0
# A read that times out, the reconnection and a page sent: a few seconds, far from "never".
RELAY_RECOVERS_WITHIN_S = 20.0


async def _relay_reaches(relay: OutboxRelay, position: int, within_s: float) -> None:
    async with asyncio.timeout(within_s):
        while relay.position < position:
            await asyncio.sleep(0.1)


async def test_a_relay_whose_database_connection_fell_into_a_black_hole_reconnects_and_publishes_what_waits(
        stack, unique_name):
    """A connection that answers nothing (a network black hole, a dropped NAT entry) must
    not hold the relay for ever: its statements are bounded, like every query of a service
    (ARCHITECTURE.md §7), so it gives up, connects again and publishes what waits."""
    settings = stack.service_settings(unique_name)
    service = Service(settings, title="notes")
    async with service.running():
        app = Notes(env=event_store_env(settings))
        proxy = BlackHoleProxy(settings.service_database_url)
        relay = OutboxRelay(
            RelayConfig(source=unique_name, topic=f"{unique_name}.notes", bootstrap_servers=settings.kafka_bootstrap_servers,
                        database_command_timeout_s=RELAY_COMMAND_TIMEOUT_S),
            recorder=app.recorder, mapper=app.mapper, to_integration=note_to_integration(unique_name),
            database_url=await proxy.start(),
        )
        task = asyncio.create_task(relay.run())
        try:
            before = recorded_pairs(app, "published before the black hole")
            await _relay_reaches(relay, before[-1][0], RELAY_RECOVERS_WITHIN_S)
            proxy.black_hole()
            waiting = recorded_pairs(app, "committed while the relay's connection answers nothing")
            await _relay_reaches(relay, waiting[-1][0], RELAY_RECOVERS_WITHIN_S)
        finally:
            await proxy.close()  # first: a relay still stuck on its connection is freed to stop
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            app.close()
