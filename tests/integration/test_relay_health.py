"""Rules of a relay's health. The outbox relay retries every error for ever, so its loop
never dies and liveness never names it; a relay stuck on a mapping bug, a poison event or
a hung broker would stop every downstream context while the service looked healthy.
/health/ready says so instead, naming the error and how long the relay has made no
progress: "degraded", but still ready, for the service keeps taking payments (their
events wait in the outbox), and a restart would not mend a poison event anyway."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import httpx
import pytest

from kabinet_chassis.devstack.ephemeral import EphemeralStack
from kabinet_chassis.outbox import PRODUCER_STOP_WAIT_S
from ledger import api as ledger_api
from ledger.integration import SOURCE as LEDGER_SOURCE
from ledger.service import build
from tests.integration.test_outbox_to_consumer import eventually
from tests.support.notes import build_notes_service
from tests.support.tokens import ledger_poster

pytestmark = pytest.mark.integration

WAIT_S = 20


async def until(predicate, what: str):
    return await eventually(predicate, WAIT_S, what)


def client_of(app, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc", headers=headers)


async def degraded(client: httpx.AsyncClient) -> httpx.Response | None:
    response = await client.get("/health/ready")
    assert response.status_code == 200, response.text  # still serving: events wait in the outbox
    return response if response.json()["status"] == "degraded" else None


async def test_a_relay_failing_on_every_round_shows_the_service_degraded_naming_the_error_yet_ready_and_live(
        stack, unique_name):
    service, parts = build(stack.service_settings(f"ledger_{unique_name}"))
    app = service.http_app()  # before the start, as uvicorn does: the relay's check is registered in on_start
    async with service.running(), client_of(app, ledger_poster(stack.root)) as client:
        # Ready once its writer leads (a standby ledger is not ready), a moment after the start.
        ready = await until(lambda: _ready_response(client), "the ledger's writer to lead")
        assert ready.json()["watched"][f"outbox_relay:{LEDGER_SOURCE}"]["status"] == "up"

        def broken_mapping(event, position):  # an event the mapping cannot handle (a bug, a poison event)
            raise ValueError(f"cannot map the event at {position}")

        parts.relay.to_integration = broken_mapping
        opened = await client.post("/ledger/v1/accounts", json={"owner_id": "c1", "kind": "card", "currency": "RUB"},
                                   headers={"Idempotency-Key": str(uuid.uuid4())})
        assert opened.status_code == 201, opened.text
        response = await until(lambda: degraded(client), "the relay to show as stuck")
        live = await client.get("/health/live")
        assert parts.relay.position == 0, "nothing was published"
        still_taking_payments = await client.post(
            "/ledger/v1/accounts", json={"owner_id": "c2", "kind": "card", "currency": "RUB"},
            headers={"Idempotency-Key": str(uuid.uuid4())})
        assert still_taking_payments.status_code == 201, still_taking_payments.text
    relay_check = response.json()["watched"][f"outbox_relay:{LEDGER_SOURCE}"]
    assert relay_check["status"] == "down"
    assert "RelayStuck: no progress for" in relay_check["detail"]
    assert "failed rounds in a row; last error: ValueError: cannot map the event at 1" in relay_check["detail"]
    assert parts.relay.failed_rounds > parts.relay.config.failed_rounds_max
    assert live.status_code == 200, "a restart would fail on the same event again: liveness is not the signal"


async def test_a_relay_that_makes_no_progress_without_an_error_shows_as_stuck_until_it_moves_again(stack, unique_name):
    """A hang raises nothing: the relay is stuck once events wait for longer than stall_max_s."""
    hung = asyncio.Event()
    released = asyncio.Event()

    async def hang_until_released(position: int) -> None:
        hung.set()
        await released.wait()

    service, parts = build_notes_service(stack.service_settings(unique_name), f"{unique_name}.events.v1",
                                         on_page_published=hang_until_released)
    app = service.http_app()
    async with service.running(), client_of(app) as client:
        relay = parts["relay"]
        relay.config = dataclasses.replace(relay.config, stall_max_s=0.5)
        await until(lambda: _ready(client), "ready while idle: finding nothing to publish is progress")
        parts["app"].write("a note")
        await asyncio.wait_for(hung.wait(), WAIT_S)
        response = await until(lambda: degraded(client), "the relay to show as stuck")
        detail = response.json()["watched"][f"outbox_relay:{unique_name}"]["detail"]
        assert "no progress for" in detail and "last error: none (hung?)" in detail, detail
        released.set()
        await until(lambda: _ready(client), "ready again once the relay moves")
        assert relay.position >= 1


async def test_a_standby_relay_is_healthy_while_the_leading_one_is_stuck(stack, unique_name):
    settings = stack.service_settings(unique_name)
    topic = f"{unique_name}.events.v1"
    never = asyncio.Event()

    async def hang(position: int) -> None:
        await never.wait()

    leader, leader_parts = build_notes_service(settings, topic, on_page_published=hang)
    standby, standby_parts = build_notes_service(settings, topic, on_page_published=hang)
    leader_app, standby_app = leader.http_app(), standby.http_app()
    async with leader.running(), client_of(leader_app) as leader_client:
        await asyncio.wait_for(leader_parts["relay"].relaying.wait(), WAIT_S)
        async with standby.running(), client_of(standby_app) as standby_client:
            await until(lambda: _true(standby_parts["relay"].is_standby), "the second relay to stand by")
            for relay in (leader_parts["relay"], standby_parts["relay"]):
                relay.config = dataclasses.replace(relay.config, stall_max_s=0.5)
            leader_parts["app"].write("a note")
            await until(lambda: degraded(leader_client), "the leader's relay to show as stuck")
            standby_ready = await standby_client.get("/health/ready")
    assert standby_ready.status_code == 200, standby_ready.text
    assert standby_ready.json()["watched"][f"outbox_relay:{unique_name}"]["detail"].startswith("standby")


async def _ready_response(client: httpx.AsyncClient) -> httpx.Response | None:
    response = await client.get("/health/ready")
    return response if response.status_code == 200 else None


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/health/ready")).json()["status"] == "ready"


async def _true(value: bool) -> bool:
    return value


async def test_a_ledger_whose_broker_is_down_still_takes_payments_and_shows_degraded(unique_name, monkeypatch):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)  # a broker of our own, to stop
    with EphemeralStack(prefix="kabinet-no-broker-") as own:
        service, parts = build(own.service_settings(f"ledger_{unique_name}"))
        app = service.http_app()
        async with service.running(), client_of(app, ledger_poster(own.root)) as client:
            own.broker.stop()
            opened = await client.post("/ledger/v1/accounts", json={"owner_id": "c1", "kind": "card", "currency": "RUB"},
                                       headers={"Idempotency-Key": str(uuid.uuid4())})
            ready = await client.get("/health/ready")
    assert opened.status_code == 201, opened.text
    assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    assert ready.json()["watched"]["broker"]["status"] == "down" and ready.json()["checks"]["database"]["status"] == "up"


async def test_a_ledger_whose_broker_died_while_it_published_stops_within_seconds(unique_name, monkeypatch):
    # `kabinet up` (and an orchestrator) kill a service that takes too long to stop; the ledger's
    # last sealing pass comes after its relay's producer has stopped, so that must not wait out
    # a request timeout to a broker that is gone.
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)  # a broker of our own, to kill
    with EphemeralStack(prefix="kabinet-broker-dies-") as own:
        service, parts = build(own.service_settings(f"ledger_{unique_name}"))
        app = service.http_app()
        async with service.running(), client_of(app, ledger_poster(own.root)) as client:
            for owner in ("c1", "c2"):
                await client.post("/ledger/v1/accounts", json={"owner_id": owner, "kind": "card", "currency": "RUB"},
                                  headers={"Idempotency-Key": str(uuid.uuid4())})
            await until(lambda: _true(parts.relay.position >= parts.writer.last_position), "the relay to publish")
            own.broker.stop(kill=True)
            for owner in ("c3", "c4", "c5"):  # events the relay now tries to publish
                await client.post("/ledger/v1/accounts", json={"owner_id": owner, "kind": "card", "currency": "RUB"},
                                  headers={"Idempotency-Key": str(uuid.uuid4())})
            await asyncio.sleep(1.0)
            stopping_at = asyncio.get_running_loop().time()
        stopped_in_s = asyncio.get_running_loop().time() - stopping_at
    assert stopped_in_s < PRODUCER_STOP_WAIT_S + 4, f"the ledger took {stopped_in_s:.1f} s to stop"


async def test_a_ledger_whose_history_read_model_is_stuck_shows_degraded_naming_it_yet_ready_and_live(
        stack, unique_name, monkeypatch):
    monkeypatch.setattr(ledger_api, "COMMAND_READ_MODEL_WAIT_S", 1.0)  # not 30 s: the 503 is the rule here
    service, parts = build(stack.service_settings(f"ledger_{unique_name}"))
    app = service.http_app()
    async with service.running(), client_of(app, ledger_poster(stack.root)) as client:
        ready = await client.get("/health/ready")
        assert ready.json()["watched"]["projection:ledger_read_model"]["status"] == "up", ready.text

        async def broken_apply_page(connection, page):  # a bug meeting one event: history must not skip it
            raise ValueError("cannot apply this event")

        parts.projection.apply_page = broken_apply_page
        parts.projection.failed_rounds_max = 0
        opened = await client.post("/ledger/v1/accounts", json={"owner_id": "c1", "kind": "card", "currency": "RUB"},
                                   headers={"Idempotency-Key": str(uuid.uuid4())})
        assert opened.status_code == 503 and opened.json()["code"] == "read_model_behind", opened.text
        response = await until(lambda: degraded(client), "the read model to show as stuck")
        live = await client.get("/health/live")
    check = response.json()["watched"]["projection:ledger_read_model"]
    assert check["status"] == "down" and "ValueError: cannot apply this event" in check["detail"], check
    assert live.status_code == 200, "a restart would stop at the same event: liveness is not the signal"
