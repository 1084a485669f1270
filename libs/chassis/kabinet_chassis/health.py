"""`/health/live` (the process works: it answers, and none of its background loops has
died) and `/health/ready` (it can serve its API: the dependencies that needs answer).

Readiness takes a replica out of load balancing, so it is gated only by what serving
requests needs (the database; for the gateway, the services behind it). What only the
background work needs (the broker, the outbox relay) is watched: shown in the same answer,
making it "degraded", but still 200. Events wait safely in the outbox meanwhile; were a
broker outage or a stuck relay to fail readiness, it would take the ledger's API (and the
gateway's, which asks the ledger) out of service and stop payments for it."""

from __future__ import annotations

import asyncio
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

# A readiness check returns a short description of the dependency's state or raises.
Check = Callable[[], Awaitable[str]]


def health_router(checks: dict[str, Check], watched: dict[str, Check],
                  dead_loops: Callable[[], list[str]] = list) -> APIRouter:
    """`checks` gate readiness; `watched` are reported beside them (see the module's
    docstring). `dead_loops` names the background loops that have ended: a writer, relay
    or consumer loop that died leaves a process that answers but no longer works, which
    only a restart mends, so liveness fails."""
    router = APIRouter(tags=["health"])

    @router.get("/health/live")
    async def live() -> JSONResponse:
        dead = dead_loops()
        if dead:
            return JSONResponse({"status": "dead", "dead_loops": dead}, status_code=503)
        return JSONResponse({"status": "live"})

    @router.get("/health/ready")
    async def ready() -> JSONResponse:
        required, seen = await asyncio.gather(_run_all(checks, GATING_CHECK_BUDGET_S),
                                              _run_all(watched, WATCHED_CHECK_BUDGET_S))
        is_ready = all(result["status"] == "up" for result in required.values())
        status = "not_ready" if not is_ready else (
            "degraded" if any(result["status"] != "up" for result in seen.values()) else "ready")
        return JSONResponse(
            {"status": status, "checks": required, "watched": seen},
            status_code=200 if is_ready else 503,
            headers={} if is_ready else {"Retry-After": "5"},
        )

    return router


async def _run_all(checks: dict[str, Check], budget_s: float) -> dict[str, dict[str, str]]:
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
