"""PostgreSQL itself killed (SIGKILL of the postmaster and every backend, as a lost node or
the OOM killer does it) during a stream of transfers, then started again: every transfer the
ledger answered with success is there after the restart (synchronous_commit on), none is
doubled when clients retry, the ledger's process recovers by itself (pool, writer lead,
read model, relay) without being restarted, and `kabinet ledger verify` passes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time

import asyncpg
import httpx
import psutil
import pytest

from kabinet_chassis.databases import ensure_database
from kabinet_chassis.devstack.broker import EmbeddedBroker
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.devstack.postgres import EmbeddedPostgres
from kabinet_chassis.eventstore import event_store_env, events_table
from kabinet_chassis.settings import ServiceSettings
from ledger.application import LedgerApplication
from ledger.domain.transfer import Transfer
from tests.faults.ledger_processes import (
    LedgerProcess,
    TopUpStream,
    events_head,
    failed_checks,
    open_account,
    poster_client,
    running,
    until_answered,
    verified,
)
from tests.support.processes import command_line, postgres_server_processes, signal_each

pytestmark = [pytest.mark.faults, pytest.mark.integration]

log = logging.getLogger(__name__)

CUSTOMERS = 20
WORKERS = 16
KILL_AFTER_ANSWERS = 1_500
ANSWERS_AFTER_RESTART = 1_500
RECOVERY_MAX_S = 30  # from the server back to the ledger posting, its read model and relay at the log's head
CRASH_ATTEMPTS_MAX = 4
# A post and its read model's write take milliseconds; past this, the stopped WAL writer holds them up.
WAL_WRITER_STOPPED_MAX_S = 10


def the_wal_writer(postgres: EmbeddedPostgres) -> psutil.Process:
    [writer] = [process for process in postgres_server_processes(postgres.data_dir) if "walwriter" in command_line(process)]
    return writer


def kill_9(postgres: EmbeddedPostgres) -> None:
    processes = postgres_server_processes(postgres.data_dir)
    signal_each(processes, signal.SIGKILL)
    gone, alive = psutil.wait_procs(processes, timeout=20)
    assert not alive, f"PostgreSQL processes survived SIGKILL: {alive}"


async def transfers_stored(settings: ServiceSettings, transfer_ids: set[str]) -> int:
    app = LedgerApplication(env=event_store_env(settings))
    try:
        connection = await asyncpg.connect(settings.service_database_url)
        try:
            return await connection.fetchval(
                f"SELECT count(DISTINCT originator_id) FROM {events_table(app.recorder)} WHERE originator_id = ANY($1)",
                [Transfer.id_for(transfer_id) for transfer_id in transfer_ids])
        finally:
            await connection.close()
    finally:
        app.close()


async def positions(settings: ServiceSettings) -> tuple[int, int]:
    """Where the ledger's read model and its relay are in the log."""
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        projection = await connection.fetchval(
            "SELECT position FROM projection_position WHERE projection = 'ledger_read_model'")
        relay = await connection.fetchval("SELECT position FROM outbox_relay_position WHERE source = 'ledger'")
        return projection, relay
    finally:
        await connection.close()


async def test_transfers_acknowledged_before_the_database_was_killed_survive_it_and_the_ledger_recovers_by_itself(
        stack, unique_name, tmp_path):
    postgres = EmbeddedPostgres(tmp_path / "pg", free_port())  # a server of our own, to kill
    postgres.start()
    try:
        settings = ServiceSettings(service_name=f"ledger_{unique_name}", database_url=postgres.url,
                                   kafka_bootstrap_servers=stack.bootstrap_servers, data_dir=stack.root)
        await ensure_database(postgres.url, settings.service_name)
        report = await stream_through_a_database_crash(postgres, settings, tmp_path)
    finally:
        postgres.stop(mode="immediate")
    assert report.ok, failed_checks(report)


async def stream_through_a_database_crash(postgres: EmbeddedPostgres, settings: ServiceSettings, tmp_path):
    with running(LedgerProcess(settings, tmp_path / "ledger.log")) as ledger:
        pid = ledger.process.pid
        async with poster_client(ledger, timeout_s=60) as client:
            stream_of = await TopUpStream.opened(client, CUSTOMERS)
            body, customers = stream_of.body, stream_of.cards

            numbers = itertools.count()
            sent: set[int] = set()
            acknowledged: set[int] = set()
            refused: list[int] = []  # answered 503 (or not at all): outcome unknown, the client retries
            acknowledged_after_restart = 0
            server_back_at: float | None = None
            first_success_after_restart_s: float | None = None
            killed = asyncio.Event()
            ledger_saw_it = asyncio.Event()
            stop = asyncio.Event()

            async def stream() -> None:
                nonlocal acknowledged_after_restart, first_success_after_restart_s
                while not stop.is_set():
                    i = next(numbers)
                    sent.add(i)
                    try:
                        response = await client.post("/transfers", json=body(i))
                    except httpx.HTTPError:
                        response = None
                    if response is not None and response.status_code == 201:
                        acknowledged.add(i)
                        if server_back_at is not None:
                            acknowledged_after_restart += 1
                            if first_success_after_restart_s is None:
                                first_success_after_restart_s = time.monotonic() - server_back_at
                    else:
                        assert response is None or response.status_code == 503, response.text  # never a 500
                        refused.append(i)
                        if killed.is_set():
                            ledger_saw_it.set()
                        await asyncio.sleep(0.05)  # as Retry-After asks, shortened

            async def operator() -> None:
                nonlocal server_back_at
                while len(acknowledged) < KILL_AFTER_ANSWERS:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(kill_9, postgres)
                killed.set()
                await ledger_saw_it.wait()  # clients are answered 503 meanwhile
                await asyncio.to_thread(postgres.start)  # crash recovery from the WAL
                server_back_at = time.monotonic()
                deadline = server_back_at + RECOVERY_MAX_S
                while acknowledged_after_restart < ANSWERS_AFTER_RESTART:
                    assert time.monotonic() < deadline, "the ledger did not post again after the database came back"
                    await asyncio.sleep(0.01)
                stop.set()

            await asyncio.gather(operator(), *(stream() for _ in range(WORKERS)))
            assert ledger.process.poll() is None and ledger.process.pid == pid, "the ledger's process was restarted"

            # Before any retry: each transfer answered 201 is in the store, including those answered just before the kill.
            assert await transfers_stored(settings, {f"stream-{i}" for i in acknowledged}) == len(acknowledged)

            # Every part of the process catches up with the log by itself: read model and relay.
            head = await events_head(settings)
            while (at := await positions(settings)) < (head, head):
                assert time.monotonic() < server_back_at + RECOVERY_MAX_S, f"read model and relay at {at}, log at {head}"
                await asyncio.sleep(0.05)
            caught_up_s = time.monotonic() - server_back_at
            ready = (await client.get(f"{ledger.root_url}/health/ready")).json()
            assert ready["status"] == "ready", ready
            log.warning("database killed: first transfer posted %.2f s after the server was back, read model and relay"
                        " at the head after %.2f s; %d acknowledged, %d answered 503", first_success_after_restart_s,
                        caught_up_s, len(acknowledged), len(refused))
            assert refused, "the kill was not felt: no command failed"

            # The clients retry everything not acknowledged (and, not knowing, some that were): each posted once.
            semaphore = asyncio.Semaphore(WORKERS)
            replayed = {True: 0, False: 0}

            async def retry(i: int) -> None:
                async with semaphore:
                    response = await until_answered(lambda: client.post("/transfers", json=body(i)))
                    assert response.status_code == 201, response.text
                    assert response.json()["replayed"] or i not in acknowledged
                    replayed[response.json()["replayed"]] += 1

            await asyncio.gather(*(retry(i) for i in sorted(sent)))
            for customer_index, customer in enumerate(customers):
                expected = sum(i + 1 for i in sent if i % CUSTOMERS == customer_index)
                balance = (await client.get(f"/accounts/{customer}/balance")).json()["posted"]["amount_minor"]
                assert balance == expected, (customer_index, balance, expected)
            assert await transfers_stored(settings, {f"stream-{i}" for i in sent}) == len(sent)
        return await verified(settings)


async def test_history_shows_a_transfer_whose_read_model_write_the_database_crash_lost_without_another_command(
        stack, unique_name, tmp_path):
    # The read model commits without waiting for the WAL flush (ADR-0002): a crash right after
    # it applied the last transfer takes its rows and its stored position back. The transfer is
    # in the event store; with nothing posted afterwards, the history must still come to show it.
    postgres = EmbeddedPostgres(tmp_path / "pg", free_port())
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")  # stopped mid-test: the relay commits nothing
    postgres.start()
    broker.start()
    try:
        settings = ServiceSettings(service_name=f"ledger_{unique_name}", database_url=postgres.url,
                                   kafka_bootstrap_servers=broker.bootstrap_servers, data_dir=stack.root)
        await ensure_database(postgres.url, settings.service_name)
        with running(LedgerProcess(settings, tmp_path / "ledger.log")) as ledger:
            async with poster_client(ledger) as client:
                settlement = await open_account(client, "settlement", "bank")
                card = await open_account(client, "card", "customer")
                # No other commit may flush the WAL after the read model's (the relay's would, recording its position).
                await asyncio.to_thread(broker.stop, kill=True)
                # A crash loses the read model's last write only if nothing flushed the WAL first; on a
                # busy machine a checkpoint may, so the crash is tried again (a later transfer each time).
                posted_ids: list[str] = []
                for attempt in range(CRASH_ATTEMPTS_MAX):
                    # Nor the WAL writer, which flushes an asynchronous commit within moments: the crash comes first.
                    wal_writer = the_wal_writer(postgres)
                    wal_writer.send_signal(signal.SIGSTOP)
                    transfer_id = f"last-before-crash-{attempt}"

                    async def post(transfer_id=transfer_id) -> None:
                        posted = await until_answered(lambda: client.post("/transfers", json={
                            "transfer_id": transfer_id, "code": "top_up", "legs": [
                                {"account_id": settlement, "amount_minor": -700, "currency": "RUB"},
                                {"account_id": card, "amount_minor": 700, "currency": "RUB"}]}))
                        assert posted.status_code == 201, posted.text
                        await read_model_shows(settings, transfer_id, limit_s=WAL_WRITER_STOPPED_MAX_S)

                    try:
                        async with asyncio.timeout(WAL_WRITER_STOPPED_MAX_S):
                            await post()
                    except TimeoutError:
                        # Stopped while it was writing, it held the lock every commit waits for (as
                        # just after a restart): let it go on, and crash with the next transfer instead.
                        wal_writer.send_signal(signal.SIGCONT)
                        await post()  # the same id: posted once, whether or not the first try landed
                        posted_ids.insert(0, transfer_id)
                        continue
                    posted_ids.insert(0, transfer_id)  # history is newest first
                    await asyncio.to_thread(kill_9, postgres)
                    await asyncio.to_thread(postgres.start)
                    head = await events_head(settings)
                    projection_kept, _ = await positions(settings)
                    if projection_kept < head:
                        break
                else:
                    pytest.fail(f"{CRASH_ATTEMPTS_MAX} attempts lost none of the read model's last write: nothing to show")

                deadline = time.monotonic() + RECOVERY_MAX_S
                while True:
                    response = await client.get(f"/accounts/{card}/history")
                    lines = response.json().get("lines", []) if response.status_code == 200 else []
                    if [line["transfer_id"] for line in lines] == posted_ids:
                        break
                    assert time.monotonic() < deadline, f"the history never showed the transfer: {response.text}"
                    await asyncio.sleep(0.1)
            report = await verified(settings)
    finally:
        broker.stop(kill=True)
        postgres.stop(mode="immediate")
    assert report.ok, failed_checks(report)


async def read_model_shows(settings: ServiceSettings, transfer_id: str, limit_s: float = 10) -> None:
    """Waits for the read model to show the transfer, reading nothing but the read model (no
    other commit then, which would flush the WAL)."""
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        deadline = time.monotonic() + limit_s
        while not await connection.fetchval("SELECT true FROM ledger_transfers WHERE transfer_id = $1", transfer_id):
            assert time.monotonic() < deadline, f"the read model never showed {transfer_id}"
            await asyncio.sleep(0.01)
    finally:
        await connection.close()
