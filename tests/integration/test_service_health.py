"""Rules of a service's health: a process whose background loop died (a writer, a relay, a
consumer) answers but no longer works, so it is not live and gets restarted."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
import uvicorn

from gateway.service import GatewaySettings, backend_check
from gateway.service import build as build_gateway
from kabinet_chassis import health
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings
from ledger.service import build as build_ledger

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("faces_the_public", [False, True])
@pytest.mark.parametrize("ends_by", ["raising", "returning"])
async def test_a_service_whose_background_loop_died_is_not_live_and_says_which_unless_it_faces_the_public(
        stack, unique_name, ends_by, faces_the_public):
    # A loop meant to run for ever that returns (a `while` whose condition went false, a
    # `break`) leaves a process that answers and no longer does that loop's work, as one that raised.
    service = Service(stack.service_settings(unique_name), title="health", uses_database=False,
                      shows_health_detail=not faces_the_public)
    crash = asyncio.Event()

    async def relay_loop() -> None:
        await crash.wait()
        if ends_by == "raising":
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
    if faces_the_public:  # the gateway: anyone may call it, and the log names the loop
        assert response.json() == {"status": "dead"}
    else:
        assert response.json() == {"status": "dead", "dead_loops": [relay_loop.__qualname__]}


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


async def test_concurrent_readiness_calls_share_one_run_of_the_checks_and_open_a_database_connection_or_two(
        stack, unique_name, tmp_path, monkeypatch):
    """Readiness is public at the gateway: however many ask at once, the gateway's checks run
    once (one connection to PostgreSQL), and its one question to the ledger one of the ledger's
    (one more), not a connection or two per caller that would take PostgreSQL to max_connections."""
    ledger, _ = build_ledger(stack.service_settings(f"ledger_{unique_name}"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(ledger.http_app(), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    async with ledger.running():
        serving = asyncio.create_task(server.serve())
        try:
            ledger_url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(200):  # bounded: up, and its writer leading, well within 10 s
                    if server.started and (await client.get(f"{ledger_url}/health/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(health.READY_REUSED_FOR_S)  # the ledger's answer above is no longer reused
            gateway = build_gateway(GatewaySettings(database_url=stack.database_url, data_dir=tmp_path,
                                                    kafka_bootstrap_servers=stack.bootstrap_servers,
                                                    ledger_url=ledger_url))
            connections = []
            connect = asyncpg.connect

            async def counted_connect(*args, **kwargs):
                connections.append(args[0] if args else kwargs.get("dsn"))
                return await connect(*args, **kwargs)

            monkeypatch.setattr(asyncpg, "connect", counted_connect)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.http_app()),
                                         base_url="http://gw") as client:
                answers = await asyncio.gather(*(client.get("/health/ready") for _ in range(20)))
            monkeypatch.undo()
        finally:
            server.should_exit = True
            await serving
    assert [answer.status_code for answer in answers] == [200] * 20, answers[0].text
    assert len(connections) <= 2, f"{len(connections)} database connections for 20 readiness calls"
