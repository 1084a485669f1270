"""Rules of the gateway's health answers: the gateway is the one public entry, so whoever asks
its readiness, with no token, learns whether each check is up, never what runs behind it (the
PostgreSQL version, the broker's address, a service's internal URL) nor why a check failed
(an internal IP, "password authentication failed for user …"). Operators read that in the
gateway's log, once when the check goes down; internal services keep their detail."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from gateway.service import GatewaySettings, build
from kabinet_chassis import health
from kabinet_chassis.devstack.ports import free_port

pytestmark = pytest.mark.integration


async def ready_ledger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A ledger whose readiness is up."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 19\r\n\r\n"
                 b'{"status": "ready"}')
    await writer.drain()
    writer.close()


async def anonymous_readiness(settings: GatewaySettings) -> httpx.Response:
    app = build(settings).http_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.get("/health/ready")


async def test_an_anonymous_caller_of_the_gateways_readiness_sees_each_checks_status_and_nothing_behind_it(
        stack, tmp_path):
    ledger = await asyncio.start_server(ready_ledger, "127.0.0.1", 0)
    ledger_url = f"http://127.0.0.1:{ledger.sockets[0].getsockname()[1]}"
    try:
        response = await anonymous_readiness(GatewaySettings(
            database_url=stack.database_url, kafka_bootstrap_servers=stack.bootstrap_servers, data_dir=tmp_path,
            ledger_url=ledger_url))
    finally:
        ledger.close()
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "checks": {"ledger": {"status": "up"}},
                               "watched": {"broker": {"status": "up"}, "database": {"status": "up"}}}
    for hidden in ("PostgreSQL", stack.bootstrap_servers, ledger_url, "127.0.0.1", "topics"):
        assert hidden not in response.text, hidden


async def test_a_failed_check_is_down_without_its_error_which_the_gateway_logs_once_when_it_goes_down(
        stack, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(health, "READY_REUSED_FOR_S", 0.0)  # every call runs the checks again
    caplog.set_level(logging.INFO, logger=health.__name__)
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    settings = GatewaySettings(database_url="postgresql://kabinet:hunter2@127.0.0.1:1/kabinet",
                               kafka_bootstrap_servers=stack.bootstrap_servers, data_dir=tmp_path,
                               ledger_url=nothing_listens)
    app = build(settings).http_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        answers = [await client.get("/health/ready") for _ in range(3)]
    for response in answers:
        assert response.status_code == 503 and "Retry-After" in response.headers, response.text
        assert response.json()["checks"] == {"ledger": {"status": "down"}}
        assert response.json()["watched"]["database"] == {"status": "down"}
        for hidden in ("127.0.0.1", "Error", "hunter2", "kabinet"):
            assert hidden not in response.text, hidden
    lines = [record.getMessage() for record in caplog.records
             if record.name == health.__name__ and record.levelno >= logging.WARNING]
    assert len([line for line in lines if "check ledger is down" in line]) == 1, lines
    assert len([line for line in lines if "check database is down" in line]) == 1, lines
    assert any("ConnectError" in line for line in lines if "check ledger" in line), lines
