"""Of two ledger processes on one database, only the one that writes is ready to serve
(/health/ready): a load balancer sends customers and services to it, never to the standby,
whose writes would wait and answer 503 and whose reads would not wait for what the active
one has just committed. When the active one goes, the standby takes over and is ready."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from ledger.service import build

pytestmark = pytest.mark.integration

TAKE_OVER_WAIT_S = 15.0  # the standby asks for the lead once a second


async def readiness(service) -> httpx.Response:
    app = service.http_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ledger") as client:
        return await client.get("/health/ready")


async def until_ready(service) -> httpx.Response:
    async with asyncio.timeout(TAKE_OVER_WAIT_S):
        while (answer := await readiness(service)).status_code != 200:
            await asyncio.sleep(0.1)
    return answer


async def test_only_the_writing_ledger_process_is_ready_and_the_standby_becomes_ready_when_it_goes(stack, unique_name):
    settings = stack.service_settings(f"ledger_{unique_name}")
    (first_service, first), (second_service, second) = build(settings), build(settings)
    async with contextlib.AsyncExitStack() as first_running:
        await first_running.enter_async_context(first_service.running())
        active = await until_ready(first_service)
        assert active.json()["checks"]["writer"]["status"] == "up"
        async with second_service.running():
            standby = await readiness(second_service)
            assert standby.status_code == 503, standby.text
            assert standby.json()["checks"]["writer"] == {
                "status": "down", "detail": "LedgerUnavailable: standby: not the active writer (another ledger"
                                            " process holds the writer's lock, or this one is still taking it)"}
            assert "Retry-After" in standby.headers

            await first_running.aclose()  # the active process stops: its lock goes with its connection
            took_over = await until_ready(second_service)
            assert took_over.json()["checks"]["writer"]["status"] == "up"
            assert second.writer.is_active and not first.writer.is_active
