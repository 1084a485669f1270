"""`Idempotency-Key` for mutating HTTP endpoints (ARCHITECTURE.md §5).

The first request with a key runs and its answer is stored; a repeat with the same
body gets the stored answer; a repeat with another body is refused (422); a repeat
while the first is still running gets 409. Server failures (5xx) are not stored, so
the client may retry them with the same key.

Keys are kept KEY_RETENTION_S (a week) and then purged by every service in the background.
A claim names the process that took it (its `Claimant`): a repeat takes over at once a
claim whose process died, and otherwise once the claim's lease of CLAIM_LEASE_S has run out
(an attempt whose answer could not be stored, a process cut off from the database), so a
key is never stuck on 409. The operation then runs again: it must be safe to repeat
(the ledger's are: a command it already applied answers as a replay). A claim is known by
the time it was taken (`created_at`): an attempt that outlived its lease neither stores
its answer over the one that took over, nor releases that one's claim when it fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import Header
from fastapi.responses import JSONResponse

from kabinet_chassis.databases import DATABASE_COMMAND_TIMEOUT_S, DATABASE_DOWN_ERRORS, apply_schema
from kabinet_chassis.errors import PROBLEM_JSON, Problem, domain_problem

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
# Longer than any operation may take (the ledger waits at most 30 s for its read model).
CLAIM_LEASE_S = 60
# How long a key keeps its answer: a retry is expected within minutes, a repeat a week
# later is a new request. Older keys are purged in bounded batches.
KEY_RETENTION_S = 7 * 24 * 3600
# A key released by a failed attempt between our insert and our read is claimed again, this
# many times at most (each time another attempt took it and failed in between).
CLAIM_ATTEMPTS_MAX = 3
PURGE_INTERVAL_S = 3600
PURGE_BATCH_MAX = 10_000
PURGE_BATCHES_MAX = 100  # per round: a backlog is worked off over several rounds
# The first key of a claimant's two-key advisory lock (the second is its id): no other lock
# in the services' databases uses two keys with this one.
CLAIMANT_LOCK_CLASS = 0x4B414249  # "KABI"
CLAIMANT_ID_MAX = 2**31 - 1  # an int4, kept positive: pg_locks shows it as an oid
# How often a claimant makes sure it still holds its lock, and takes it back if not.
CLAIMANT_CHECK_INTERVAL_S = 1.0
CLAIMANT_ID_ATTEMPTS_MAX = 10  # ids drawn until one is free: a clash is already one in millions

SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope text NOT NULL,
    key text NOT NULL,
    request_fingerprint text NOT NULL,
    status_code integer,
    response jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
-- Added after the first release: claims taken before it name no claimant and wait out their lease.
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS claimant integer;
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at)
"""


class Claimant:
    """This process, as the owner of the Idempotency-Key claims it takes.

    It holds a session advisory lock (CLAIMANT_LOCK_CLASS, `id`) on a connection of its own
    while it lives. A process killed mid-request (kill -9, a crash, an OOM kill) loses that
    connection, and the server drops the lock at once: a repeat sent to any process then finds
    the claim's claimant holds no lock and takes the key over, instead of answering 409 for
    the rest of the lease. On a host that vanished without closing its connections, the lease
    still frees the key.

    While the lock's connection is lost (a database restart), this process's claims look dead
    to the others, who may take them over: the operation is safe to repeat and the first
    attempt's answer is then not stored (see `run_once`). Once a second it checks the lock and
    takes it back, under the same id if it can.
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.id: int | None = None
        self._connection: asyncpg.Connection | None = None

    async def start(self) -> None:
        connection = await asyncpg.connect(self.database_url, timeout=DATABASE_COMMAND_TIMEOUT_S,
                                           command_timeout=DATABASE_COMMAND_TIMEOUT_S)
        try:
            for candidate in [self.id, *(secrets.randbelow(CLAIMANT_ID_MAX) + 1 for _ in range(CLAIMANT_ID_ATTEMPTS_MAX))]:
                if candidate is not None and await connection.fetchval(
                        "SELECT pg_try_advisory_lock($1, $2)", CLAIMANT_LOCK_CLASS, candidate):
                    self._connection, self.id = connection, candidate
                    return
            raise RuntimeError(f"no free idempotency claimant id in {CLAIMANT_ID_ATTEMPTS_MAX} draws")
        except BaseException:
            connection.terminate()
            raise

    async def hold_forever(self) -> None:
        while True:
            await asyncio.sleep(CLAIMANT_CHECK_INTERVAL_S)
            try:
                if self._connection is None or self._connection.is_closed():
                    self._connection = None
                    await self.start()
                    log.info("idempotency claimant %s holds its lock again", self.id)
                else:
                    await self._connection.fetchval("SELECT 1")
            except DATABASE_DOWN_ERRORS:
                if self._connection is not None:
                    log.warning("idempotency claimant %s lost its lock's connection; its claims may be taken over",
                                self.id)
                    self._connection.terminate()
                    self._connection = None

    async def stop(self) -> None:
        """Let the lock go: this process's claims that are still open may be taken over now."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close(timeout=DATABASE_COMMAND_TIMEOUT_S)
            except DATABASE_DOWN_ERRORS:
                connection.terminate()  # the server drops the lock with the connection

    @property
    def holds_lock(self) -> bool:
        """Whether claims taken now name this process: without its lock they would look dead."""
        return self._connection is not None and not self._connection.is_closed()


async def callers_scope(pool: asyncpg.Pool, *, scope: str, caller: str, key: str) -> str:
    """The scope `caller`'s `key` is kept under (pass it to run_once). A key is its caller's
    own: callers pick their keys themselves, so two may pick the same one, and neither may be
    given the other's answer (an account and its owner) or a 422 for the other's body.

    A key first sent before keys named their caller stays under the bare `scope` it was
    stored under then: a retry across that deploy gets its first answer, or takes over its
    abandoned claim, instead of running again as a new request. Such keys are purged after
    KEY_RETENTION_S like any other; until then they are shared by all callers, as they were."""
    former = await pool.fetchval("SELECT true FROM idempotency_keys WHERE scope = $1 AND key = $2", scope, key)
    # Scope names hold no space, so the caller's part (a token subject, any text) cannot make one scope look like another.
    return scope if former else f"{scope} {caller}"


def fingerprint(body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotency_key(idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")) -> str:
    """FastAPI dependency: the header is required on every mutating call."""
    if not idempotency_key:
        raise Problem(400, "idempotency_key_required", "the Idempotency-Key header is required on this request")
    if len(idempotency_key) > MAX_KEY_LENGTH:
        raise Problem(400, "idempotency_key_invalid", f"Idempotency-Key is longer than {MAX_KEY_LENGTH} characters")
    return idempotency_key


async def ensure_schema(pool: asyncpg.Pool) -> None:
    await apply_schema(pool, "idempotency_keys", SCHEMA)


async def purge_expired(pool: asyncpg.Pool, retention_s: float = KEY_RETENTION_S) -> int:
    """Delete keys older than the retention (answered, or claims abandoned long ago); returns how many."""
    purged = 0
    for _ in range(PURGE_BATCHES_MAX):
        deleted = await pool.fetchval(
            "WITH old AS (SELECT scope, key FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)"
            " LIMIT $2)"
            " , gone AS (DELETE FROM idempotency_keys k USING old WHERE k.scope = old.scope AND k.key = old.key RETURNING 1)"
            " SELECT count(*) FROM gone",
            float(retention_s), PURGE_BATCH_MAX,
        )
        purged += deleted
        if deleted < PURGE_BATCH_MAX:
            break
    return purged


async def purge_expired_forever(pool: asyncpg.Pool) -> None:
    while True:
        try:
            await purge_expired(pool)
        except Exception:
            log.exception("purging expired idempotency keys failed; will try again")
        await asyncio.sleep(PURGE_INTERVAL_S)


async def run_once(
    pool: asyncpg.Pool,
    claimant: Claimant,
    *,
    scope: str,
    key: str,
    body: Any,
    operation: Callable[[], Awaitable[tuple[int, Any]]],
    refusals: tuple[type[Exception], ...] = (),
) -> JSONResponse:
    """Run `operation` (returning status and JSON body) at most once per (scope, key).
    `refusals`: the service's domain errors, answered and stored as problems."""
    request_fingerprint = fingerprint(body)
    claimant_id = claimant.id if claimant.holds_lock else None  # without its lock, a claim waits out its lease
    async with pool.acquire() as connection:
        for _ in range(CLAIM_ATTEMPTS_MAX):
            claimed_at = await connection.fetchval(
                "INSERT INTO idempotency_keys (scope, key, request_fingerprint, claimant) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT DO NOTHING RETURNING created_at",
                scope, key, request_fingerprint, claimant_id,
            )
            if claimed_at is not None:
                break
            row = await connection.fetchrow(
                "SELECT request_fingerprint, status_code, response FROM idempotency_keys WHERE scope = $1 AND key = $2",
                scope, key,
            )
            if row is None:
                # Gone since the insert met it: its attempt failed and let the key go (or it
                # was purged). Claim it again rather than read a row that is not there.
                continue
            if row["request_fingerprint"] != request_fingerprint:
                raise Problem(422, "idempotency_key_reused", "this Idempotency-Key was used with a different request body")
            if row["status_code"] is not None:
                return _response(row["status_code"], json.loads(row["response"]), replayed=True)
            claimed_at = await connection.fetchval(
                "UPDATE idempotency_keys SET created_at = now(), claimant = $4 WHERE scope = $1 AND key = $2"
                " AND status_code IS NULL AND (created_at < now() - make_interval(secs => $3)"
                "  OR (claimant IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                "   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                "   AND classid = $5::bigint::oid AND objid = claimant::bigint::oid AND objsubid = 2 AND granted)))"
                " RETURNING created_at",
                scope, key, float(CLAIM_LEASE_S), claimant_id, CLAIMANT_LOCK_CLASS,
            )
            if claimed_at is not None:
                break  # taken over: the first attempt's process died, or its lease ran out
            raise _in_progress()
        else:
            raise _in_progress()  # claimed and let go by others every time: still busy, retry later
    try:
        status_code, response = await operation()
    except BaseException as error:
        # A refusal (4xx, a Problem or a domain error) is the request's answer, stored like
        # any other; anything else may go better next time, so the key is released.
        problem = error if isinstance(error, Problem) else (
            domain_problem(error) if isinstance(error, refusals) else None)
        if problem is None or problem.status >= 500:
            await _release(pool, scope, key, claimed_at)
            raise
        status_code, response = problem.status, problem.body()
    async with pool.acquire() as connection:
        stored = await connection.fetchval(
            "UPDATE idempotency_keys SET status_code = $3, response = $4::jsonb"
            " WHERE scope = $1 AND key = $2 AND created_at = $5 AND status_code IS NULL RETURNING true",
            scope, key, status_code, json.dumps(response, default=str), claimed_at,
        )
    if not stored:
        # This attempt outlived its lease and a repeat took the key over: that one's answer
        # is the key's. The operation is safe to repeat, so this answer is true as well.
        log.warning("idempotency key %s/%s was taken over while its first attempt ran; its answer is not stored", scope, key)
    return _response(status_code, response, replayed=False)


def _in_progress() -> Problem:
    return Problem(409, "request_in_progress", "a request with this Idempotency-Key is still being processed",
                   headers={"Retry-After": "1"})


async def _release(pool: asyncpg.Pool, scope: str, key: str, claimed_at: datetime) -> None:
    """Let the key go, if it is still this attempt's claim."""
    async with pool.acquire() as connection:
        await connection.execute(
            "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND created_at = $3 AND status_code IS NULL",
            scope, key, claimed_at,
        )


def _response(status_code: int, body: Any, *, replayed: bool) -> JSONResponse:
    media_type = PROBLEM_JSON if status_code >= 400 else "application/json"
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return JSONResponse(body, status_code=status_code, media_type=media_type, headers=headers)
