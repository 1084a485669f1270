"""The batched single writer (ARCHITECTURE.md §4).

Commands wait in a bounded queue. One writer takes a batch (bounded by size and by
wait time), validates it in memory with the domain's `Batch`, saves every touched
aggregate in one transaction together with the new balances of the accounts it moved
money on, and answers each caller with its own result. A refused command does not fail
the rest of its batch. A hot account costs one balance row update per batch.

Validation runs in a worker thread (a cache miss loads through eventsourcing, which
blocks); the commit is one asyncpg call on the event loop (`application.append_batch`):
events, balances, table lock and NOTIFY in a single round trip.

The writer keeps the aggregates and balances it loaded in memory (it is their only
writer in this process). If a batch fails to validate or save, it forgets the touched
ones and reloads them from the store. One process writes at a time (`lead`); a second
one writing the same accounts anyway, for the seconds before a lost lead is noticed, is
stopped by the event store's optimistic concurrency and by the balances' versions,
never by luck.

A new transfer or hold id that is not in the cache is taken to be new without asking
the store: the event store's unique (id, version) is the check. A retry of a request
answered before the cache knew it (after a restart, say) fails that save, and the batch
is validated again with every id looked up, which answers the retry with its first
result. So a batch of new transfers costs no look-up round trip. That holds for a retry
the batch refuses too (a transfer that emptied the account would now find no funds): a
refusal under a new id is kept under that id (domain/refusal.py), so it fails the save
just the same. Account ids, and ids another command of the batch needs to exist (a hold a
capture settles), are looked up instead, in the same query (`_prefetch`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import asyncpg
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import StoredEvent
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from kabinet_chassis.databases import DATABASE_COMMAND_TIMEOUT_S, wait_for_lead
from kabinet_chassis.eventstore import events_table
from ledger.application import CLOCK_AHEAD_SQLSTATE, LedgerApplication, append_batch, last_posted_at
from ledger.domain.balance import Balance
from ledger.domain.batch import Batch, aggregate_ids_of
from ledger.domain.commands import OpenAccount, ReverseTransfer
from ledger.domain.errors import LedgerError

log = logging.getLogger(__name__)

QUEUE_MAX = 20_000
BATCH_MAX_COMMANDS = 1000
# Group commit: a batch is whatever waits when the writer is free. While one batch is
# being saved the next one gathers, so no extra waiting is needed to form batches.
BATCH_WAIT_MAX_S = 0.0
CACHE_MAX_AGGREGATES = 200_000
LEADERSHIP_POLL_S = 1.0  # how often a standby asks for the lead
LEADERSHIP_CHECK_S = 5.0  # how often the leader checks that its lock's connection lives
# A check unanswered this long may mean the lock is gone (its session frozen or cut off) and
# another process leads: the writer stops writing and asks for the lead again.
LEADERSHIP_CHECK_TIMEOUT_S = DATABASE_COMMAND_TIMEOUT_S
STANDBY_WAIT_S = 2.0  # a command waits this long for its process to lead, then gets 503
# A command waits this long for its answer, then gets 503: each of a batch's look-ups and
# its commit is bounded (kabinet_chassis.eventstore, .databases), but one batch may make
# several. Its outcome is then unknown; a retry with the same id gets the first answer.
ANSWER_WAIT_MAX_S = 20.0
SAVE_ATTEMPTS_MAX = 3
# Commands whose ids the writer looks up even on a first attempt (see `_prefetch`).
LOOKED_UP_FIRST = frozenset({OpenAccount, ReverseTransfer})

# What operators watch (kabinet_chassis.telemetry): answers by outcome, batches, the queue, and
# the position of the last commit, against which the relay's and the projection's show their lag.
_meter = metrics.get_meter(__name__)
COMMANDS_ANSWERED = _meter.create_counter(
    "kabinet.ledger.commands", unit="{command}",
    description="commands answered, by outcome: done; refused (with the refusal's code); queue_full and unavailable"
                " (503s, retried by the caller); failed (an error of the store). A command whose caller stopped waiting"
                " (unavailable) counts again by its outcome when its batch ends")
BATCH_COMMANDS = _meter.create_histogram(
    "kabinet.ledger.batch.commands", unit="{command}", description="commands in a batch of the writer",
    explicit_bucket_boundaries_advisory=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, BATCH_MAX_COMMANDS))
BATCH_DURATION = _meter.create_histogram(
    "kabinet.ledger.batch.duration", unit="s",
    description="a batch from taken off the queue to answered: validation, the commit, and any retry of them",
    explicit_bucket_boundaries_advisory=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20))
COMMANDS_WAITING = _meter.create_gauge(
    "kabinet.ledger.queue.commands", unit="{command}",
    description=f"commands in the writer's queue as it takes a batch (at most {QUEUE_MAX}; then 503 queue_full)")
POSITION = _meter.create_gauge(
    "kabinet.ledger.position", unit="{event}",
    description="the notification id of the last event the writer committed; kabinet.outbox.relay.position and"
                " kabinet.projection.position are behind it by the events they have yet to publish or apply")


class LedgerBusy(Exception):
    """The command queue is full: the caller should retry later (503)."""


class LedgerUnavailable(Exception):
    """The ledger cannot post here and now (another process is the active writer, or its
    clock is far ahead of the database's): 503."""


@dataclass(frozen=True, slots=True)
class _Changes:
    """A validated batch, ready to commit."""

    aggregates: list[Any]
    balances: dict[UUID, Balance]
    versions_only_read: dict[UUID, int]  # balances the batch judged by without saving them
    events: list[Any]
    stored_events: list[StoredEvent]


@dataclass
class _Request:
    command: Any
    future: asyncio.Future = field(repr=False)
    # The trace of the request that submitted the command (None outside any trace): its
    # events are stored in it, so the relay's record continues that trace (TracingMapper).
    trace: otel_context.Context | None = field(default=None, repr=False)


def _current_trace() -> otel_context.Context | None:
    return otel_context.get_current() if trace.get_current_span().get_span_context().is_valid else None


class BatchedWriter:
    def __init__(
        self,
        app: LedgerApplication,
        pool: asyncpg.Pool,
        clock: Callable[[], datetime],
        on_saved: Callable[[Sequence[tuple[int, Any]]], None] = lambda committed: None,
    ) -> None:
        self.app = app
        self.pool = pool
        self.clock = clock
        # Called with the (notification id, domain event) pairs of each committed batch,
        # e.g. to hand them to the projection.
        self.on_saved = on_saved
        self.queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=QUEUE_MAX)
        self._cache: OrderedDict[UUID, Any] = OrderedDict()
        self._balances: dict[UUID, Balance] = {}  # of the accounts in _cache
        self._absent: set[UUID] = set()  # ids the current batch knows (or assumes) to be new
        self._fetched: dict[UUID, Balance] = {}  # balances the current batch's look-up found
        self.batches_total = 0
        self.commands_total = 0
        self.last_position = 0  # notification id of the last saved event
        self._active = asyncio.Event()  # set by start(): this process's writer is the one that writes
        self._last_posted_at: datetime | None = None  # time of the last committed batch (start() reads it)
        # A commit whose answer was lost (the connection dropped after it, say) may have
        # landed: until the log is read again, last_position and _last_posted_at may be behind.
        self._maybe_behind_the_log = False
        # Held while a batch is written, and by start(): a process that regains the lead
        # must not drop its cache, or move its position back, under a batch still in flight.
        self._writing = asyncio.Lock()

    async def start(self) -> None:
        """Become active, beginning at the head of the log: until this writer commits, a
        read-your-writes wait covers everything committed before it started, so a command
        retried after a restart is answered from a read model that has caught up. Whatever
        was cached is dropped: another process may have written since."""
        async with self._writing:
            self._cache.clear()
            self._balances.clear()
            self.last_position = await self.log_head()
            self._last_posted_at = await last_posted_at(self.pool)
            self._active.set()

    async def log_head(self) -> int:
        """The position of the newest event committed, by any writer."""
        return await self.pool.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {events_table(self.app.recorder)}")

    def ledger_time(self) -> datetime:
        """The time a batch taken now posts at: the clock, but never earlier than the last
        batch committed (running balances follow the log, statements follow time). Holds
        expire by it too: a capture is refused from its hold's deadline in this time, so
        the expiry that frees the money must come by the same time, not by a clock behind it."""
        return self.clock() if self._last_posted_at is None else max(self.clock(), self._last_posted_at)

    @property
    def is_active(self) -> bool:
        return self._active.is_set()

    async def lead_check(self) -> str:
        """Readiness: only the active writer serves the ledger. A standby would answer every
        write 503 after a wait, and its reads would not wait for what the active one has just
        committed; out of load balancing, it takes over when the active one goes."""
        if not self.is_active:
            # Also while this process is still connecting to take the lock: no claim about another.
            raise LedgerUnavailable("standby: not the active writer (another ledger process holds the writer's lock,"
                                    " or this one is still taking it)")
        return f"active writer, at position {self.last_position}"

    async def lead(self, database_url: str) -> None:
        """Run until cancelled: be the ledger's one active writer while this process holds
        the `ledger_writer` advisory lock, and a standby (writes answer 503) while another
        does. The lock lives with its connection, so a killed leader frees it at once.

        Two processes may both act for the few seconds it takes to notice a lost lock
        connection; the balances' versions and the event store's keys still stop either
        from saving over what it has not seen (ADR-0002)."""
        while True:
            try:
                connection = await asyncpg.connect(database_url, timeout=10, command_timeout=LEADERSHIP_CHECK_TIMEOUT_S)
                try:
                    await wait_for_lead(connection, "ledger_writer", LEADERSHIP_POLL_S)
                    await self.start()
                    log.info("this process is now the ledger's active writer")
                    while True:
                        await asyncio.sleep(LEADERSHIP_CHECK_S)
                        await connection.fetchval("SELECT 1", timeout=LEADERSHIP_CHECK_TIMEOUT_S)
                finally:
                    self._active.clear()
                    connection.terminate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ledger writer lost or could not take the lead; trying again")
                await asyncio.sleep(LEADERSHIP_POLL_S)

    async def submit(self, command: Any) -> Any:
        """Execute one command; returns its result or raises its LedgerError. A command turned
        away here is counted here; the answers of a batch are counted in `run`."""
        if not self._active.is_set():
            try:
                async with asyncio.timeout(STANDBY_WAIT_S):
                    await self._active.wait()
            except TimeoutError:
                raise _counted(LedgerUnavailable("this ledger process is not the active writer (another is, or this"
                                                 " one is still taking the lead); retry shortly")) from None
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Request(command, future, _current_trace()))
        except asyncio.QueueFull:
            raise _counted(LedgerBusy(f"the ledger has {QUEUE_MAX} commands waiting; retry shortly")) from None
        try:
            async with asyncio.timeout(ANSWER_WAIT_MAX_S):
                return await future  # on time out the future is cancelled: the writer skips its answer
        except TimeoutError:
            raise _counted(LedgerUnavailable(f"the ledger did not answer within {ANSWER_WAIT_MAX_S:.0f} s; retry with"
                                             " the same id, which gets the first answer if it was posted meanwhile"
                                             )) from None

    async def run(self) -> None:
        batch: list[_Request] = []
        try:
            while True:
                first = await self.queue.get()
                batch = [first]
                taken_at = asyncio.get_running_loop().time()
                deadline = taken_at + BATCH_WAIT_MAX_S
                while len(batch) < BATCH_MAX_COMMANDS:
                    if self.queue.empty():
                        remaining = deadline - asyncio.get_running_loop().time()
                        if remaining <= 0:
                            break
                        try:
                            async with asyncio.timeout(remaining):
                                batch.append(await self.queue.get())
                        except TimeoutError:
                            break
                    else:
                        batch.append(self.queue.get_nowait())
                COMMANDS_WAITING.set(len(batch) + self.queue.qsize())
                try:
                    async with self._writing:
                        outcomes, committed = await self._write([r.command for r in batch], [r.trace for r in batch])
                except Exception as error:  # the store is down: every caller gets the error (a retry gets the first result)
                    log.exception("ledger batch of %d failed to save", len(batch))
                    outcomes = [error] * len(batch)
                else:
                    if committed:
                        self.on_saved(committed)
                        POSITION.set(self.last_position)
                for request, outcome in zip(batch, outcomes, strict=True):
                    if request.future.done():
                        continue  # the caller went away
                    if isinstance(outcome, BaseException):
                        request.future.set_exception(outcome)
                    else:
                        request.future.set_result(outcome)
                # Counted by the batch, not one by one: a few additions a batch, not one a command.
                for outcome, count in Counter(_outcome_of(outcome) for outcome in outcomes).items():
                    COMMANDS_ANSWERED.add(count, dict(outcome))
                BATCH_COMMANDS.record(len(batch))
                BATCH_DURATION.record(asyncio.get_running_loop().time() - taken_at)
        finally:
            self._refuse_waiting(batch)

    def _refuse_waiting(self, taken: list[_Request]) -> None:
        """The writer stops (its service does): the commands it took or still had queued are
        answered now (503), not left to wait out ANSWER_WAIT_MAX_S. One being committed may
        have been posted, so the retry uses the same id and gets the first answer."""
        stopped = LedgerUnavailable("the ledger writer stopped; retry with the same id, which gets the first answer"
                                    " if it was posted")
        waiting = list(taken)
        while not self.queue.empty():  # bounded by QUEUE_MAX
            waiting.append(self.queue.get_nowait())
        for request in waiting:
            if not request.future.done():
                request.future.set_exception(stopped)

    async def _write(self, commands: list[Any], traces: list[otel_context.Context | None]
                     ) -> tuple[list[Any], list[tuple[int, Any]]]:
        """Each command's result or refusal, and the (notification id, event) pairs committed.
        `traces`: each command's trace (or None), to store its events in.

        Validating may load aggregates through eventsourcing (blocking), so it runs in a
        worker thread; the commit is one asyncpg call on the event loop.
        """
        if self._maybe_behind_the_log:
            # Else the retry of that commit, answered as replayed (it commits nothing), would be
            # answered from a read model without it: an account's opening as null, a freeze as open.
            self.last_position = max(self.last_position, await self.log_head())
            self._last_posted_at = await last_posted_at(self.pool)
            self._maybe_behind_the_log = False
        for attempt in range(1, SAVE_ATTEMPTS_MAX + 1):
            now = self.ledger_time()
            outcomes, changes = await anyio.to_thread.run_sync(self._validate, commands, traces, now, attempt == 1)
            if changes is None:
                return outcomes, []
            touched = [aggregate.id for aggregate in changes.aggregates] + [*changes.balances, *changes.versions_only_read]
            try:
                async with self.pool.acquire() as connection:
                    notification_ids = await append_batch(connection, changes.stored_events, changes.balances,
                                                          changes.versions_only_read, now)
            except asyncpg.IntegrityConstraintViolationError:
                # Someone else wrote one of these aggregates or balances, or a later batch:
                # reload and validate again.
                self._forget(touched)
                if attempt == SAVE_ATTEMPTS_MAX:  # nothing saved: the caller retries with the same ids (503)
                    raise LedgerUnavailable(f"another ledger writer changed these accounts first {SAVE_ATTEMPTS_MAX}"
                                            " times; nothing was posted, retry shortly") from None
                self._last_posted_at = await last_posted_at(self.pool)
                continue
            except BaseException as error:
                self._forget(touched)  # committed or not, the store is the truth now
                self._maybe_behind_the_log = True
                if isinstance(error, asyncpg.PostgresError) and error.sqlstate == CLOCK_AHEAD_SQLSTATE:
                    log.error("ledger batch refused: %s", error)
                    raise LedgerUnavailable(f"the ledger's clock is wrong: {error}") from None
                raise
            self._last_posted_at = now
            for aggregate in changes.aggregates:
                self._remember(aggregate)
            # Only beside cached accounts: one evicted while this batch loaded others comes back with its balance.
            self._balances.update((account_id, balance) for account_id, balance in changes.balances.items()
                                  if account_id in self._cache)
            committed = sorted(
                ((notification_ids[(event.originator_id, event.originator_version)], event) for event in changes.events),
                key=lambda pair: pair[0],
            )
            self.last_position = committed[-1][0]
            self.batches_total += 1
            self.commands_total += len(commands)
            return outcomes, committed
        raise AssertionError("unreachable")

    def _validate(self, commands: list[Any], traces: list[otel_context.Context | None], now: datetime,
                  first_attempt: bool) -> tuple[list[Any], _Changes | None]:
        """Execute the batch in memory at `now`: each command's result or refusal, and what
        to commit (None when nothing changed)."""
        self._prefetch(commands, assume_new=first_attempt)
        batch = Batch(self._load, self._balance_of, now)
        outcomes: list[Any] = []
        # (aggregate id, version) -> the trace of the command whose event that version is;
        # kept only when some command of the batch came in a trace (never in the bench).
        trace_of_event: dict[tuple[UUID, int], otel_context.Context | None] | None = (
            {} if any(traces) else None)
        try:
            for command, command_trace in zip(commands, traces, strict=True):
                try:
                    outcomes.append(batch.execute(command))
                except LedgerError as refusal:
                    outcomes.append(refusal)
                if trace_of_event is not None:
                    _note_trace(trace_of_event, batch, command, command_trace)
            aggregates, balances = batch.finish()
            versions_only_read = batch.versions_only_read(balances)
            for aggregate in aggregates:
                aggregate.collect_events()  # saved below, as batch.events: in the order they were triggered
            events = batch.events
            stored_events = [self._stored(event, trace_of_event) for event in events]
        except BaseException:
            # The store failed mid-batch (a load, say): cached aggregates the earlier
            # commands changed must not carry those unsaved changes into a later batch.
            self._forget(batch.touched_ids)
            raise
        if not aggregates:
            return outcomes, None
        return outcomes, _Changes(aggregates, balances, versions_only_read, events, stored_events)

    def _stored(self, event: Any, trace_of_event: dict[tuple[UUID, int], otel_context.Context | None] | None
                ) -> StoredEvent:
        command_trace = None if trace_of_event is None else trace_of_event.get((event.originator_id,
                                                                                event.originator_version))
        if command_trace is None:
            return self.app.mapper.to_stored_event(event)
        token = otel_context.attach(command_trace)
        try:
            return self.app.mapper.to_stored_event(event)
        finally:
            otel_context.detach(token)

    def _prefetch(self, commands: list[Any], *, assume_new: bool) -> None:
        """Learn in one query which of the batch's uncached aggregates exist at all, and the
        balances of those that are accounts. With `assume_new`, uncached transfer and hold
        ids the commands would create are taken to be new (see the module's docstring),
        unless a command of the batch needs one to exist.

        The assumption is checked only by the save of what the creating command makes, and
        a creating command refused for its shape makes nothing. So an id taken as new must
        be one no other command of the batch can reach: a hold named by a capture or void is
        looked up, and so is every account to be opened (a capture or void reaches its
        accounts through the hold, unnamed). Taken as new, an existing account or hold that
        a malformed opening or hold repeat named was "not found" for every other command of
        its batch, and a payment or capture refused for good (its refusal kept, and saved).
        """
        created: set[UUID] = set()
        needed: set[UUID] = set()
        for command in commands:
            creates, needs = aggregate_ids_of(command)
            # Openings and reversals are rare, so their ids are always looked up (in the batch's
            # one look-up query). A reversal must be: its refusal is not kept, so a repeat of
            # one posted before a restart, taken as new, would be refused for funds since spent.
            (needed if type(command) in LOOKED_UP_FIRST else created).update(creates)
            needed.update(needs)
        cache = self._cache
        # Ids both created and needed join the one look-up query below: no extra round trip.
        new = {aggregate_id for aggregate_id in created
               if aggregate_id not in cache and aggregate_id not in needed} if assume_new else set()
        unknown = {aggregate_id for aggregate_id in created | needed if aggregate_id not in cache} - new  # O(batch)
        existing, self._fetched = self.app.look_up(unknown) if unknown else (set(), {})
        self._absent = new | (unknown - existing)

    def _load(self, aggregate_id: UUID) -> Any | None:
        aggregate = self._cache.get(aggregate_id)
        if aggregate is not None:
            self._cache.move_to_end(aggregate_id)
            return aggregate
        if aggregate_id in self._absent:
            return None
        try:
            aggregate = self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        self._remember(aggregate)
        return aggregate

    def _balance_of(self, account_id: UUID) -> Balance:
        """The saved balance of an account the batch has loaded (so it is in the cache)."""
        balance = self._balances.get(account_id)
        if balance is None:
            balance = self._fetched.get(account_id)
            if balance is None:  # an account reached through a hold: not in the batch's look-up
                balance = self.app.look_up([account_id])[1].get(account_id)
            if balance is None:
                raise RuntimeError(f"account {account_id} has events but no saved balance; run `kabinet ledger verify`")
            self._balances[account_id] = balance
        return balance

    def _remember(self, aggregate: Any) -> None:
        self._cache[aggregate.id] = aggregate
        self._cache.move_to_end(aggregate.id)
        while len(self._cache) > CACHE_MAX_AGGREGATES:
            evicted_id, _ = self._cache.popitem(last=False)
            self._balances.pop(evicted_id, None)

    def _forget(self, aggregate_ids: list[UUID]) -> None:
        for aggregate_id in aggregate_ids:
            self._cache.pop(aggregate_id, None)
            self._balances.pop(aggregate_id, None)


def _counted(turned_away: LedgerBusy | LedgerUnavailable) -> Exception:
    COMMANDS_ANSWERED.add(1, dict(_outcome_of(turned_away)))
    return turned_away


def _outcome_of(answer: Any) -> tuple[tuple[str, str], ...]:
    """A command's outcome as COMMANDS_ANSWERED counts it (its attributes, hashable)."""
    if isinstance(answer, LedgerError):
        return ("outcome", "refused"), ("code", answer.code)
    if isinstance(answer, LedgerBusy):
        return (("outcome", "queue_full"),)
    if isinstance(answer, LedgerUnavailable):
        return (("outcome", "unavailable"),)
    if isinstance(answer, BaseException):
        return (("outcome", "failed"),)
    return (("outcome", "done"),)


def _note_trace(trace_of_event: dict[tuple[UUID, int], otel_context.Context | None], batch: Batch, command: Any,
                command_trace: otel_context.Context | None) -> None:
    """After `command` ran: the versions its aggregates are at now are its events, unless an
    earlier command of the batch made them (the first to reach a version made it)."""
    creates, needs = aggregate_ids_of(command)
    for aggregate_id in (*creates, *needs):
        aggregate = batch.touched(aggregate_id)
        if aggregate is not None:
            trace_of_event.setdefault((aggregate_id, aggregate.version), command_trace)
