"""A service's own read models, fed straight from its notification log.

The ledger's history and statements need every account's entries in the order they
were posted; reading the local log in notification order gives exactly that, with no
broker hop. Each page is applied in one transaction together with the tracked
position, so a crash replays the page and changes nothing twice. (Other services'
events arrive through the idempotent Kafka consumers in consumers.py instead.)

The writer in the same process may hand over what it just committed (`notify(page)`):
when that page starts right after the projection's position and its ids run without
a gap, no other event can sit in between, so it is applied as is, sparing a read and
a decode of the log. Anything else (a gap, a restart, another writer) falls back to
reading the log, which stays the one source of truth.

An event it cannot apply stops it there: what follows must not be shown without it (a
running balance would be wrong). It retries for ever, so its loop never dies and
liveness never names it; `check` (for the service's watched health) says it is stuck,
where and why, once it failed more than `failed_rounds_max` rounds in a row or went
`stall_max_s` without progress (a page applied, or nothing new found).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from eventsourcing.persistence import ApplicationRecorder, Mapper
from opentelemetry import metrics

from kabinet_chassis.eventstore import WorkerThreads

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS projection_position (
    projection text PRIMARY KEY,
    position bigint NOT NULL
)
"""

# Applies one page of (notification id, domain event) pairs inside the given transaction.
ApplyPage = Callable[[asyncpg.Connection, Sequence[tuple[int, Any]]], Awaitable[None]]
HANDED_OVER_PAGES_MAX = 64  # beyond this the projection is far behind: it reads the log instead
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 5.0
# Stuck, as `check` says, past this many failed rounds in a row (about 1.6 s of backoff:
# a database blip does not count) ...
PROJECTION_FAILED_ROUNDS_MAX = 5
# ... or this long without progress and without an error (a hang).
PROJECTION_STALL_MAX_S = 60.0
# While nothing new comes, how often it asks whether the database still has its position: a
# server that crashed may have lost its last pages (committed without waiting for the flush).
STORED_POSITION_CHECK_S = 1.0
ERROR_TEXT_MAX_CHARS = 200

_meter = metrics.get_meter(__name__)
PROJECTION_POSITION = _meter.create_gauge(
    "kabinet.projection.position", unit="{event}",
    description="the notification id of the last event a local read model applied, by projection; reads of what"
                " came after it wait (or answer 503 read_model_behind)")
# One failing every round (a database down for hours) logs the traceback of its first
# failures, then one line per interval: a traceback per round buried the service's log.
FAILURE_LOG_FIRST = 2
FAILURE_LOG_INTERVAL_S = 60.0


class ProjectionStuck(Exception):
    """The read model cannot go on: an event it fails to apply, a database it cannot use."""


class LocalProjection:
    def __init__(
        self,
        name: str,
        *,
        pool: asyncpg.Pool,
        recorder: ApplicationRecorder,
        mapper: Mapper,
        apply_page: ApplyPage,
        threads: WorkerThreads,
        page_size: int = 2000,
        idle_poll_s: float = 0.05,
        failed_rounds_max: int = PROJECTION_FAILED_ROUNDS_MAX,
        stall_max_s: float = PROJECTION_STALL_MAX_S,
    ) -> None:
        self.name = name
        self.pool = pool
        self.recorder = recorder
        self.mapper = mapper
        self.apply_page = apply_page
        self.threads = threads
        self.page_size = page_size
        self.idle_poll_s = idle_poll_s
        self.position = 0
        self.failed_rounds_max = failed_rounds_max
        self.stall_max_s = stall_max_s
        self.failed_rounds = 0  # rounds in a row that ended in an error; 0 again on progress
        self.last_error: str | None = None  # of the last failed round, cut to ERROR_TEXT_MAX_CHARS
        self.last_progress_at = time.monotonic()  # a page applied, or nothing new found
        self._failure_logged_at = 0.0  # time.monotonic() of the last log line about failed rounds
        self._advanced = asyncio.Event()
        self._new_events = asyncio.Event()
        self._handed_over: deque[Sequence[tuple[int, Any]]] = deque(maxlen=HANDED_OVER_PAGES_MAX)
        self._stored_position_checked_at = time.monotonic()

    def notify(self, committed: Sequence[tuple[int, Any]] = ()) -> None:
        """The writer committed new events: catch up now instead of at the next poll.

        `committed`: the (notification id, domain event) pairs it just committed, in order.
        """
        if committed:
            self._handed_over.append(committed)
        self._new_events.set()

    async def start(self) -> None:
        async with self.pool.acquire() as connection:
            await connection.execute(SCHEMA)
            await connection.execute(
                "INSERT INTO projection_position (projection, position) VALUES ($1, 0) ON CONFLICT DO NOTHING", self.name
            )
            self.position = await connection.fetchval("SELECT position FROM projection_position WHERE projection = $1", self.name)
        PROJECTION_POSITION.set(self.position, {"projection": self.name})

    async def run(self) -> None:
        while True:
            try:
                # Cleared before the attempt, not after it: a hand-over that arrives while the
                # log is being read (and found empty) must still wake the wait below.
                self._new_events.clear()
                found_new = await self.catch_up_once()
                self.failed_rounds = 0
                self.last_error = None
                self.last_progress_at = time.monotonic()
                if not found_new:
                    try:
                        async with asyncio.timeout(self.idle_poll_s):  # not wait_for: on 3.11 it can swallow a cancel
                            await self._new_events.wait()
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.failed_rounds += 1
                self.last_error = f"{type(error).__name__}: {error}"[:ERROR_TEXT_MAX_CHARS]
                backoff_s = min(BACKOFF_FIRST_S * 2 ** min(self.failed_rounds - 1, 10), BACKOFF_MAX_S)
                now = time.monotonic()
                if self.failed_rounds <= FAILURE_LOG_FIRST or now - self._failure_logged_at >= FAILURE_LOG_INTERVAL_S:
                    self._failure_logged_at = now
                    log.error("projection %s failed after position %d (%d rounds in a row): %s; retrying in %.2fs",
                              self.name, self.position, self.failed_rounds, self.last_error, backoff_s,
                              exc_info=error if self.failed_rounds <= FAILURE_LOG_FIRST else None)
                await asyncio.sleep(backoff_s)

    async def check(self) -> str:
        """A watched health check: raises ProjectionStuck, naming the position it stopped at,
        the last error and how long it has made no progress, once it failed more than
        `failed_rounds_max` rounds in a row or made none for `stall_max_s`."""
        stuck_s = time.monotonic() - self.last_progress_at
        if self.failed_rounds > self.failed_rounds_max or stuck_s > self.stall_max_s:
            raise ProjectionStuck(
                f"read model {self.name} made no progress for {stuck_s:.0f}s at position {self.position},"
                f" {self.failed_rounds} failed rounds in a row; last error: {self.last_error or 'none (hung?)'}"
            )
        return f"at position {self.position}"

    async def catch_up_once(self) -> bool:
        """Apply the next page; False when there was nothing new."""
        page = self._next_handed_over_page()
        if page is None:
            notifications = await self.threads.run(
                lambda: self.recorder.select_notifications(start=self.position, limit=self.page_size, inclusive_of_start=False)
            )
            if not notifications:
                return await self._stored_position_went_back()
            page = [(n.id, self.mapper.to_domain_event(n)) for n in notifications]
        async with self.pool.acquire() as connection, connection.transaction():
            # A read model is derived data: if the server crashes before this commit
            # reaches disk, the tracked position rolls back with it and the page is
            # applied again. Not waiting for the flush halves the fsyncs per write.
            await connection.execute("SET LOCAL synchronous_commit = off")
            stored = await connection.fetchval(
                "SELECT position FROM projection_position WHERE projection = $1 FOR UPDATE", self.name
            )
            if stored < self.position:
                # The server restarted and lost pages we committed without waiting for the
                # flush: their rows and the position went back together. Start again from
                # what it kept (this page would leave a hole), reading the log.
                self._go_back_to(stored)
                return True
            unapplied = [(position, event) for position, event in page if position > stored]
            if unapplied:
                await self.apply_page(connection, unapplied)
                await connection.execute(
                    "UPDATE projection_position SET position = $2 WHERE projection = $1", self.name, unapplied[-1][0]
                )
        self.position = page[-1][0]
        PROJECTION_POSITION.set(self.position, {"projection": self.name})
        self._advanced.set()
        return True

    async def _stored_position_went_back(self) -> bool:
        """Nothing new in the log: every STORED_POSITION_CHECK_S, whether the database lost pages
        this projection applied (a crash before their flush). Waiting for the next event to find
        out left the last ones missing from the read model, and verify failing, for as long as the
        ledger was quiet. True when it went back (there is work to do again)."""
        if time.monotonic() - self._stored_position_checked_at < STORED_POSITION_CHECK_S:
            return False
        stored = await self.pool.fetchval("SELECT position FROM projection_position WHERE projection = $1", self.name)
        self._stored_position_checked_at = time.monotonic()
        if stored is None or stored >= self.position:
            return False
        self._go_back_to(stored)
        return True

    def _go_back_to(self, stored: int) -> None:
        log.warning("projection %s: the database is back at %d, not %d; replaying from there", self.name, stored,
                    self.position)
        self.position = stored
        PROJECTION_POSITION.set(self.position, {"projection": self.name})
        self._handed_over.clear()

    def _next_handed_over_page(self) -> list[tuple[int, Any]] | None:
        """The writer's pages joined up to page_size, if they follow on without a gap."""
        while self._handed_over and self._handed_over[0][-1][0] <= self.position:
            self._handed_over.popleft()  # already applied from the log
        page: list[tuple[int, Any]] = []
        expected_id = self.position + 1
        while self._handed_over and len(page) < self.page_size:
            committed = self._handed_over[0]
            if committed[0][0] != expected_id or committed[-1][0] != expected_id + len(committed) - 1:
                break
            page.extend(self._handed_over.popleft())
            expected_id = page[-1][0] + 1
        if not page:
            self._handed_over.clear()  # a gap: the log decides
            return None
        return page

    async def wait_for(self, position: int, timeout_s: float = 30.0) -> None:
        """Wait until the projection has applied `position` (read-your-writes for the API)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.position < position:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"projection {self.name} is behind: at {self.position}, need {position}")
            self._advanced.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self._advanced.wait()
            except TimeoutError:
                pass
