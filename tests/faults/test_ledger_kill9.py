"""`kill -9` of the ledger during a stream of 5,000 transfers loses and doubles nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.eventstore import event_store_env
from ledger.application import LedgerApplication
from ledger.verify import verify
from tests.support.tokens import ledger_poster

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TRANSFERS = 5_000
CUSTOMERS = 20
WORKERS = 16
KILL_AFTER = 1_500


def start_ledger(stack, service_name: str, port: int, log_path) -> subprocess.Popen:
    env = {**os.environ, "KABINET_SERVICE_NAME": service_name, "KABINET_DATABASE_URL": stack.database_url,
           "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers, "KABINET_DATA_DIR": str(stack.root)}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "ledger.service:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log"],
        env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115 - lives as long as the child
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"ledger did not start; see {log_path}")


async def test_kill_9_mid_stream_then_retry_posts_each_transfer_exactly_once(stack, unique_name, tmp_path):
    service_name = f"ledger_{unique_name}"
    port = free_port()
    base = f"http://127.0.0.1:{port}/ledger/v1"
    process = start_ledger(stack, service_name, port, tmp_path / "ledger.log")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10, headers=ledger_poster(stack.root)) as client:
            async def open_account(kind: str, owner: str) -> str:
                response = await client.post("/accounts", json={"owner_id": owner, "kind": kind, "currency": "RUB"},
                                             headers={"Idempotency-Key": str(uuid.uuid4())})
                assert response.status_code == 201, response.text
                return response.json()["account_id"]

            settlement = await open_account("settlement", "bank")
            customers = [await open_account("card", f"customer-{i}") for i in range(CUSTOMERS)]

            def body(i: int) -> dict:
                return {"transfer_id": f"stream-{i}", "code": "top_up", "legs": [
                    {"account_id": settlement, "amount_minor": -(i + 1), "currency": "RUB"},
                    {"account_id": customers[i % CUSTOMERS], "amount_minor": i + 1, "currency": "RUB"}]}

            accepted = {"count": 0}
            killed = asyncio.Event()

            async def stream(worker: int) -> None:
                for i in range(worker, TRANSFERS, WORKERS):
                    if killed.is_set():
                        return
                    try:
                        response = await client.post("/transfers", json=body(i))
                    except httpx.HTTPError:
                        return  # the ledger died under us
                    if response.status_code == 201:
                        accepted["count"] += 1
                        if accepted["count"] >= KILL_AFTER and not killed.is_set():
                            killed.set()
                            process.send_signal(signal.SIGKILL)

            await asyncio.gather(*(stream(w) for w in range(WORKERS)))
            assert killed.is_set(), "the ledger was never killed"
            process.wait(timeout=10)

            restarted = start_ledger(stack, service_name, port, tmp_path / "ledger.log")
            try:
                # The client does not know which of its requests landed: it retries all of them.
                semaphore = asyncio.Semaphore(WORKERS)
                replayed = {"count": 0}

                async def retry(i: int) -> None:
                    async with semaphore:
                        response = await client.post("/transfers", json=body(i))
                        assert response.status_code == 201, response.text
                        replayed["count"] += response.json()["replayed"]

                await asyncio.gather(*(retry(i) for i in range(TRANSFERS)))
                assert replayed["count"] >= KILL_AFTER - WORKERS, "transfers acknowledged before the kill were kept"

                for customer_index, customer in enumerate(customers):
                    expected = sum(i + 1 for i in range(customer_index, TRANSFERS, CUSTOMERS))
                    deadline = time.monotonic() + 30
                    while True:
                        balance = (await client.get(f"/accounts/{customer}/balance")).json()["posted"]["amount_minor"]
                        if balance == expected or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.2)
                    assert balance == expected, f"customer {customer_index}: {balance} != {expected}"
            finally:
                restarted.send_signal(signal.SIGTERM)
                restarted.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()

    settings = stack.service_settings(service_name)
    app = LedgerApplication(env=event_store_env(settings))
    try:
        report = await verify(app, settings.service_database_url)
    finally:
        app.close()
    assert report.ok, [c for c in report.checks if not c.ok]
    import asyncpg

    connection = await asyncpg.connect(settings.service_database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM ledger_transfers WHERE code = 'top_up'") == TRANSFERS
    finally:
        await connection.close()
