"""kill -9 of the ledger process during a stream of 5,000 transfers; after the restart the
client retries every transfer with the same id: each is posted exactly once, and
`kabinet ledger verify` passes (issue 3's acceptance)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from tests.faults.ledger_processes import LedgerProcess, TopUpStream, failed_checks, poster_client, running, verified

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TRANSFERS = 5_000
CUSTOMERS = 20
WORKERS = 16
KILL_AFTER = 1_500


async def test_kill_9_mid_stream_then_retry_posts_each_transfer_exactly_once(stack, unique_name, tmp_path):
    settings = stack.service_settings(f"ledger_{unique_name}")
    ledger = LedgerProcess(settings, tmp_path / "ledger.log")
    with running(ledger):
        async with poster_client(ledger, timeout_s=10) as client:
            stream_of = await TopUpStream.opened(client, CUSTOMERS)
            body, customers = stream_of.body, stream_of.cards

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
                            ledger.kill()

            await asyncio.gather(*(stream(w) for w in range(WORKERS)))
            assert killed.is_set(), "the ledger was never killed"

            ledger.start()  # the same port and database: the operator restarts it
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

    report = await verified(settings)
    assert report.ok, failed_checks(report)
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM ledger_transfers WHERE code = 'top_up'") == TRANSFERS
    finally:
        await connection.close()
