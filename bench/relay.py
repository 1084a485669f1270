"""Outbox relay and chassis consumer against bare aiokafka, on the same broker in one run.

Starts its own embedded PostgreSQL and broker on free loopback ports (or uses the
servers named by KABINET_DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS), stores N events
in an eventsourcing application, and measures:

relay_ratio    = relay rate ÷ bare send rate, both timed with their producer started and
                 their topic in place.
                 Relay: from the moment `OutboxRelay.run()` is relaying (it has connected,
                 taken its advisory lock, started its producer and created its topic:
                 that start-up is printed separately) until its recorded position is the
                 last notification id, polled every 10 ms. It reads the notification log,
                 maps each stored event to an integration event, publishes it keyed by
                 aggregate id and records its position once the broker acknowledged.
                 Bare: the exact records the relay produced (read back from its topic:
                 key, value, headers) sent by an AIOKafkaProducer with the settings of
                 `kabinet_chassis.kafka.new_producer` — `await producer.send()` each, then
                 gather the futures — to a fresh topic with the same partition count,
                 producer already started.
consumer_ratio = chassis consume rate ÷ bare consume rate, both reading the relay's
                 topic from the start with a new consumer group, timed from the first
                 batch a subscriber receives until all N events are applied. The group
                 join before it (subscriber start to first batch) takes ~5 s on the
                 embedded broker whatever the client, which would swamp the ~0.4 s of
                 work at N=20000; it is printed separately, for both sides.
                 Chassis: a `Service` with a `ReadModelConsumer` subscribed through
                 `subscribe` (FastStream batch subscriber, manual ack).
                 Bare: an `AIOKafkaConsumer.getmany(max_records=500)` loop with the same
                 fetch settings that does the SAME database work by hand: parse each
                 record as JSON, and in ONE transaction per batch apply the same upsert
                 to the same read-model table for every event (one executemany) and
                 upsert the same tracking rows, then commit offsets.
                 Both sides do the same database work, so the ratio measures the
                 chassis' own overhead: FastStream, envelope validation (pydantic),
                 the tracking read for dedupe, tracing hooks, acknowledgement.
A getmany loop that does nothing is printed for information (the broker's fetch ceiling).

The whole run, bare sides included, uses the garbage-collector settings of a service
process (`kabinet_chassis.runtime`, applied by `Service.running`): one runtime for both
sides, so the ratios compare code, not interpreter settings.

After a warm-up of the same code paths on a small topic, the whole set runs ROUNDS
times and each rate is the median of its rounds: on two shared cores one run swings
by ±20%. Every timed phase starts from a collected heap (gc.collect()), so neither
side pays for garbage the other left behind; each still pays for its own.
The last line of output is one JSON object with the figures.

    .venv/bin/python -m bench.relay [--events 20000] [--traced]

--traced saves the events inside a span, as a command served over HTTP does, so every
event carries a trace context: the relay then opens a PRODUCER span per event and the
consumer a CONSUMER span per event (SDK tracer provider, no exporter).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from opentelemetry import trace

from bench.common import console, emit_json, print_table, unique, until
from kabinet_chassis.consumers import FETCH_MAX_WAIT_MS, MAX_BATCH_RECORDS, TRACKING_SCHEMA, ReadModelConsumer
from kabinet_chassis.databases import create_pool, ensure_database
from kabinet_chassis.devstack.ephemeral import EphemeralStack
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.kafka import ensure_topics, new_producer
from kabinet_chassis.outbox import OutboxRelay, RelayConfig
from kabinet_chassis.runtime import tune_garbage_collector
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings
from kabinet_chassis.telemetry import install_tracing
from kabinet_contracts.envelope import IntegrationEvent, event_id_for

SAVE_CHUNK = 500
WARM_UP_EVENTS = 1000
ROUNDS = 3
POLL_S = 0.01
GETMANY_TIMEOUT_MS = 200

# --- a tiny event-sourced service: one event per parcel ------------------------------


class Parcel(Aggregate):
    @event("Sent")
    def __init__(self, sender: str, weight_g: int) -> None:
        self.sender = sender
        self.weight_g = weight_g


class Parcels(Application):
    name = "parcels"


def parcel_to_integration(source: str):
    def to_integration(domain_event, position: int) -> IntegrationEvent:
        return IntegrationEvent(
            event_id=event_id_for(source, position), type="parcels.parcel_sent", schema_version=1, source=source,
            position=position, aggregate_id=str(domain_event.originator_id),
            aggregate_version=domain_event.originator_version, occurred_at=domain_event.timestamp,
            payload={"sender": domain_event.sender, "weight_g": domain_event.weight_g},
        )

    return to_integration


# --- the read model both consumers maintain -------------------------------------------

READ_MODEL = """
CREATE TABLE IF NOT EXISTS parcel_weights (
    parcel_id text PRIMARY KEY,
    weight_g bigint NOT NULL,
    applied_count integer NOT NULL
)
"""
UPSERT = (
    "INSERT INTO parcel_weights (parcel_id, weight_g, applied_count) VALUES ($1, $2, 1) ON CONFLICT (parcel_id)"
    " DO UPDATE SET weight_g = EXCLUDED.weight_g, applied_count = parcel_weights.applied_count + 1"
)
# The chassis' own tracking statement (consumers.py), written by hand on the bare side.
TRACKING_UPSERT = (
    "INSERT INTO consumer_tracking (consumer, source, topic, partition, position) VALUES ($1, $2, $3, $4, $5)"
    " ON CONFLICT (consumer, source, topic, partition) DO UPDATE SET position = EXCLUDED.position"
    " WHERE consumer_tracking.position < EXCLUDED.position"
)


async def apply_parcels(connection: asyncpg.Connection, events: Sequence[IntegrationEvent]) -> None:
    await connection.executemany(UPSERT, [(e.aggregate_id, e.payload["weight_g"]) for e in events])


async def read_model_rows(settings: ServiceSettings) -> int:
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        return await connection.fetchval("SELECT coalesce(sum(applied_count), 0) FROM parcel_weights")
    finally:
        await connection.close()


# --- measurements ------------------------------------------------------------------------


def store_events(settings: ServiceSettings, count: int, traced: bool) -> Parcels:
    app = Parcels(env=event_store_env(settings))
    tracer = trace.get_tracer("bench.relay")
    for start_at in range(0, count, SAVE_CHUNK):
        parcels = [Parcel(sender=f"s{i}", weight_g=i) for i in range(start_at, min(count, start_at + SAVE_CHUNK))]
        if traced:
            with tracer.start_as_current_span("POST /parcels"):
                app.save(*parcels)
        else:
            app.save(*parcels)
    return app


async def measure_relay(stack, count: int, topic: str, traced: bool) -> tuple[float, float]:
    """(events/s once relaying, seconds from `run()` to relaying)."""
    settings = stack.service_settings(unique("bench_parcels"))
    await ensure_database(settings.database_url, settings.service_name)
    with console.status(f"storing {count} events…"):
        app = await asyncio.to_thread(store_events, settings, count, traced)
    try:
        last = app.recorder.max_notification_id()
        relay = OutboxRelay(
            RelayConfig(source=settings.service_name, topic=topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                        enable_idempotence=settings.kafka_enable_idempotence),
            recorder=app.recorder, mapper=app.mapper, to_integration=parcel_to_integration(settings.service_name),
            database_url=settings.service_database_url,
        )
        launched = time.perf_counter()
        task = asyncio.create_task(relay.run())
        try:
            await until(lambda: relay.relaying.is_set() or task.done(), "the relay's start", interval_s=POLL_S / 10)
            started = time.perf_counter()
            await until(lambda: relay.position >= last or task.done(), "the relay", interval_s=POLL_S)
            elapsed = time.perf_counter() - started
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if relay.position < last:
            task.result()  # raises what stopped it
    finally:
        app.close()
    return count / elapsed, started - launched


async def read_back(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=unique("reader"))
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = time.perf_counter() + 60
        while len(records) < count and time.perf_counter() < deadline:
            for batch in (await consumer.getmany(timeout_ms=GETMANY_TIMEOUT_MS, max_records=MAX_BATCH_RECORDS)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    if len(records) != count:
        raise RuntimeError(f"{topic} holds {len(records)} records, expected {count}")
    return records


async def measure_bare_send(bootstrap: str, records: Sequence[ConsumerRecord], topic: str) -> float:
    await ensure_topics(bootstrap, [topic], RelayConfig.partitions)
    producer = new_producer(bootstrap, RelayConfig.enable_idempotence)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [await producer.send(topic, value=r.value, key=r.key, headers=list(r.headers)) for r in records]
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
    finally:
        await producer.stop()
    return len(records) / elapsed


async def measure_chassis_consumer(stack, topic: str, count: int) -> tuple[float, float]:
    """(events/s from the first batch, seconds from the subscriber's start to its first batch)."""
    service = Service(stack.service_settings(unique("bench_board")), title="board")
    parts: dict = {}

    @service.on_start
    async def start(svc: Service) -> None:
        await svc.pool.execute(READ_MODEL)
        consumer = ReadModelConsumer(svc.settings.service_name, svc.pool, apply_parcels, svc.dead_letters)
        handle = consumer.handle

        async def timed_handle(records) -> None:  # marks the first batch and the one that completes the run
            parts.setdefault("first_batch", time.perf_counter())
            await handle(records)
            if consumer.applied_total >= count:
                parts.setdefault("done", time.perf_counter())

        consumer.handle = timed_handle
        svc.subscribe(topic, consumer)
        parts["consumer"] = consumer
        parts["started"] = time.perf_counter()  # what follows: topic check, broker (subscriber) start

    async with service.running():
        consumer = parts["consumer"]
        await until(lambda: "done" in parts, "the chassis consumer", interval_s=POLL_S)
    if consumer.applied_total != count or consumer.dead_letters.sent_total:
        raise RuntimeError(f"chassis consumer applied {consumer.applied_total}, dead-lettered {consumer.dead_letters.sent_total}")
    if await read_model_rows(service.settings) != count:
        raise RuntimeError("chassis read model does not hold one application per event")
    return count / (parts["done"] - parts["first_batch"]), parts["first_batch"] - parts["started"]


def _bare_consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    # What the FastStream subscriber of `consumers.subscribe` asks for.
    return AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=unique("bare"), auto_offset_reset="earliest",
                            enable_auto_commit=False, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)


async def measure_bare_consumer(stack, topic: str, count: int) -> tuple[float, float]:
    """(events/s from the first batch, seconds from the consumer's start to its first batch)."""
    settings = stack.service_settings(unique("bench_bare"))
    await ensure_database(settings.database_url, settings.service_name)
    pool = await create_pool(settings.service_database_url, max_size=settings.worker_threads)
    try:
        await pool.execute(READ_MODEL)
        await pool.execute(TRACKING_SCHEMA)
        seen = 0
        first_batch = None
        started = time.perf_counter()
        consumer = _bare_consumer(stack.bootstrap_servers, topic)
        await consumer.start()
        try:
            while seen < count:
                batches = await consumer.getmany(timeout_ms=GETMANY_TIMEOUT_MS, max_records=MAX_BATCH_RECORDS)
                records = [record for partition_records in batches.values() for record in partition_records]
                if not records:
                    continue
                if first_batch is None:
                    first_batch = time.perf_counter()
                events = [json.loads(record.value) for record in records]
                positions = {(e["source"], r.topic, r.partition): e["position"] for r, e in zip(records, events, strict=True)}
                async with pool.acquire() as connection, connection.transaction():
                    await connection.executemany(UPSERT, [(e["aggregate_id"], e["payload"]["weight_g"]) for e in events])
                    await connection.executemany(TRACKING_UPSERT, [(settings.service_name, *key, p) for key, p in positions.items()])
                await consumer.commit()
                seen += len(records)
            done = time.perf_counter()
        finally:
            await consumer.stop()
    finally:
        await pool.close()
    if seen != count or await read_model_rows(settings) != count:
        raise RuntimeError(f"bare consumer saw {seen} records, expected {count}")
    return count / (done - first_batch), first_batch - started


async def measure_fetch_only(stack, topic: str, count: int) -> tuple[float, float]:
    seen = 0
    first_batch = None
    started = time.perf_counter()
    consumer = _bare_consumer(stack.bootstrap_servers, topic)
    await consumer.start()
    try:
        while seen < count:
            batches = await consumer.getmany(timeout_ms=GETMANY_TIMEOUT_MS, max_records=MAX_BATCH_RECORDS)
            if batches and first_batch is None:
                first_batch = time.perf_counter()
            seen += sum(len(records) for records in batches.values())
        done = time.perf_counter()
    finally:
        await consumer.stop()
    return count / (done - first_batch), first_batch - started


async def run_all(stack, count: int, traced: bool) -> dict[str, float]:
    """Relay, bare send, chassis consume, bare consume, fetch only, for `count` events (rates and join times)."""
    relay_topic = f"{unique('parcels')}.events.v1"
    gc.collect()
    rates: dict[str, float] = {}
    rates["relay"], rates["relay_start_s"] = await measure_relay(stack, count, relay_topic, traced)
    records = await read_back(stack.bootstrap_servers, relay_topic, count)
    gc.collect()
    rates["bare_send"] = await measure_bare_send(stack.bootstrap_servers, records, f"{unique('bare')}.events.v1")
    del records
    gc.collect()
    with console.status("chassis consumer…"):
        rates["chassis_consume"], rates["chassis_join_s"] = await measure_chassis_consumer(stack, relay_topic, count)
    gc.collect()
    with console.status("bare consumer…"):
        rates["bare_consume"], rates["bare_join_s"] = await measure_bare_consumer(stack, relay_topic, count)
    gc.collect()
    with console.status("fetch only…"):
        rates["fetch_only"], rates["fetch_join_s"] = await measure_fetch_only(stack, relay_topic, count)
    return rates


async def run_rounds(stack, count: int, traced: bool) -> dict[str, float]:
    rounds = []
    for number in range(1, ROUNDS + 1):
        console.log(f"round {number} of {ROUNDS}: {count} events")
        rounds.append(await run_all(stack, count, traced))
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


async def main(count: int, traced: bool) -> dict:
    # The tracer provider every service installs (Service.running); no exporter.
    install_tracing("bench")
    with EphemeralStack(prefix="kabinet-bench-") as stack:
        gc_young_threshold = stack.service_settings("bench").gc_young_threshold
        tune_garbage_collector(gc_young_threshold)
        console.log(f"warming up with {WARM_UP_EVENTS} events")
        await run_all(stack, WARM_UP_EVENTS, traced)
        rates = await run_rounds(stack, count, traced)
    # Ratios of the median rates.
    relay_ratio = rates["relay"] / rates["bare_send"]
    consumer_ratio = rates["chassis_consume"] / rates["bare_consume"]
    print_table(
        f"relay and consumer vs bare aiokafka (median of {ROUNDS} rounds of {count} events{', traced' if traced else ''},"
        " same broker;"
        " start s = untimed relay start-up or group join, chassis / bare;"
        f" gc young threshold {gc_young_threshold} for both sides)",
        ("path", "chassis events/s", "bare events/s", "ratio", "goal", "start s"),
        [
            ("relay publish", f"{rates['relay']:.0f}", f"{rates['bare_send']:.0f}", f"{relay_ratio:.2f}", "≥ 0.7",
             f"{rates['relay_start_s']:.2f} / –"),
            ("consume into read model", f"{rates['chassis_consume']:.0f}", f"{rates['bare_consume']:.0f}",
             f"{consumer_ratio:.2f}", "≥ 0.8", f"{rates['chassis_join_s']:.2f} / {rates['bare_join_s']:.2f}"),
            ("getmany, no work (info)", "", f"{rates['fetch_only']:.0f}", "", "", f"– / {rates['fetch_join_s']:.2f}"),
        ],
    )
    return {
        "relay_ratio": round(relay_ratio, 3),
        "consumer_ratio": round(consumer_ratio, 3),
        "relay_events_per_s": round(rates["relay"], 1),
        "bare_send_per_s": round(rates["bare_send"], 1),
        "chassis_consume_per_s": round(rates["chassis_consume"], 1),
        "bare_consume_per_s": round(rates["bare_consume"], 1),
        "bare_fetch_only_per_s": round(rates["fetch_only"], 1),
        "events": count,
        "rounds": ROUNDS,
        "gc_young_threshold": gc_young_threshold,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events to relay and consume (default 20000)")
    parser.add_argument("--traced", action="store_true", help="events carry a trace context, as in production")
    arguments = parser.parse_args()
    emit_json(asyncio.run(main(arguments.events, arguments.traced)))
