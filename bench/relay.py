"""Outbox relay and chassis consumer against bare aiokafka, on the same broker in one run.

relay_ratio    = relay publish rate (events read from the store's notification log,
                 mapped to integration events, published keyed by aggregate id, position
                 recorded) ÷ a bare AIOKafkaProducer send loop of the same payloads.
consumer_ratio = the chassis ReadModelConsumer under FastStream (envelope validation,
                 tracking in the same transaction, tracing hooks, manual ack) ÷ a bare
                 AIOKafkaConsumer.getmany loop doing the same database work by hand (parse
                 each record, the same upsert per event and one tracking row per partition,
                 one transaction per batch). Both sides do the same database work, so the
                 ratio measures the chassis' own overhead. A getmany loop that does nothing
                 is printed for information.

    .venv/bin/python -m bench.relay [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import asyncpg
from aiokafka import AIOKafkaConsumer
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from rich.console import Console
from rich.table import Table

from kabinet_chassis.consumers import FETCH_MAX_WAIT_MS, ReadModelConsumer
from kabinet_chassis.devstack.ephemeral import EphemeralStack
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.kafka import ensure_topics, new_producer
from kabinet_chassis.outbox import OutboxRelay, RelayConfig
from kabinet_chassis.service import Service
from kabinet_contracts.envelope import IntegrationEvent, event_id_for

SAVE_CHUNK = 500
GETMANY_RECORDS = 500
TIMEOUT_S = 300
console = Console(stderr=True)


class Parcel(Aggregate):
    @event("Sent")
    def __init__(self, sender: str, weight_g: int) -> None:
        self.sender = sender
        self.weight_g = weight_g


class Parcels(Application):
    name = "parcels"


def to_integration(domain_event, position: int) -> IntegrationEvent:
    return IntegrationEvent(
        event_id=event_id_for("parcels", position), type="parcels.parcel_sent", schema_version=1, source="parcels",
        position=position, aggregate_id=str(domain_event.originator_id), aggregate_version=domain_event.originator_version,
        occurred_at=domain_event.timestamp, payload={"sender": domain_event.sender, "weight_g": domain_event.weight_g},
    )


READ_MODEL = "CREATE TABLE IF NOT EXISTS parcel_weights (parcel_id text PRIMARY KEY, weight_g bigint NOT NULL, seen integer NOT NULL)"
UPSERT = ("INSERT INTO parcel_weights (parcel_id, weight_g, seen) VALUES ($1, $2, 1) ON CONFLICT (parcel_id)"
          " DO UPDATE SET weight_g = EXCLUDED.weight_g, seen = parcel_weights.seen + 1")


FIRST_APPLIED_AT: dict[str, float] = {}


async def apply_parcels(connection: asyncpg.Connection, events: list[IntegrationEvent]) -> None:
    FIRST_APPLIED_AT.setdefault("chassis", time.perf_counter())
    await connection.executemany(UPSERT, [(e.aggregate_id, e.payload["weight_g"]) for e in events])


async def until(predicate, what: str) -> None:
    deadline = time.perf_counter() + TIMEOUT_S
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def measure_relay(stack, events: int, topic: str) -> tuple[float, Service]:
    service = Service(stack.service_settings("bench_parcels"), title="parcels")
    holder: dict = {}

    @service.on_start
    async def start(svc: Service) -> None:
        app = Parcels(env=event_store_env(svc.settings))
        with console.status(f"storing {events} events…"):
            for start_at in range(0, events, SAVE_CHUNK):
                app.save(*[Parcel(sender=f"s{i}", weight_g=i) for i in range(start_at, min(events, start_at + SAVE_CHUNK))])
        holder["app"] = app
        holder["relay"] = OutboxRelay(
            RelayConfig(source="parcels", topic=topic, bootstrap_servers=svc.settings.kafka_bootstrap_servers),
            recorder=app.recorder, mapper=app.mapper, to_integration=to_integration,
            database_url=svc.settings.service_database_url, threads=svc.threads,
        )

    async with service.running():
        relay = holder["relay"]
        last = holder["app"].recorder.max_notification_id()
        started = time.perf_counter()
        task = asyncio.create_task(relay.run())
        await until(lambda: relay.position >= last, "the relay")
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        holder["app"].close()
    return events / elapsed, service


async def read_topic(bootstrap: str, topic: str, count: int) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=f"reader-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    records = []
    try:
        deadline = time.perf_counter() + TIMEOUT_S
        while len(records) < count and time.perf_counter() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500, max_records=GETMANY_RECORDS)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def measure_bare_send(bootstrap: str, records: list, topic: str) -> float:
    await ensure_topics(bootstrap, [topic])
    producer = new_producer(bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        started = time.perf_counter()
        deliveries = [await producer.send(topic, value=r.value, key=r.key, headers=list(r.headers)) for r in records]
        await asyncio.gather(*deliveries)
        elapsed = time.perf_counter() - started
    finally:
        await producer.stop()
    return len(records) / elapsed


async def measure_chassis_consumer(stack, topic: str, events: int) -> float:
    service = Service(stack.service_settings(f"bench_board_{uuid.uuid4().hex[:6]}"), title="board")
    holder: dict = {}

    @service.on_start
    async def start(svc: Service) -> None:
        async with svc.pool.acquire() as connection:
            await connection.execute(READ_MODEL)
        holder["consumer"] = ReadModelConsumer(f"board_{uuid.uuid4().hex[:6]}", svc.pool, apply_parcels, svc.dead_letters)
        svc.subscribe(topic, holder["consumer"])

    FIRST_APPLIED_AT.clear()
    async with service.running():
        await until(lambda: holder["consumer"].applied_total >= events, "the chassis consumer")
        # From the first record applied: group joins take seconds and are not throughput.
        elapsed = time.perf_counter() - FIRST_APPLIED_AT["chassis"]
    return events / elapsed


async def measure_bare_consumer(stack, topic: str, events: int, with_database: bool) -> float:
    pool = None
    if with_database:
        service_db = stack.service_settings(f"bench_bare_{uuid.uuid4().hex[:6]}")
        from kabinet_chassis.databases import create_pool, ensure_database

        await ensure_database(stack.database_url, service_db.service_name)
        pool = await create_pool(service_db.service_database_url, max_size=2)
        await pool.execute(READ_MODEL)
        await pool.execute("CREATE TABLE IF NOT EXISTS tracking (topic text, partition int, position bigint,"
                           " PRIMARY KEY (topic, partition))")
    started = None
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=stack.bootstrap_servers, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=f"bare-{uuid.uuid4().hex[:6]}",
                                fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    await consumer.start()
    seen = 0
    try:
        deadline = time.perf_counter() + TIMEOUT_S
        while seen < events and time.perf_counter() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=GETMANY_RECORDS)
            if not batches:
                continue
            if started is None:
                started = time.perf_counter()  # from the first record, as for the chassis
            if pool is None:
                seen += sum(len(records) for records in batches.values())
                continue
            async with pool.acquire() as connection, connection.transaction():
                for tp, records in batches.items():
                    parsed = [json.loads(r.value) for r in records]
                    await connection.executemany(UPSERT, [(p["aggregate_id"], p["payload"]["weight_g"]) for p in parsed])
                    await connection.execute(
                        "INSERT INTO tracking VALUES ($1, $2, $3) ON CONFLICT (topic, partition) DO UPDATE"
                        " SET position = EXCLUDED.position WHERE tracking.position < EXCLUDED.position",
                        tp.topic, tp.partition, parsed[-1]["position"],
                    )
                    seen += len(records)
            await consumer.commit()
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
        if pool is not None:
            await pool.close()
    return seen / elapsed


async def main(events: int) -> dict:
    with EphemeralStack(prefix="kabinet-bench-") as stack:
        relay_topic = f"parcels-{uuid.uuid4().hex[:6]}.events.v1"
        relay_rate, _ = await measure_relay(stack, events, relay_topic)
        with console.status("reading the relay's records back…"):
            records = await read_topic(stack.bootstrap_servers, relay_topic, events)
        assert len(records) >= events, f"relay topic holds {len(records)} of {events}"
        bare_send_rate = await measure_bare_send(stack.bootstrap_servers, records[:events], f"bare-{uuid.uuid4().hex[:6]}")
        with console.status("chassis consumer…"):
            chassis_rate = await measure_chassis_consumer(stack, relay_topic, events)
        with console.status("bare consumer…"):
            bare_consume_rate = await measure_bare_consumer(stack, relay_topic, events, with_database=True)
            fetch_only_rate = await measure_bare_consumer(stack, relay_topic, events, with_database=False)
    table = Table(title=f"relay and consumer vs bare aiokafka ({events} events, same broker)")
    for column in ("path", "events/s", "bare events/s", "ratio", "goal"):
        table.add_column(column, justify="right")
    table.add_row("relay publish", f"{relay_rate:.0f}", f"{bare_send_rate:.0f}", f"{relay_rate / bare_send_rate:.2f}", "≥ 0.7")
    table.add_row("consume into read model", f"{chassis_rate:.0f}", f"{bare_consume_rate:.0f}",
                  f"{chassis_rate / bare_consume_rate:.2f}", "≥ 0.8")
    table.add_row("getmany, no work (info)", "", f"{fetch_only_rate:.0f}", "", "")
    Console().print(table)
    return {
        "relay_ratio": round(relay_rate / bare_send_rate, 3),
        "consumer_ratio": round(chassis_rate / bare_consume_rate, 3),
        "relay_events_per_s": round(relay_rate, 1),
        "bare_send_per_s": round(bare_send_rate, 1),
        "chassis_consume_per_s": round(chassis_rate, 1),
        "bare_consume_per_s": round(bare_consume_rate, 1),
        "bare_fetch_only_per_s": round(fetch_only_rate, 1),
        "events": events,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    print(json.dumps(asyncio.run(main(parser.parse_args().events))))
