"""The broker killed (kill -9) during a stream of transfers and started again empty (the
embedded broker keeps nothing): the ledger goes on posting meanwhile, and once the broker
is back the relay republishes, so a subscriber reading ledger.events.v1 from the start
sees every event the ledger committed, those before the kill included, none missing."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from aiokafka import AIOKafkaConsumer

from kabinet_chassis.devstack.broker import EmbeddedBroker
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.settings import ServiceSettings
from kabinet_contracts.ledger import LEDGER_TOPIC
from ledger.application import LedgerApplication
from ledger.integration import to_integration
from tests.faults.ledger_processes import LedgerProcess, TopUpStream, poster_client, running, until_answered

pytestmark = [pytest.mark.faults, pytest.mark.integration]

CUSTOMERS = 20
WORKERS = 16
KILL_AFTER_ANSWERS = 1_500
ANSWERS_WHILE_DOWN = 500
ANSWERS_AFTER_RESTART = 1_000
REPUBLISHED_WITHIN_S = 60


def committed_event_ids(settings: ServiceSettings) -> dict[str, int]:
    """Every public event the ledger committed: its event id and its log position."""
    app = LedgerApplication(env=event_store_env(settings))
    try:
        expected: dict[str, int] = {}
        position = 0
        while page := app.recorder.select_notifications(start=position, limit=5_000, inclusive_of_start=False):
            for notification in page:
                event = to_integration(app.mapper.to_domain_event(notification), notification.id)
                if event is not None:
                    expected[str(event.event_id)] = notification.id
            position = page[-1].id
        return expected
    finally:
        app.close()


async def event_ids_seen_from_the_start(bootstrap: str, expected: set[str], timeout_s: float) -> set[str]:
    """A new subscriber reading the topic from the start, collecting event ids (as an idempotent
    consumer would, a duplicate counts once), until it has seen every expected one or time is up."""
    consumer = AIOKafkaConsumer(LEDGER_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while not expected <= seen and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                seen.update(json.loads(record.value)["event_id"] for record in records)
    finally:
        await consumer.stop()
    return seen


async def test_every_committed_event_reaches_subscribers_after_the_broker_is_killed_and_comes_back_empty(
        stack, unique_name, tmp_path):
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")  # a broker of our own, to kill
    broker.start()
    try:
        settings = stack.service_settings(f"ledger_{unique_name}", kafka_bootstrap_servers=broker.bootstrap_servers)
        with running(LedgerProcess(settings, tmp_path / "ledger.log")) as ledger:
            async with poster_client(ledger) as client:
                stream_of = await TopUpStream.opened(client, CUSTOMERS)
                numbers = itertools.count()
                acknowledged = 0
                stop = asyncio.Event()

                async def stream() -> None:
                    nonlocal acknowledged
                    while not stop.is_set():
                        i = next(numbers)
                        response = await until_answered(lambda i=i: client.post("/transfers", json=stream_of.body(i)))
                        assert response.status_code == 201, response.text  # posting needs no broker
                        acknowledged += 1

                async def answered(count: int) -> None:
                    target = acknowledged + count
                    while acknowledged < target:
                        await asyncio.sleep(0.01)

                async def operator() -> None:
                    await answered(KILL_AFTER_ANSWERS)
                    await asyncio.to_thread(broker.stop, kill=True)  # kill -9: it loses every record
                    await answered(ANSWERS_WHILE_DOWN)
                    await asyncio.to_thread(broker.start)
                    await answered(ANSWERS_AFTER_RESTART)
                    stop.set()

                await asyncio.gather(operator(), *(stream() for _ in range(WORKERS)))

                expected = await asyncio.to_thread(committed_event_ids, settings)
                seen = await event_ids_seen_from_the_start(broker.bootstrap_servers, set(expected),
                                                           REPUBLISHED_WITHIN_S)
                missing = sorted(expected[event_id] for event_id in set(expected) - seen)
                assert not missing, f"{len(missing)} of {len(expected)} committed events never reached the broker," \
                                    f" positions {missing[:10]}..."
                ready = (await client.get(f"{ledger.root_url}/health/ready")).json()
                assert ready["watched"]["outbox_relay:ledger"]["status"] == "up", ready
    finally:
        broker.stop(kill=True)
