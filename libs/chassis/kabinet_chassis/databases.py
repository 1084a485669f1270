"""One database per service, created on demand; leadership among a service's processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from eventsourcing.persistence import InterfaceError as EventStoreInterfaceError
from eventsourcing.persistence import OperationalError as EventStoreOperationalError

from kabinet_chassis.settings import database_name_for

log = logging.getLogger(__name__)

# The longest a new connection may take to be made (a server not answering: a black hole).
DATABASE_CONNECT_TIMEOUT_S = 10
# The longest any one query through a service's pool may take. A database that hangs (a
# stopped server, a network black hole) answers nothing: past this, the query raises
# TimeoutError (an OSError, so a 503 below) instead of holding the request for ever.
# Far above any query the services make (a statement page over millions of entries
# takes a fraction of a second); `kabinet ledger verify` uses its own connection. The pool
# waits as long for a free connection, and on release for a timed-out query's cancel (see
# BoundedPool): a request against a hung database answers 503 within about twice this.
DATABASE_COMMAND_TIMEOUT_S = 10
# Schema changes at startup are not requests: they wait for another process's (a lock, as
# in a rolling deploy) and may take long on big tables (an index, a backfill). Their
# statements pass this instead.
SCHEMA_CHANGE_TIMEOUT_S = 3600

# What a database that is down, restarting or failing over looks like, through asyncpg and
# through eventsourcing's recorder (psycopg): a request answers 503 with Retry-After, a
# consumer waits and tries again. Never a 500, never a dead letter.
DATABASE_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; and TimeoutError, a query past DATABASE_COMMAND_TIMEOUT_S
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,  # the connection died under a query
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, a failover
    asyncpg.InternalClientError,  # a query that crossed the server's goodbye on a connection it killed
    EventStoreOperationalError,
    EventStoreInterfaceError,
)


async def ensure_database(server_url: str, service_name: str) -> str:
    """Create the service's database if it does not exist; return its name."""
    name = database_name_for(service_name)
    connection = await asyncpg.connect(server_url, timeout=DATABASE_CONNECT_TIMEOUT_S)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await connection.execute(f'CREATE DATABASE "{name}"')
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                # Created concurrently by another process (replicas starting at once on a
                # fresh server): fine. PostgreSQL reports that race as 42P04 only when the
                # other CREATE had committed before this one looked; while both are in
                # flight, the loser fails on pg_database's unique index instead (23505).
                pass
    finally:
        await connection.close()
    return name


@contextlib.asynccontextmanager
async def one_process_starting_at_a_time(database_url: str) -> AsyncIterator[None]:
    """Hold the service database's start lock while this process makes its schema: the
    processes of a service starting at once (replicas deployed together) take turns.
    PostgreSQL's CREATE … IF NOT EXISTS and CREATE OR REPLACE are not safe against the same
    statement in another transaction: all but one fail on a catalog's unique index
    (pg_type_typname_nsp_index). A process killed meanwhile frees the lock with its connection."""
    connection = await asyncpg.connect(database_url, timeout=DATABASE_CONNECT_TIMEOUT_S)
    try:
        # Past the query limit: the process before may be upgrading a big table (a backfill).
        await connection.execute("SELECT pg_advisory_lock(hashtext('kabinet_service_start'))",
                                 timeout=SCHEMA_CHANGE_TIMEOUT_S)
        yield
    finally:
        await connection.close(timeout=DATABASE_COMMAND_TIMEOUT_S)  # the lock goes with it


# How long a schema change may hold up the queries queued behind its wait for a table's lock,
# and how it tries again (about as long in all as SCHEMA_CHANGE_TIMEOUT_S).
SCHEMA_LOCK_WAIT_S = 2
SCHEMA_LOCK_PAUSE_S = 2
SCHEMA_LOCK_ATTEMPTS_MAX = 900
# Which schema script each part of a service last ran here (its SHA-256): a process starting
# on a database that already ran the very same script runs nothing. ALTER TABLE … ADD COLUMN
# IF NOT EXISTS takes an ACCESS EXCLUSIVE lock even when it has nothing to add: a process
# restarting while an auditor's verify read the ledger in a long snapshot waited for the
# whole read, and every write (a payment's balances, an Idempotency-Key) queued behind it.
# A new version's script differs, and runs once. A script is made of statements that are
# safe to repeat (IF NOT EXISTS, OR REPLACE), as a half-recorded upgrade runs it again.
SCHEMA_SCRIPTS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_scripts_applied (
    name text PRIMARY KEY,
    script_sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def _sha256(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()


async def schema_is_current(connection: asyncpg.Connection, name: str, script: str) -> bool:
    """Whether this database has run `script` for `name` (see SCHEMA_SCRIPTS_TABLE)."""
    await connection.execute(SCHEMA_SCRIPTS_TABLE)  # takes no lock on a table that exists
    applied = await connection.fetchval("SELECT script_sha256 FROM schema_scripts_applied WHERE name = $1", name)
    return applied == _sha256(script)


async def change_schema(connection: asyncpg.Connection, name: str, script: str,
                        make: Callable[[], Awaitable[None]]) -> None:
    """Run `make` (what `script` says) and note that `script` ran for `name`, in one
    transaction. A table's lock is waited for SCHEMA_LOCK_WAIT_S at most, then all is undone
    and tried again after a pause: the service's own queries queue behind a waiting ALTER
    TABLE, so an upgrade that waited out an auditor's long read would stop payments for as long."""
    for attempt in range(1, SCHEMA_LOCK_ATTEMPTS_MAX + 1):
        try:
            async with connection.transaction():
                await connection.execute(f"SET LOCAL lock_timeout = '{SCHEMA_LOCK_WAIT_S}s'")
                await make()
                await connection.execute(
                    "INSERT INTO schema_scripts_applied (name, script_sha256) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO UPDATE SET script_sha256 = excluded.script_sha256, applied_at = now()",
                    name, _sha256(script))
            return
        except asyncpg.LockNotAvailableError:
            if attempt == SCHEMA_LOCK_ATTEMPTS_MAX:
                raise
            if attempt == 1:  # said once, not every pause
                log.warning("the schema change of %s waits for long reads of its tables (a report, an audit) to end;"
                            " trying again every %g s", name, SCHEMA_LOCK_PAUSE_S)
            await asyncio.sleep(SCHEMA_LOCK_PAUSE_S)


async def apply_schema(pool: asyncpg.Pool, name: str, script: str) -> None:
    """Run `script` (its statements) for `name`, unless this database ran that very script;
    at a service's start, one process at a time (one_process_starting_at_a_time)."""
    async with pool.acquire() as connection:
        if not await schema_is_current(connection, name, script):
            # A new index on a big table takes long.
            await change_schema(connection, name, script,
                                functools.partial(connection.execute, script, timeout=SCHEMA_CHANGE_TIMEOUT_S))


class BoundedPool(asyncpg.Pool):
    """asyncpg's pool, with every wait bounded by DATABASE_COMMAND_TIMEOUT_S.

    asyncpg waits for ever by default both to acquire a connection and, on release, for a
    query the server never answered to be cancelled (a hung server never acknowledges the
    cancel): a request that gave up would still hang there. With a bound, release drops
    such a connection and raises TimeoutError (a 503); the pool opens a new one later.
    """

    def acquire(self, *, timeout: float | None = None):
        return super().acquire(timeout=DATABASE_COMMAND_TIMEOUT_S if timeout is None else timeout)


async def create_pool(database_url: str, max_size: int) -> asyncpg.Pool:
    # asyncpg's reset query on every release costs a round trip, but it is also what finds
    # a connection the server killed (a failover) and drops it: a pool without it kept such
    # a connection and could hang on close (tried, measured +5% in the ledger bench, reverted).
    # As asyncpg.create_pool builds its Pool (it takes no pool class), with asyncpg's defaults.
    pool = BoundedPool(database_url, min_size=1, max_size=max_size, max_queries=50_000,
                       max_inactive_connection_lifetime=300.0, loop=None, connection_class=asyncpg.Connection,
                       record_class=asyncpg.Record, timeout=DATABASE_CONNECT_TIMEOUT_S,
                       command_timeout=DATABASE_COMMAND_TIMEOUT_S)
    return await pool


async def wait_for_lead(connection: asyncpg.Connection, name: str, poll_s: float = 1.0) -> None:
    """Return once this connection holds the session advisory lock `name`: the process
    leads that role while the connection lives (a killed process frees it at once)."""
    while not await connection.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", name):
        await asyncio.sleep(poll_s)
