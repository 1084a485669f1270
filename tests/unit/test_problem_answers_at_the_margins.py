"""Rules of every service's error answers, body limit and logs at their margins (no servers
needed): a problem is titled and coded for programs and people alike; a 422 names every
field that is wrong and what is wrong with it; a domain refusal is never a 500; the
operators' log holds what the caller is not told; the body limit leaves a valid transfer
room to spare and lets a service start and stop; log lines are JSON carrying the trace they
were written in, once each; spans reach the collector the settings name."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from opentelemetry import metrics, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from kabinet_chassis import telemetry
from kabinet_chassis.errors import Problem, install_problem_handlers
from kabinet_chassis.request_limits import REQUEST_BODY_BYTES_MAX, RequestBodyLimit
from ledger.domain import commands
from services.ledger.tests.integration.ledger_support import transfer_body
from tests.unit.test_problem_answers import DATABASE_DOWN, Order, app_raising


def client_of(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://svc")


# ---- what a problem says ---------------------------------------------------------------------


async def test_a_problem_with_no_title_of_its_own_is_titled_in_words_from_its_code():
    assert Problem(409, "insufficient_funds", "short by 100").body()["title"] == "Insufficient funds"
    async with app_raising(RuntimeError()) as client:
        response = await client.delete("/read")
    assert response.json()["title"] == "Method not allowed", response.text


async def test_a_framework_refusal_with_no_code_of_its_own_keeps_its_status_and_gets_a_stable_code():
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/teapot")
    async def teapot():
        raise HTTPException(418, "short and stout")

    async with client_of(app) as client:
        response = await client.get("/teapot")
    assert response.status_code == 418 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "http_418" and response.json()["detail"] == "short and stout"


class Unlabelled(Exception):
    """A domain refusal whose class forgot its `code` and `status`."""


async def test_a_domain_refusal_that_names_no_status_or_code_is_a_409_refused_not_a_500():
    app = FastAPI()
    install_problem_handlers(app, (Unlabelled,))

    @app.post("/close")
    async def close():
        raise Unlabelled("account acc-1 still holds 100")

    async with client_of(app) as client:
        response = await client.post("/close")
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "refused" and response.json()["detail"] == "account acc-1 still holds 100"


# ---- a 422 names what is wrong ---------------------------------------------------------------


def orders_app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/orders")
    async def order(order: Order):
        return {}

    return app


async def test_a_422_names_every_wrong_field_in_its_detail_and_says_what_is_wrong_with_each():
    async with client_of(orders_app()) as client:
        response = await client.post("/orders", json={"metadata": {"limit": "many", "floor": "none"}})
    assert response.status_code == 422 and response.json()["code"] == "validation_error"
    problem = response.json()
    assert sorted(error["field"] for error in problem["errors"]) == ["metadata.floor", "metadata.limit"]
    assert "metadata.limit" in problem["detail"] and "metadata.floor" in problem["detail"], problem
    assert all(error["message"] and error["type"] == "int_parsing" for error in problem["errors"]), problem


async def test_a_request_with_no_body_where_one_is_needed_names_the_body_as_the_field():
    async with client_of(orders_app()) as client:
        response = await client.post("/orders")
    assert response.status_code == 422
    assert [(error["field"], error["type"]) for error in response.json()["errors"]] == [("body", "missing")]


# ---- what the operators' log holds ---------------------------------------------------------


async def test_a_500_is_logged_as_an_error_with_its_traceback_for_the_operators(caplog):
    with caplog.at_level(logging.WARNING, logger="kabinet_chassis.errors"):
        async with app_raising(RuntimeError("secret table name")) as client:
            response = await client.get("/read")
    assert response.status_code == 500 and "secret" not in response.text
    logged = [r for r in caplog.records if r.name == "kabinet_chassis.errors"]
    assert [r.levelno for r in logged] == [logging.ERROR], logged
    assert "GET /read" in logged[0].getMessage() and "secret table name" in str(logged[0].exc_info[1])


async def test_a_database_that_is_down_is_logged_naming_the_request_and_the_driver_error(caplog):
    with caplog.at_level(logging.WARNING, logger="kabinet_chassis.errors"):
        async with app_raising(DATABASE_DOWN["starting_up"]) as client:
            response = await client.get("/read")
    assert response.status_code == 503
    logged = [r.getMessage() for r in caplog.records if r.name == "kabinet_chassis.errors"]
    assert len(logged) == 1 and "GET /read" in logged[0] and "CannotConnectNowError" in logged[0], logged


# ---- a body's size, at the limit -------------------------------------------------------------


def largest_transfer() -> dict:
    """A valid transfer at its longest (ledger/domain/commands.py), its free text all characters
    outside the BMP: JSON's longest escape, 12 bytes each."""
    wide = "\U0001F4B8"
    legs = [(str(uuid.uuid4()), 100) for _ in range(commands.LEGS_MAX - 1)]
    return {
        **transfer_body("t" * commands.ID_CHARS_MAX, (str(uuid.uuid4()), -100 * len(legs)), *legs),
        "external_ref": wide * commands.ID_CHARS_MAX,
        "customer_ids": [f"{i:02d}" + wide * (commands.ID_CHARS_MAX - 2) for i in range(commands.CUSTOMER_IDS_MAX)],
        "metadata": {f"{i:02d}" + wide * (commands.METADATA_VALUE_CHARS_MAX - 2): wide * commands.METADATA_VALUE_CHARS_MAX
                     for i in range(commands.METADATA_KEYS_MAX)},
    }


def test_the_limit_leaves_the_largest_valid_transfer_four_times_its_size_for_a_clients_whitespace():
    # Lowered to just above the largest transfer, the limit would refuse a valid payment
    # from a client that pretty-prints its JSON a little more than the test of it does.
    largest_bytes = len(json.dumps(largest_transfer()).encode())
    assert 4 * largest_bytes <= REQUEST_BODY_BYTES_MAX, largest_bytes


async def test_a_service_behind_the_limit_still_starts_and_stops():
    lived: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        lived.append("started")
        yield
        lived.append("stopped")

    app = FastAPI(lifespan=lifespan)
    events = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict:
        return next(events)

    async def send(message: dict) -> None:
        sent.append(message["type"])

    await RequestBodyLimit(app)({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"] and lived == ["started", "stopped"]


# ---- logs and traces -----------------------------------------------------------------------


@pytest.fixture
def json_logging() -> Iterator[None]:
    """install_json_logging takes over the root logger: give it back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def logged_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]


def test_a_log_line_is_json_on_stderr_naming_the_service_and_the_trace_it_was_written_in(json_logging, capsys):
    logging.getLogger().setLevel(logging.WARNING)
    telemetry.install_json_logging("ledger")
    traced = SpanContext(trace_id=0x0af7651916cd43dd8448eb211c80319c, span_id=0x00f067aa0ba902b7, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with trace.use_span(NonRecordingSpan(traced)):
        logging.getLogger("ledger.api").info("posted %s", "t-1")
    logging.getLogger("ledger.api").info("idle")
    inside, outside = logged_lines(capsys)
    assert inside["message"] == "posted t-1" and inside["level"] == "INFO" and inside["logger"] == "ledger.api"
    assert inside["service"] == "ledger" and "ts" in inside
    # As W3C traceparent writes them, leading zeros and all: what the tracing backend is searched by.
    assert (inside["trace_id"], inside["span_id"]) == ("0af7651916cd43dd8448eb211c80319c", "00f067aa0ba902b7")
    assert (outside["trace_id"], outside["span_id"]) == (None, None), outside


def test_json_logging_installed_twice_writes_each_line_once(json_logging, capsys):
    telemetry.install_json_logging("ledger")
    telemetry.install_json_logging("ledger")
    logging.getLogger("ledger.api").warning("once")
    assert [line["message"] for line in logged_lines(capsys)] == ["once"]


def test_tracing_installed_again_keeps_one_provider_and_adds_the_exporter_to_it():
    first = telemetry.install_tracing("tests")
    exporter = InMemorySpanExporter()
    again = telemetry.install_tracing("tests", exporter=exporter)
    assert again is first
    with trace.get_tracer(__name__).start_as_current_span("posting"):
        pass
    # A SimpleSpanProcessor: exported as the span ends, with nothing to flush.
    assert [span.name for span in exporter.get_finished_spans()] == ["posting"]


@pytest.fixture
def collector() -> Iterator[tuple[str, list[str]]]:
    """An OTLP/HTTP collector on a free port: its URL (with a trailing slash, as operators write
    it) and the paths it was sent spans on."""
    paths: list[str] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def a_process_of_its_own(monkeypatch):
    """As a service is: providers not yet installed, and not the ones this test process has."""
    monkeypatch.setattr(telemetry, "_installed", None)
    monkeypatch.setattr(trace, "set_tracer_provider", lambda provider: None)
    monkeypatch.setattr(telemetry, "_meters_installed", None)
    monkeypatch.setattr(metrics, "set_meter_provider", lambda provider: None)


def test_spans_are_sent_to_the_collector_the_settings_name_under_v1_traces(collector, a_process_of_its_own):
    url, paths = collector
    provider = telemetry.install_tracing("ledger", otlp_endpoint=url)
    try:
        assert provider.resource.attributes["service.name"] == "ledger"
        # The instance the process's metrics carry: a trace leads to the replica it went through.
        assert provider.resource.attributes["service.instance.id"] == telemetry.INSTANCE_ID
        with provider.get_tracer(__name__).start_as_current_span("posting"):
            pass
        assert provider.force_flush(timeout_millis=10_000)
        assert paths == ["/v1/traces"]
    finally:
        provider.shutdown()


def test_metrics_are_sent_to_the_collector_the_settings_name_under_v1_metrics_with_the_instance(
        collector, a_process_of_its_own):
    url, paths = collector
    provider = telemetry.install_metrics("ledger", otlp_endpoint=url)
    try:
        assert provider._sdk_config.resource.attributes["service.name"] == "ledger"
        assert provider._sdk_config.resource.attributes["service.instance.id"] == telemetry.INSTANCE_ID
        provider.get_meter(__name__).create_counter("kabinet.test.answers").add(1)
        assert provider.force_flush(timeout_millis=10_000)
        assert paths == ["/v1/metrics"]
    finally:
        provider.shutdown()
