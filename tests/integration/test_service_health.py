"""Rules of a service's health: a process whose background loop died (a writer, a relay, a
consumer) answers but no longer works, so it is not live and gets restarted."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kabinet_chassis.service import Service

pytestmark = pytest.mark.integration


async def test_a_service_whose_background_loop_died_is_not_live_and_says_which(stack, unique_name):
    service = Service(stack.service_settings(unique_name), title="health", uses_database=False)
    crash = asyncio.Event()

    async def relay_loop() -> None:
        await crash.wait()
        raise RuntimeError("the loop hit a bug")

    async def writer_loop() -> None:
        await asyncio.Event().wait()  # runs for ever, as it should

    service.run_in_background(relay_loop)
    service.run_in_background(writer_loop)
    async with service.running():
        app = service.http_app()  # its routes only: the lifespan (and so a second start) is not run by this transport
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            assert (await client.get("/health/live")).status_code == 200
            crash.set()
            for _ in range(100):  # bounded: the loop dies at its next turn
                await asyncio.sleep(0.01)
                if service.dead_loops():
                    break
            response = await client.get("/health/live")
    assert response.status_code == 503
    assert response.json()["dead_loops"] == [relay_loop.__qualname__]
