"""One database per service, created on demand; leadership among a service's processes."""

from __future__ import annotations

import asyncio

import asyncpg
from eventsourcing.persistence import InterfaceError as EventStoreInterfaceError
from eventsourcing.persistence import OperationalError as EventStoreOperationalError

from kabinet_chassis.settings import database_name_for

_CONNECT_TIMEOUT_S = 10

# What a database that is down, restarting or failing over looks like, through asyncpg and
# through eventsourcing's recorder (psycopg): a request answers 503 with Retry-After, a
# consumer waits and tries again. Never a 500, never a dead letter.
DATABASE_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
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
    connection = await asyncpg.connect(server_url, timeout=_CONNECT_TIMEOUT_S)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await connection.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                pass  # created concurrently by another process: fine
    finally:
        await connection.close()
    return name


async def create_pool(database_url: str, max_size: int) -> asyncpg.Pool:
    # asyncpg's reset query on every release costs a round trip, but it is also what finds
    # a connection the server killed (a failover) and drops it: a pool without it kept such
    # a connection and could hang on close (tried, measured +5% in the ledger bench, reverted).
    return await asyncpg.create_pool(database_url, min_size=1, max_size=max_size, timeout=_CONNECT_TIMEOUT_S)


async def wait_for_lead(connection: asyncpg.Connection, name: str, poll_s: float = 1.0) -> None:
    """Return once this connection holds the session advisory lock `name`: the process
    leads that role while the connection lives (a killed process frees it at once)."""
    while not await connection.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", name):
        await asyncio.sleep(poll_s)
