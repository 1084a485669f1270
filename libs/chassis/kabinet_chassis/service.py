"""The service factory: one place that wires a service's process.

A service's `service.py` builds a `Service`, registers what it owns in `on_start`
(event-sourced application, read-model consumers, the outbox relay) and its routers,
and exposes `service.http_app()` to uvicorn. The lifespan starts the database pool,
the FastStream broker and the relays, and stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from fastapi import APIRouter, FastAPI
from faststream.kafka import KafkaBroker

from kabinet_chassis import consumers, idempotency
from kabinet_chassis.databases import create_pool, ensure_database, one_process_starting_at_a_time
from kabinet_chassis.errors import install_problem_handlers, problem_schemas
from kabinet_chassis.eventstore import WorkerThreads
from kabinet_chassis.health import Check, broker_check, database_check, health_router
from kabinet_chassis.history_seals import Sealer
from kabinet_chassis.kafka import ensure_topics
from kabinet_chassis.outbox import OutboxRelay
from kabinet_chassis.projection import LocalProjection
from kabinet_chassis.request_limits import RequestBodyLimit
from kabinet_chassis.runtime import tune_garbage_collector
from kabinet_chassis.settings import ServiceSettings
from kabinet_chassis.telemetry import install_json_logging, install_metrics, install_tracing
from kabinet_contracts.registry import dead_letter_topic

log = logging.getLogger(__name__)

STOP_WAIT_S = 15.0  # for the background loops to end, then for the database connections to come back

StartHook = Callable[["Service"], Awaitable[None]]
StopHook = Callable[["Service"], Awaitable[None]]


class Service:
    def __init__(self, settings: ServiceSettings, *, title: str, uses_database: bool = True,
                 shows_health_detail: bool = True) -> None:
        self.settings = settings
        self.title = title
        self.uses_database = uses_database
        # False for a service that faces the public (the gateway): its /health/ready shows each
        # check's status, never server versions, addresses or errors (health.py logs those).
        self.shows_health_detail = shows_health_detail
        self.threads = WorkerThreads(settings.worker_threads)
        # No KafkaTelemetryMiddleware: the chassis consumers open one CONSUMER span per
        # event in the producer's trace themselves (consumers.py), and the middleware's
        # per-message baggage extraction on batch subscribers cost as much as all of
        # our own handling (bench/relay.py).
        self.broker = KafkaBroker(
            settings.kafka_bootstrap_servers,
            # What this broker publishes is dead letters: an event is tracked as handled once its
            # dead letter is acknowledged, so it must survive a leader's failover, as the relay's do.
            acks="all",
            enable_idempotence=settings.kafka_enable_idempotence,
            logger=logging.getLogger(f"kabinet.{settings.service_name}.broker"),
        )
        self.dead_letters = consumers.DeadLetters(self.broker)
        self.pool: asyncpg.Pool | None = None
        self.claimant: idempotency.Claimant | None = None  # this process, as the owner of its Idempotency-Key claims
        self.routers: list[APIRouter] = []
        self.domain_errors: tuple[type[Exception], ...] = ()
        # /health/ready: `checks` gate readiness (what serving the API needs); `watched` are
        # reported beside them, "degraded" but ready (what only background work needs).
        self.checks: dict[str, Check] = {}
        self.watched: dict[str, Check] = {}
        self._on_start: list[StartHook] = []
        self._on_stop: list[StopHook] = []
        self._background: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task] = []
        self.topics_consumed: list[str] = []

    def on_start(self, hook: StartHook) -> StartHook:
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: StopHook) -> StopHook:
        self._on_stop.append(hook)
        return hook

    def subscribe(self, topic: str, consumer: consumers.ReadModelConsumer | consumers.ReactionConsumer) -> None:
        """An idempotent batch subscriber, and its watchdog for a broker that lost its data."""
        watchdog = consumers.subscribe(
            self.broker, topic, consumer, bootstrap_servers=self.settings.kafka_bootstrap_servers,
            session_timeout_ms=self.settings.kafka_session_timeout_ms,
        )
        self.topics_consumed.append(topic)
        # Watched, not gating: a consumer waiting out its database must not take the API down.
        self.watched[f"consumer:{consumer.name}"] = consumer.check
        self.run_in_background(watchdog.run)

    def run_in_background(self, runner: Callable[[], Awaitable[None]]) -> None:
        """Long-running loops (the relay, the ledger writer) that live as long as the service.
        A function or a functools.partial of one: its name is the loop's in /health/live.

        An outbox relay's loop (`relay.run`), a local projection's (`projection.run`) and a
        history sealer's (`sealer.run`) retry every error for ever, so they never die: their
        own checks are watched in /health/ready instead, down while they are stuck."""
        self._background.append(runner)
        owner = getattr(runner, "__self__", None)
        if isinstance(owner, OutboxRelay):
            self.watched[f"outbox_relay:{owner.config.source}"] = owner.check
        elif isinstance(owner, LocalProjection):
            self.watched[f"projection:{owner.name}"] = owner.check
        elif isinstance(owner, Sealer):
            self.watched["history_sealer"] = owner.check

    def dead_loops(self) -> list[str]:
        """The background loops that ended while the service runs (they are meant to run for ever)."""
        return [task.get_name() for task in self._tasks if task.done()]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Service]:
        """Start everything; usable without HTTP (tests, CLI)."""
        install_tracing(self.settings.service_name, self.settings.otel_exporter_otlp_endpoint)
        install_metrics(self.settings.service_name, self.settings.otel_exporter_otlp_endpoint)
        tune_garbage_collector(self.settings.gc_young_threshold)
        if self.uses_database:
            await ensure_database(self.settings.database_url, self.settings.service_name)
            self.pool = await create_pool(self.settings.service_database_url, max_size=self.settings.worker_threads)
        try:
            # The start hooks make the service's own schema too (an event store, read models).
            async with (one_process_starting_at_a_time(self.settings.service_database_url) if self.pool is not None
                        else contextlib.nullcontext()):
                if self.pool is not None:
                    await consumers.ensure_tracking_table(self.pool)
                    await idempotency.ensure_schema(self.pool)
                    self.claimant = idempotency.Claimant(self.settings.service_database_url)
                    await self.claimant.start()
                for hook in self._on_start:
                    await hook(self)
            if self.topics_consumed:
                # Create them with our partition count before a subscriber's metadata
                # request lets the broker auto-create them with its own; and their dead-letter
                # topics, which a broker without auto-creation would refuse a poison record
                # for, stalling its consumer.
                await ensure_topics(self.settings.kafka_bootstrap_servers,
                                    [*self.topics_consumed, *map(dead_letter_topic, self.topics_consumed)],
                                    replication_factor=self.settings.kafka_replication_factor)
                # Only a service that consumes starts the broker's client (its subscribers, and the
                # dead letters they publish): the rest must start while the broker is down, their
                # events waiting in the outbox, or a restart during a broker outage stops payments.
                await self.broker.start()
            runners = [*self._background, *([functools.partial(idempotency.purge_expired_forever, self.pool),
                                             self.claimant.hold_forever] if self.pool else [])]
            self._tasks = [asyncio.create_task(runner(), name=_loop_name(runner)) for runner in runners]
            for task in self._tasks:
                task.add_done_callback(_report_if_died)
            yield self
        finally:
            await self._stop_loops()
            if self.topics_consumed:
                await self.broker.stop()
            for hook in reversed(self._on_stop):
                await hook(self)
            if self.claimant is not None:
                await self.claimant.stop()
                self.claimant = None
            if self.pool is not None:
                await _close_pool(self.pool)
                self.pool = None

    async def _stop_loops(self) -> None:
        """Cancel the background loops and give them STOP_WAIT_S to end: one stuck in its
        clean-up (a producer flushing to a broker that does not answer) is named in the log
        and left behind, so that a service always stops."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, still_running = await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)
            if still_running:
                log.error("background loops %s did not end within %g s of being stopped; leaving them",
                          ", ".join(sorted(task.get_name() for task in still_running)), STOP_WAIT_S)
        self._tasks = []

    def http_app(self) -> FastAPI:
        self.watched["broker"] = broker_check(self.settings.kafka_bootstrap_servers)
        if self.uses_database:
            self.checks["database"] = database_check(self.settings.service_database_url)
        # The router reads these dicts themselves, not copies: checks registered in on_start
        # (a relay's) arrive after uvicorn built the app, when its lifespan starts us.

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            install_json_logging(self.settings.service_name)
            async with self.running():
                yield

        # An operation is known by its route's name (`open_account`, `my_balance`): stable
        # across changes of path, unlike FastAPI's default built from path and method.
        app = FastAPI(title=self.title, version=importlib.metadata.version("kabinet"), lifespan=lifespan,
                      generate_unique_id_function=lambda route: route.name)
        app.openapi = functools.partial(_openapi_document, app, app.openapi)
        install_problem_handlers(app, self.domain_errors)
        # Before FastAPI reads a body, which it does before any route's token check.
        app.add_middleware(RequestBodyLimit)
        app.include_router(health_router(self.checks, self.watched, self.dead_loops,
                                         shows_detail=self.shows_health_detail))
        for router in self.routers:
            app.include_router(router)
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="/health/.*")
        return app


def _openapi_document(app: FastAPI, build_document: Callable[[], dict]) -> dict:
    """FastAPI's document, completed with what it cannot see: the Problem schema the routes'
    problem responses refer to, and that an Idempotency-Key is required where it is taken
    (`idempotency_key` refuses a missing one itself, a 400, so FastAPI sees an optional header)."""
    if app.openapi_schema is None:
        document = build_document()  # kept by FastAPI as app.openapi_schema
        document.setdefault("components", {}).setdefault("schemas", {}).update(problem_schemas())
        for operation in (operation for path in document["paths"].values() for operation in path.values()):
            for parameter in operation.get("parameters", ()):
                if parameter["in"] == "header" and parameter["name"] == "Idempotency-Key":
                    parameter.update(required=True, schema={"type": "string", "minLength": 1,
                                                            "maxLength": idempotency.MAX_KEY_LENGTH},
                                     description="The caller's own key for this request: a retry with the same key"
                                                 " and body gets the first answer (header `Idempotent-Replayed`),"
                                                 " the same key with another body a 422 `idempotency_key_reused`.")
    return app.openapi_schema


async def _close_pool(pool: asyncpg.Pool) -> None:
    """asyncpg's close waits for every connection to come back, for ever: a connection a
    stuck loop still holds would keep the service from stopping. After STOP_WAIT_S, they
    are dropped."""
    try:
        async with asyncio.timeout(STOP_WAIT_S):
            await pool.close()
    except TimeoutError:
        log.error("database connections were not given back within %g s of stopping; dropping them", STOP_WAIT_S)
        pool.terminate()


def _loop_name(runner: Callable[[], Awaitable[None]]) -> str:
    function = runner.func if isinstance(runner, functools.partial) else runner
    return getattr(function, "__qualname__", repr(function))


def _report_if_died(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background loop %s died; /health/live now fails", task.get_name(), exc_info=task.exception())
