"""Rules of a service's runtime at its margins: what operators read in /health/live and
/health/ready, and what a service leaves behind when it stops, whatever stopped it."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from kabinet_chassis import consumers, health
from kabinet_chassis import service as service_module
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings, database_name_for

pytestmark = pytest.mark.integration


class Dependency:
    """A dependency whose readiness check answers as the test says, counting how often it is asked."""

    def __init__(self) -> None:
        self.up = True
        self.asked = 0

    async def check(self) -> str:
        self.asked += 1
        if not self.up:
            raise ConnectionError("refused")
        return "answering"


def health_client(checks: dict, watched: dict | None = None) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(health.health_router(checks, watched or {}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc")


async def test_readiness_asked_again_and_again_within_its_reuse_window_asks_its_dependencies_once():
    # One caller polling in a loop (anyone may: the gateway's readiness is public) must not
    # open a database connection per call: the answer of one run is reused for a while.
    database = Dependency()
    async with health_client({"database": database.check}) as client:
        answers = [await client.get("/health/ready") for _ in range(10)]
    assert [answer.status_code for answer in answers] == [200] * 10
    assert database.asked == 1, f"{database.asked} runs of the checks for 10 calls within {health.READY_REUSED_FOR_S} s"


async def test_a_dependency_that_goes_down_makes_the_service_not_ready_once_the_reused_answer_is_old(monkeypatch):
    monkeypatch.setattr(health, "READY_REUSED_FOR_S", 0.2)
    database = Dependency()
    async with health_client({"database": database.check}) as client:
        assert (await client.get("/health/ready")).status_code == 200
        database.up = False
        await asyncio.sleep(0.3)
        down = await client.get("/health/ready")
        database.up = True
        await asyncio.sleep(0.3)
        up_again = await client.get("/health/ready")
    assert down.status_code == 503 and down.json()["checks"]["database"]["status"] == "down", down.text
    assert "Retry-After" in down.headers
    assert up_again.status_code == 200 and up_again.json()["status"] == "ready", up_again.text


async def test_a_watched_dependency_that_never_answers_leaves_readiness_ready_and_answering_sooner_than_the_gateway_gives_up():
    # The gateway waits CHECK_TIMEOUT_S for a service's readiness: a hung broker (only
    # watched) must not make the service's answer slower than that, or the gateway takes
    # the service for down and stops payments for it.
    async def hung_broker() -> str:
        await asyncio.Event().wait()
        return "never"

    database = Dependency()
    async with health_client({"database": database.check}, {"broker": hung_broker}) as client:
        started = asyncio.get_running_loop().time()
        answer = await client.get("/health/ready")
        answered_in_s = asyncio.get_running_loop().time() - started
    assert answer.status_code == 200 and answer.json()["status"] == "degraded", answer.text
    assert answer.json()["watched"]["broker"]["status"] == "down"
    assert answered_in_s < health.CHECK_TIMEOUT_S * 0.75, f"readiness took {answered_in_s:.1f} s"


async def test_a_background_loop_that_dies_is_logged_with_its_name_and_its_error_at_once(stack, unique_name, caplog):
    # /health/live makes the orchestrator restart the process; why it died is read in the log.
    service = Service(stack.service_settings(unique_name), title="health", uses_database=False)

    async def relay_loop() -> None:
        raise RuntimeError("the loop hit a bug")

    service.run_in_background(relay_loop)
    with caplog.at_level(logging.ERROR, logger=service_module.log.name):
        async with service.running():
            for _ in range(100):  # bounded: the loop dies at its first turn
                await asyncio.sleep(0.01)
                if service.dead_loops():
                    break
            await asyncio.sleep(0)  # the task's done callbacks run
            logged = [record for record in caplog.records if record.name == service_module.log.name]
    assert [record.getMessage() for record in logged] == [f"background loop {relay_loop.__qualname__} died; /health/live now fails"]
    assert "the loop hit a bug" in str(logged[0].exc_info[1])


async def connections_to(stack, service_name: str) -> int:
    connection = await asyncpg.connect(stack.database_url)
    try:
        for _ in range(100):  # bounded: the server ends a backend soon after its client goes
            count = await connection.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database_name_for(service_name))
            if not count:
                return 0
            await asyncio.sleep(0.02)
        return count
    finally:
        await connection.close()


async def test_a_service_whose_work_fails_still_stops_its_loops_and_gives_back_its_database_connections(stack, unique_name):
    service = Service(stack.service_settings(unique_name), title="fails", uses_database=True)
    stopped = asyncio.Event()

    async def relay_loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    service.run_in_background(relay_loop)
    with pytest.raises(RuntimeError, match="the work failed"):
        async with service.running():
            await asyncio.sleep(0)  # the loop starts
            raise RuntimeError("the work failed")
    assert stopped.is_set(), "the background loop was left running"
    assert service.pool is None and service.claimant is None
    assert await connections_to(stack, unique_name) == 0


async def test_a_service_whose_start_fails_gives_back_its_database_connections(stack, unique_name):
    service = Service(stack.service_settings(unique_name), title="fails to start", uses_database=True)

    @service.on_start
    async def start(svc: Service) -> None:
        raise RuntimeError("a part could not start")

    with pytest.raises(RuntimeError, match="a part could not start"):
        async with service.running():
            pass
    assert service.pool is None and service.claimant is None
    assert await connections_to(stack, unique_name) == 0


async def test_a_consumer_stuck_waiting_out_its_database_shows_degraded_but_keeps_the_service_ready(stack, unique_name):
    # A read model falling behind must not take the service's API out of load balancing:
    # its consumer's check is watched beside the gating ones, never one of them.
    service = Service(stack.service_settings(unique_name), title="consumes", uses_database=False)
    service.checks["database"] = Dependency().check
    consumer = consumers.ReadModelConsumer(name=f"{unique_name}_board", pool=None, apply=None, dead_letters=service.dead_letters)
    consumer.health.failed_rounds = consumers.CONSUMER_FAILED_ROUNDS_MAX + 1
    consumer.health.last_error = "DiskFullError: no space left"
    service.subscribe(f"{unique_name}.events.v1", consumer)
    app = service.http_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
        answer = await client.get("/health/ready")
    assert answer.status_code == 200 and answer.json()["status"] == "degraded", answer.text
    assert answer.json()["watched"][f"consumer:{consumer.name}"]["status"] == "down"
    assert "DiskFullError" in answer.json()["watched"][f"consumer:{consumer.name}"]["detail"]


async def test_a_service_that_consumes_nothing_starts_and_stops_while_the_broker_is_down(unique_name):
    # Its events wait in the outbox meanwhile: a restart during a broker outage must not stop payments.
    settings = ServiceSettings(
        service_name=unique_name, database_url="postgresql://127.0.0.1:1/unused", kafka_bootstrap_servers=f"127.0.0.1:{free_port()}"
    )
    service = Service(settings, title="publishes", uses_database=False)
    started = False
    async with asyncio.timeout(10):  # bounded: a start that waits for the broker fails here
        async with service.running():
            started = True
    assert started
