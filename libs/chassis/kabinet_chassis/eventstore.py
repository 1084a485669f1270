"""Event store wiring: eventsourcing on PostgreSQL, one database per service.

eventsourcing is synchronous; async code calls it through `run_sync`, which uses
a capacity limiter sized to the connection pool so threads never wait for a
connection while holding the event loop's attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import asyncpg
import psycopg
from eventsourcing.persistence import Mapper, Notification, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresFactory
from opentelemetry import propagate
from psycopg.pq import TransactionStatus
from psycopg.sql import SQL, Identifier

from kabinet_chassis.databases import DATABASE_COMMAND_TIMEOUT_S, DATABASE_CONNECT_TIMEOUT_S
from kabinet_chassis.settings import ServiceSettings

T = TypeVar("T")

_TRACE_KEY = "__trace__"


class TracingMapper(Mapper):
    """Stores the W3C trace context of the command beside each event's state.

    The relay publishes long after the HTTP request returned; carrying the trace
    context in the stored event is what lets one trace run from the request,
    through Kafka, into the consumer. The domain never sees it.
    """

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if not carrier:
            return super().to_stored_event(domain_event)
        # Add the carrier to a copy of the state: the domain event object stays untouched.
        original = domain_event.__dict__
        domain_event_copy = object.__new__(type(domain_event))
        object.__setattr__(domain_event_copy, "__dict__", {**original, _TRACE_KEY: carrier})
        return super().to_stored_event(domain_event_copy)

    def to_domain_event_with_trace(self, stored_event: StoredEvent) -> tuple[Any, dict[str, str]]:
        domain_event = super().to_domain_event(stored_event)
        carrier = domain_event.__dict__.pop(_TRACE_KEY, None) or {}
        return domain_event, carrier

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        return self.to_domain_event_with_trace(stored_event)[0]


class ArrayInsertRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL recorder, inserting a batch as four plain arrays.

    The stock recorder sends a batch as an array of a composite type, which psycopg
    builds in pure Python, field by field: for a writer saving hundreds of events per
    transaction that was the largest share of its CPU. Arrays of uuid, bigint, text and
    bytea are dumped by psycopg's C code. Same table lock, same NOTIFY, same
    notification ids returned in insert order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.insert_arrays_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state)"
            " SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::bytea[])"
            " RETURNING notification_id"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name))

    def _insert_stored_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> None:
        self._lock_table(curs)  # notification ids must become visible in commit order
        self._notify_channel(curs)
        curs.execute(
            self.insert_arrays_statement,
            (
                [event.originator_id for event in stored_events],
                [event.originator_version for event in stored_events],
                [event.topic for event in stored_events],
                [event.state for event in stored_events],
            ),
        )


# eventsourcing's PostgreSQL settings bound the wait for a pooled connection
# (POSTGRES_CONNECT_TIMEOUT), the events table lock and idle transactions, never a statement:
# against a database that hangs, a read or save through it waited for ever. This one (seconds)
# bounds every statement, as DATABASE_COMMAND_TIMEOUT_S does for asyncpg (ARCHITECTURE.md §7).
POSTGRES_STATEMENT_TIMEOUT = "POSTGRES_STATEMENT_TIMEOUT"
# The database URL's query (sslmode, sslrootcert, a socket's host…), as libpq reads it: the
# event store's connections are made with it too, as asyncpg's are from the whole URL. Left
# out, they went without the TLS checks asked for, or to another server than the URL names.
POSTGRES_URL_QUERY = "POSTGRES_URL_QUERY"
# The server cancels a statement past the limit (statement_timeout), which also takes a lock
# waiter out of the lock's queue; a server that answers nothing at all (stopped, frozen
# storage, a dead network) is given up by the client this much later.
NO_ANSWER_GRACE_S = 1.0


class BoundedPostgresFactory(PostgresFactory):
    """eventsourcing's PostgreSQL persistence, each statement bounded by POSTGRES_STATEMENT_TIMEOUT.

    A statement past it raises eventsourcing's OperationalError (a transient error: a 503,
    a consumer's retry), and the connection of one the server never answered is closed, so
    work goes on on fresh connections once the database answers again."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        statement_timeout_s = float(self.env.get(POSTGRES_STATEMENT_TIMEOUT) or DATABASE_COMMAND_TIMEOUT_S)
        pool = self.datastore.pool  # not opened yet: its connections are made with these
        pool.connection_class = _BoundedConnection
        pool.kwargs.update(parse_qsl(self.env.get(POSTGRES_URL_QUERY) or "", keep_blank_values=True, strict_parsing=False))
        pool.kwargs.update(
            options=f"-c statement_timeout={round(statement_timeout_s * 1000)}",
            # psycopg's own default (130 s) otherwise: the pool's waiter gives up sooner, its filler would not
            connect_timeout=max(1, round(pool.timeout)),
            answer_wait_max_s=statement_timeout_s + NO_ANSWER_GRACE_S,
        )


class _BoundedConnection(psycopg.Connection):
    """A psycopg connection that waits at most `answer_wait_max_s` for the server's answer,
    then closes itself: a conversation cut in the middle cannot be taken up again."""

    answer_wait_max_s: float

    @classmethod
    def connect(cls, conninfo: str = "", *, answer_wait_max_s: float, **kwargs: Any) -> _BoundedConnection:
        connection = super().connect(conninfo, **kwargs)
        connection.answer_wait_max_s = answer_wait_max_s
        return connection

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        try:
            return super().wait(gen, interval, self.answer_wait_max_s if timeout is None else timeout)
        except psycopg.OperationalError as error:
            if self.pgconn.transaction_status != TransactionStatus.ACTIVE:
                raise  # the server answered (a cancelled statement, say): the connection is still good
            self.close()
            raise psycopg.OperationalError(
                f"the database did not answer within {self.answer_wait_max_s:g} s; connection closed") from error


def events_table(recorder: PostgresApplicationRecorder) -> str:
    """The recorder's events table, schema-qualified and quoted, for plain SQL (asyncpg)."""
    return f"{quoted(recorder.datastore.schema)}.{quoted(recorder.events_table_name)}"


POSITION_MAX = 2**63 - 1  # bigint's largest: a read with no upper bound


async def notifications_after(connection: asyncpg.Connection, events_table: str, after: int, limit: int,
                              up_to: int = POSITION_MAX) -> list[Notification]:
    """The notification log after position `after` and up to `up_to`, at most `limit`, read
    with asyncpg on the caller's connection (a snapshot's, say): rows are decoded in C, and
    the query runs while the event loop does other work. (eventsourcing's reader runs in a
    worker thread, whose fight with the event loop for the GIL cost more than the read
    itself.) Notification ids become visible in commit order: the recorder locks the table
    to insert."""
    rows = await connection.fetch(
        f"SELECT notification_id, originator_id, originator_version, topic, state FROM {events_table}"
        " WHERE notification_id > $1 AND notification_id <= $2 ORDER BY notification_id LIMIT $3", after, up_to, limit)
    return [Notification(id=row[0], originator_id=row[1], originator_version=row[2], topic=row[3], state=row[4])
            for row in rows]


def quoted(identifier: str) -> str:
    """An SQL identifier (a schema, a table), quoted for plain SQL."""
    return '"' + identifier.replace('"', '""') + '"'


def event_store_env(settings: ServiceSettings, *, encrypted: bool = False, creates_tables: bool = True) -> dict[str, str]:
    """The environment an eventsourcing Application needs for this service's database. A
    service creates its event tables if they are not there; a tool that only reads
    (`creates_tables=False`) creates nothing, and finds a database without them no ledger."""
    url = urlsplit(settings.service_database_url)
    env = {
        "PERSISTENCE_MODULE": "kabinet_chassis.eventstore:BoundedPostgresFactory",
        "POSTGRES_DBNAME": url.path.lstrip("/"),
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_POOL_SIZE": str(settings.worker_threads),
        "POSTGRES_MAX_OVERFLOW": "0",
        "POSTGRES_CONNECT_TIMEOUT": str(DATABASE_CONNECT_TIMEOUT_S),
        POSTGRES_STATEMENT_TIMEOUT: str(DATABASE_COMMAND_TIMEOUT_S),
        POSTGRES_URL_QUERY: url.query,
        "CREATE_TABLE": "y" if creates_tables else "n",
        "MAPPER_TOPIC": "kabinet_chassis.eventstore:TracingMapper",
        "APPLICATION_RECORDER_TOPIC": "kabinet_chassis.eventstore:ArrayInsertRecorder",
    }
    if encrypted:
        if not settings.cipher_key:
            raise ValueError(f"{settings.service_name} holds PII: set KABINET_CIPHER_KEY (base64 AES key)")
        env["CIPHER_TOPIC"] = "eventsourcing.cipher:AESCipher"
        env["CIPHER_KEY"] = settings.cipher_key
    return env


class WorkerThreads:
    """Runs blocking eventsourcing calls off the event loop, bounded by the pool size."""

    def __init__(self, capacity: int) -> None:
        self.limiter = anyio.CapacityLimiter(capacity)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)
