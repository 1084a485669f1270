"""`/health/live` (the process works: it answers, and none of its background loops has
died) and `/health/ready` (it can serve its API: the dependencies that needs answer).

Readiness takes a replica out of load balancing, so it is gated only by what serving
requests needs (the database; for the gateway, the services behind it). What only the
background work needs (the broker, the outbox relay) is watched: shown in the same answer,
making it "degraded", but still 200. Events wait safely in the outbox meanwhile; were a
broker outage or a stuck relay to fail readiness, it would take the ledger's API (and the
gateway's, which asks the ledger) out of service and stop payments for it.

Anyone who reaches a service may ask for its readiness (the gateway's is public), as often as
they like, so a run of the checks is shared by all who ask meanwhile and its answer reused for
READY_REUSED_FOR_S; and a service that faces the public (`shows_detail=False`) answers each
check's status only, its detail (server versions, addresses, a failed check's error) going to
the log instead, once when the check goes down."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

# How long one dependency may take to answer a check (connecting included).
CHECK_TIMEOUT_S = 2.0
# The budgets /health/ready gives its checks, all run side by side. A gating check may take
# longer than one dependency's answer: the gateway's asks a service's readiness, itself up
# to CHECK_TIMEOUT_S. A watched one is cut short, so that a hung broker never makes a
# service's readiness slow enough for the gateway to take the service for down.
GATING_CHECK_BUDGET_S = 2 * CHECK_TIMEOUT_S
WATCHED_CHECK_BUDGET_S = CHECK_TIMEOUT_S / 2

# How long one run of the checks answers every caller. Each run opens a database connection
# and a broker client (the gateway's asks every service's readiness, which opens more): asked
# for it on every call, 20 anonymous calls to the gateway opened 21 PostgreSQL connections,
# and anyone could push the server to max_connections. A load balancer asks every few seconds
# and acts on several answers in a row, so an answer a second old tells it the same.
READY_REUSED_FOR_S = 1.0

# A readiness check returns a short description of the dependency's state or raises.
Check = Callable[[], Awaitable[str]]
Results = dict[str, dict[str, str]]

log = logging.getLogger(__name__)


def health_router(checks: dict[str, Check], watched: dict[str, Check],
                  dead_loops: Callable[[], list[str]] = list, *, shows_detail: bool = True) -> APIRouter:
    """`checks` gate readiness; `watched` are reported beside them (see the module's
    docstring). `dead_loops` names the background loops that have ended: a writer, relay
    or consumer loop that died leaves a process that answers but no longer works, which
    only a restart mends, so liveness fails. Without `shows_detail`, readiness answers each
    check's status only, and liveness names no loop (a service that faces the public)."""
    router = APIRouter(tags=["health"])
    readiness = _SharedReadiness(checks, watched)

    @router.get("/health/live")
    async def live() -> JSONResponse:
        dead = dead_loops()
        if dead:
            # One that faces the public names none of its parts (the log names the loop, as it died).
            return JSONResponse({"status": "dead", **({"dead_loops": dead} if shows_detail else {})}, status_code=503)
        return JSONResponse({"status": "live"})

    @router.get("/health/ready")
    async def ready() -> JSONResponse:
        required, seen = await readiness.results()
        if not shows_detail:
            required, seen = _statuses(required), _statuses(seen)
        is_ready = all(result["status"] == "up" for result in required.values())
        status = "not_ready" if not is_ready else (
            "degraded" if any(result["status"] != "up" for result in seen.values()) else "ready")
        return JSONResponse(
            {"status": status, "checks": required, "watched": seen},
            status_code=200 if is_ready else 503,
            headers={} if is_ready else {"Retry-After": "5"},
        )

    return router


class _SharedReadiness:
    """One run of the checks at a time, shared by every caller that asks meanwhile, and its
    results reused for READY_REUSED_FOR_S. A check that goes down is logged with its detail
    once, and once more when it is up again (not on every call)."""

    def __init__(self, checks: dict[str, Check], watched: dict[str, Check]) -> None:
        self.checks, self.watched = checks, watched
        self._results: tuple[Results, Results] | None = None
        self._results_at = 0.0
        self._running: asyncio.Task[tuple[Results, Results]] | None = None
        self._down: set[str] = set()

    async def results(self) -> tuple[Results, Results]:
        if self._results is not None and time.monotonic() - self._results_at < READY_REUSED_FOR_S:
            return self._results
        if self._running is None:
            self._running = asyncio.create_task(self._run())
        # Shielded: a caller that goes away does not cancel the run the others wait for.
        return await asyncio.shield(self._running)

    async def _run(self) -> tuple[Results, Results]:
        try:
            results = await asyncio.gather(_run_all(self.checks, GATING_CHECK_BUDGET_S),
                                           _run_all(self.watched, WATCHED_CHECK_BUDGET_S))
            self._log_changes({**results[1], **results[0]})
            self._results, self._results_at = results, time.monotonic()
            return results
        finally:
            self._running = None

    def _log_changes(self, results: Results) -> None:
        for name, result in results.items():
            if result["status"] == "down" and name not in self._down:
                self._down.add(name)
                log.warning("readiness check %s is down: %s", name, result["detail"])
            elif result["status"] == "up" and name in self._down:
                self._down.discard(name)
                log.info("readiness check %s is up again", name)


def _statuses(results: Results) -> Results:
    return {name: {"status": result["status"]} for name, result in results.items()}


async def _run_all(checks: dict[str, Check], budget_s: float) -> Results:
    """Every check at once, each within `budget_s`: up with its detail, or down saying why."""

    async def run(check: Check) -> dict[str, str]:
        try:
            async with asyncio.timeout(budget_s):
                return {"status": "up", "detail": await check()}
        except Exception as error:  # any failure is "down"; say which
            return {"status": "down", "detail": f"{type(error).__name__}: {error}"[:300]}

    named = list(checks.items())  # a copy: checks may be registered while this runs
    results = await asyncio.gather(*(run(check) for _, check in named))
    return {name: result for (name, _), result in zip(named, results, strict=True)}


def database_check(database_url: str) -> Check:
    import asyncpg

    async def check() -> str:
        connection = await asyncpg.connect(database_url, timeout=CHECK_TIMEOUT_S)
        try:
            version = await connection.fetchval("SHOW server_version")
        finally:
            await connection.close()
        return f"PostgreSQL {version}"

    return check


def broker_check(bootstrap_servers: str) -> Check:
    from aiokafka.admin import AIOKafkaAdminClient

    async def check() -> str:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(CHECK_TIMEOUT_S * 1000))
        await admin.start()
        try:
            topics = await admin.list_topics()
        finally:
            await admin.close()
        return f"{bootstrap_servers}, {len(topics)} topics"

    return check
