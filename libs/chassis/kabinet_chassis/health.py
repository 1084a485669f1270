"""`/health/live` (the process works: it answers, and none of its background loops has
died) and `/health/ready` (its dependencies answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

CHECK_TIMEOUT_S = 2.0

# A readiness check returns a short description of the dependency's state or raises.
Check = Callable[[], Awaitable[str]]


def health_router(checks: dict[str, Check], dead_loops: Callable[[], list[str]] = list) -> APIRouter:
    """`dead_loops` names the background loops that have ended: a writer, relay or
    consumer loop that died leaves a process that answers but no longer works, which only
    a restart mends, so liveness fails."""
    router = APIRouter(tags=["health"])

    @router.get("/health/live")
    async def live() -> JSONResponse:
        dead = dead_loops()
        if dead:
            return JSONResponse({"status": "dead", "dead_loops": dead}, status_code=503)
        return JSONResponse({"status": "live"})

    @router.get("/health/ready")
    async def ready() -> JSONResponse:
        results: dict[str, dict[str, str]] = {}
        for name, check in checks.items():
            try:
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    detail = await check()
                results[name] = {"status": "up", "detail": detail}
            except Exception as error:  # any failure means not ready; say which
                results[name] = {"status": "down", "detail": f"{type(error).__name__}: {error}"[:300]}
        is_ready = all(r["status"] == "up" for r in results.values())
        return JSONResponse(
            {"status": "ready" if is_ready else "not_ready", "checks": results},
            status_code=200 if is_ready else 503,
            headers={} if is_ready else {"Retry-After": "5"},
        )

    return router


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
