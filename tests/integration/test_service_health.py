"""Rules of a service's health: a process whose background loop died (a writer, a relay, a
consumer) answers but no longer works, so it is not live and gets restarted."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import uvicorn

from gateway.service import backend_check
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings

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


async def test_a_gateway_stays_ready_while_a_services_broker_hangs_unanswering():
    # A hung broker (accepts, never answers) is only watched: the service's readiness must
    # come back well within the time the gateway gives it, or the gateway takes it for down.
    hung_broker = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    broker_port = hung_broker.sockets[0].getsockname()[1]
    settings = ServiceSettings(service_name="hung_broker", database_url="postgresql://127.0.0.1:1/unused",
                               kafka_bootstrap_servers=f"127.0.0.1:{broker_port}")
    service = Service(settings, title="backend", uses_database=False)
    service.checks["database"] = _answering_database
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(service.http_app(), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):  # bounded: it starts in well under a second
            if server.started:
                break
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=10) as client:
            own = await client.get(f"http://127.0.0.1:{port}/health/ready")
        assert own.status_code == 200 and own.json()["status"] == "degraded", own.text
        assert own.json()["watched"]["broker"]["status"] == "down"
        assert "ready at" in await backend_check("ledger", f"http://127.0.0.1:{port}")()
    finally:
        server.should_exit = True
        await serving
        hung_broker.close()


async def _answering_database() -> str:
    return "PostgreSQL"
