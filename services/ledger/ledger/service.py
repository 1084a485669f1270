"""Wiring of the ledger service: event store, batched writer, read model, relay, API."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from kabinet_chassis import append_only, history_seals
from kabinet_chassis.auth import verifier_for
from kabinet_chassis.eventstore import event_store_env, events_table
from kabinet_chassis.outbox import OutboxRelay, RelayConfig
from kabinet_chassis.projection import LocalProjection
from kabinet_chassis.service import Service
from kabinet_chassis.settings import ServiceSettings
from kabinet_contracts.ledger import LEDGER_TOPIC
from ledger import projections
from ledger.api import Ledger, build_router
from ledger.application import LedgerApplication, ensure_store_schema
from ledger.clock import Clock, system_clock
from ledger.domain import commands
from ledger.domain.errors import LedgerError
from ledger.integration import SOURCE, to_integration
from ledger.writer import BatchedWriter, LedgerBusy, LedgerUnavailable

log = logging.getLogger(__name__)

EXPIRY_SWEEP_INTERVAL_S = 1.0
EXPIRY_SWEEP_BATCH_MAX = 500
# Pages swept back to back while full (holds falling due together, e.g. at midnight), each
# paced by the writer: 10,000 expiries a second at most, where one page a second took
# over half an hour for a million.
EXPIRY_SWEEP_PAGES_MAX = 20


@dataclass
class LedgerParts(Ledger):
    app: LedgerApplication | None = None
    relay: OutboxRelay | None = None
    sealer: history_seals.Sealer | None = None


def build(settings: ServiceSettings, clock: Clock = system_clock) -> tuple[Service, LedgerParts]:
    service = Service(settings, title="Kabinet ledger")
    service.domain_errors = (LedgerError,)
    parts = LedgerParts()

    @service.on_start
    async def start(svc: Service) -> None:
        app = LedgerApplication(env=event_store_env(settings))
        parts.app = app
        parts.pool = svc.pool
        parts.claimant = svc.claimant
        await ensure_store_schema(svc.pool, app)
        await append_only.guard(svc.pool, events_table(app.recorder))
        await history_seals.ensure_schema(svc.pool)
        await projections.ensure_schema(svc.pool)
        parts.projection = LocalProjection(
            projections.READ_MODEL_PROJECTION, pool=svc.pool, recorder=app.recorder, mapper=app.mapper,
            apply_page=projections.apply_page, threads=svc.threads,
        )
        parts.writer = BatchedWriter(app, svc.pool, clock, on_saved=parts.projection.notify)
        await parts.projection.start()
        parts.relay = OutboxRelay(
            RelayConfig(source=SOURCE, topic=LEDGER_TOPIC, bootstrap_servers=settings.kafka_bootstrap_servers,
                        enable_idempotence=settings.kafka_enable_idempotence,
                        replication_factor=settings.kafka_replication_factor),
            recorder=app.recorder, mapper=app.mapper, to_integration=to_integration,
            database_url=settings.service_database_url,
        )
        svc.run_in_background(functools.partial(parts.writer.lead, settings.service_database_url))
        svc.checks["writer"] = parts.writer.lead_check
        svc.run_in_background(parts.writer.run)
        svc.run_in_background(parts.projection.run)
        svc.run_in_background(parts.relay.run)
        svc.run_in_background(functools.partial(expire_holds_forever, parts))
        if not settings.history_seal_key:  # said where operators look, as for the access-token key
            log.warning("the ledger seals its history with the DEVELOPMENT seal key under %s; in production, set"
                        " KABINET_HISTORY_SEAL_KEY and give auditors its public key", settings.data_dir / "keys")
        parts.sealer = history_seals.Sealer(svc.pool, events_table(app.recorder), history_seals.seal_key_for(settings))
        svc.run_in_background(parts.sealer.run)

    @service.on_stop
    async def stop(svc: Service) -> None:
        if parts.sealer is not None:  # the writer has stopped: nothing commits after this pass
            await parts.sealer.last_pass()
        if parts.app is not None:
            parts.app.close()

    service.routers.append(build_router(parts, verifier_for(settings).dependency()))
    return service, parts


async def expire_holds_forever(parts: LedgerParts) -> None:
    deferred = False  # said once when the writer cannot take the sweep, not every second it cannot
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_INTERVAL_S)
        if not parts.writer.is_active:
            continue  # a standby: the active writer's process sweeps
        try:
            await sweep_due_holds(parts)
        except (LedgerBusy, LedgerUnavailable) as error:
            # The holds stay due and the next sweep takes them; the writer's own trouble is logged where it happens.
            if not deferred:
                log.warning("hold expiry waits for the writer: %s", error)
            deferred = True
            continue
        except Exception:
            log.exception("hold expiry sweep failed; will try again")
            continue
        if deferred:
            log.info("hold expiry goes on: the writer takes commands again")
        deferred = False


async def sweep_due_holds(parts: LedgerParts) -> None:
    for _ in range(EXPIRY_SWEEP_PAGES_MAX):
        if await expire_due_holds(parts) < EXPIRY_SWEEP_BATCH_MAX:
            return  # every due hold is taken (or a few were settled meanwhile: the next sweep looks again)
        # The holds are read from the read model: once it shows these expired, the next page holds others.
        await parts.projection.wait_for(parts.writer.last_position)


async def expire_due_holds(parts: LedgerParts) -> int:
    """Expires a page of the holds due; returns how many it expired."""
    due = await parts.pool.fetch(
        "SELECT hold_id FROM ledger_holds WHERE state = 'active' AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
        # The ledger's time, not the clock: a clock behind the last batch (stepped back,
        # or another node's ahead) would leave holds no longer capturable still holding money.
        parts.writer.ledger_time(), EXPIRY_SWEEP_BATCH_MAX,
    )
    results = await asyncio.gather(*(parts.writer.submit(commands.ExpireHold(
        row["hold_id"], requested_by=commands.REQUESTED_BY_LEDGER)) for row in due))
    return sum(1 for result in results if not result.replayed)


class LedgerSettings(ServiceSettings):
    service_name: str = "ledger"


def create_app():
    service, _ = build(LedgerSettings())
    return service.http_app()
