"""Rules of what the ledger publishes on ledger.events.v1, read back from the real broker:
every message a subscriber (notifications, rewards, cards) or an analyst receives is one
the published AsyncAPI document describes, names the customer it concerns, and says what
it needs to know without asking the ledger."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from jsonschema import Draft202012Validator
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kabinet_chassis.telemetry import install_tracing
from kabinet_contracts.asyncapi import asyncapi_document
from kabinet_contracts.envelope import IntegrationEvent, event_id_for
from kabinet_contracts.ledger import LEDGER_TOPIC, HoldPlaced, MoneyDTO
from kabinet_contracts.registry import REGISTRY
from ledger.domain import commands as c
from ledger.domain.batch import capture_transfer_id
from ledger.domain.hold import Hold
from ledger.domain.transfer import Transfer
from ledger.service import build
from tests.support.tokens import ledger_poster

pytestmark = pytest.mark.integration

WAIT_S = 30
HOLD_LIFETIME_S = 2
DOCUMENT = asyncapi_document(REGISTRY)


def schema_errors(value, schema: dict) -> list[str]:
    """What JSON Schema (draft 2020-12, formats checked) finds wrong with `value`; the schema's
    `#/components/…` references resolve in the published document."""
    validator = Draft202012Validator({"allOf": [schema], "components": DOCUMENT["components"]},
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, error.absolute_path)) or '$'}: {error.message}" for error in validator.iter_errors(value)]


def test_the_schema_check_checks_formats_and_references():
    # Without its optional format packages, jsonschema passes any string as a date-time.
    assert schema_errors("2026-11-25T09:00:00", {"type": "string", "format": "date-time"}), "a time without an offset"
    assert not schema_errors("2026-11-25T09:00:00Z", {"type": "string", "format": "date-time"})
    assert schema_errors("not-a-uuid", {"type": "string", "format": "uuid"})
    money = {"$ref": "#/components/schemas/MoneyDTO"}
    assert not schema_errors({"amount_minor": 5, "currency": "RUB"}, money)
    assert schema_errors({"amount_minor": 5.5, "currency": "RUB"}, money), "money is whole minor units"


def message_errors(record) -> list[str]:
    """What the published AsyncAPI document says is wrong with one record of ledger.events.v1."""
    channel = DOCUMENT["channels"][LEDGER_TOPIC.replace(".", "_")]
    headers = {name: value.decode() for name, value in record.headers}
    envelope = json.loads(record.value)
    messages = [DOCUMENT["components"]["messages"][m["$ref"].rsplit("/", 1)[1]] for m in channel["messages"].values()]
    by_type = {(m["name"], m["payload"]["allOf"][1]["properties"]["schema_version"]["const"]): m for m in messages}
    message = by_type.get((envelope.get("type"), envelope.get("schema_version")))
    if message is None:
        return [f"{envelope.get('type')!r} v{envelope.get('schema_version')} is not a message of {LEDGER_TOPIC}"
                " in the document"]
    return [f"headers {error}" for error in schema_errors(headers, message["headers"])] + schema_errors(
        envelope, message["payload"])


@pytest.fixture
async def ledger(stack, unique_name):
    settings = stack.service_settings(f"ledger_{unique_name}")
    service, parts = build(settings)
    async with service.running(), httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http_app()),
                                                     base_url="http://ledger/ledger/v1",
                                                     headers=ledger_poster(settings.data_dir)) as client:
        client.parts = parts
        yield client


async def call(client, method: str, path: str, expected: int, **body) -> dict:
    response = await client.request(method, path, json=body or None, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == expected, response.text
    return response.json()


async def open_account(client, owner: str, kind: str = "card", limit: int = 0) -> str:
    opened = await call(client, "POST", "/accounts", 201, owner_id=owner, kind=kind, currency="RUB",
                        credit_limit_minor=limit)
    return opened["account_id"]


async def published(bootstrap: str, aggregate_ids: set[str], until, timeout_s: float = WAIT_S) -> list:
    """The records of ledger.events.v1 about these aggregates, in partition order, once `until(envelopes)` holds."""
    consumer = AIOKafkaConsumer(LEDGER_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline and not until([json.loads(r.value) for r in records]):
            for partition_records in (await consumer.getmany(timeout_ms=500)).values():
                records += [r for r in partition_records if r.key.decode() in aggregate_ids]
    finally:
        await consumer.stop()
    return records


def hold_aggregate_id(hold_id: str) -> str:
    return str(Hold.id_for(hold_id))


def transfer_aggregate_id(transfer_id: str) -> str:
    return str(Transfer.id_for(transfer_id))


async def a_day_at_the_bank(ledger) -> tuple[dict[str, str], set[str]]:
    """Every kind of ledger event, about Alice's card: returns the ids used and every aggregate id."""
    settlement = await open_account(ledger, "bank", "settlement")
    card = await open_account(ledger, "alice")
    shop = await open_account(ledger, "shop")
    spare = await open_account(ledger, "alice", "savings")
    await call(ledger, "PUT", f"/accounts/{card}/credit-limit", 200, credit_limit_minor=5_000)
    top_up = f"top-up-{uuid.uuid4().hex}"
    await call(ledger, "POST", "/transfers", 201, transfer_id=top_up, code="top_up", customer_ids=["alice"],
               legs=[{"account_id": settlement, "amount_minor": -100_000, "currency": "RUB"},
                     {"account_id": card, "amount_minor": 100_000, "currency": "RUB"}])
    purchase, expiring = f"purchase-{uuid.uuid4().hex}", f"expiring-{uuid.uuid4().hex}"
    await call(ledger, "POST", "/holds", 201, hold_id=purchase, debit_account_id=card, credit_account_id=shop,
               amount_minor=50_000, currency="RUB", code="purchase", external_ref="rrn-123456789012",
               metadata={"merchant": "Ozon", "mcc": "5399"},
               expires_at=(datetime.now(UTC) + timedelta(days=7)).isoformat())
    await call(ledger, "POST", f"/holds/{purchase}/captures", 201, capture_id="clearing-1", amount_minor=30_000)
    await call(ledger, "POST", f"/holds/{purchase}/void", 200)
    await call(ledger, "POST", "/holds", 201, hold_id=expiring, debit_account_id=card, credit_account_id=shop,
               amount_minor=700, currency="RUB", code="purchase",
               expires_at=(datetime.now(UTC) + timedelta(seconds=HOLD_LIFETIME_S)).isoformat())
    # Refused for want of funds: kept in the ledger (a retry gets the same answer), never published.
    refused = f"refused-{uuid.uuid4().hex}"
    answer = await ledger.post("/transfers", json={"transfer_id": refused, "code": "p2p", "legs": [
        {"account_id": spare, "amount_minor": -1, "currency": "RUB"}, {"account_id": card, "amount_minor": 1, "currency": "RUB"}]})
    assert answer.status_code == 409, answer.text
    await call(ledger, "POST", f"/accounts/{card}/freeze", 200, reason="fraud_suspected")
    await call(ledger, "POST", f"/accounts/{card}/unfreeze", 200, reason="fraud_suspected")
    await call(ledger, "POST", f"/accounts/{spare}/close", 200, reason="customer_request")
    ids = {"settlement": settlement, "card": card, "shop": shop, "spare": spare, "top_up": top_up,
           "purchase": purchase, "expiring": expiring, "refused": refused}
    aggregates = {settlement, card, shop, spare, transfer_aggregate_id(top_up), transfer_aggregate_id(refused),
                  hold_aggregate_id(purchase), hold_aggregate_id(expiring),
                  transfer_aggregate_id(capture_transfer_id(purchase, "clearing-1"))}
    return ids, aggregates


EVERY_TYPE = {event_type.name for event_type in REGISTRY.all() if event_type.topic == LEDGER_TOPIC}


def saw_every_type(envelopes: list[dict]) -> bool:
    return {e["type"] for e in envelopes} >= EVERY_TYPE


async def test_every_published_ledger_message_is_one_the_asyncapi_document_describes(ledger, stack):
    ids, aggregates = await a_day_at_the_bank(ledger)
    records = await published(stack.bootstrap_servers, aggregates, saw_every_type)
    assert saw_every_type([json.loads(r.value) for r in records]), "not every kind of ledger event was published"
    problems = {f"{json.loads(r.value)['type']}@{json.loads(r.value)['position']}": message_errors(r) for r in records}
    assert {where: errors for where, errors in problems.items() if errors} == {}
    # Keyed by aggregate id, so one aggregate's events reach a subscriber in the order they happened.
    envelopes = [json.loads(r.value) for r in records]
    assert all(r.key.decode() == e["aggregate_id"] for r, e in zip(records, envelopes, strict=True))
    versions: dict[str, list[int]] = {}
    for envelope in envelopes:
        versions.setdefault(envelope["aggregate_id"], []).append(envelope["aggregate_version"])
    assert {a: v for a, v in versions.items() if v != sorted(set(v))} == {}
    # Private to the ledger: its class paths, request fingerprints, and refusals.
    assert not [r.value for r in records if b"ledger.domain" in r.value or b"fingerprint" in r.value]
    assert not [e for e in envelopes if ids["refused"] in json.dumps(e)], "a refused transfer was published"
    # Whom each leg's money belongs to: Alice is told of her top-up, the bank's settlement names no one.
    [top_up] = [e for e in of_type(records, "ledger.transfer_posted") if e["payload"]["transfer_id"] == ids["top_up"]]
    assert [(leg["account_id"], leg["customer_id"]) for leg in top_up["payload"]["legs"]] == [
        (ids["settlement"], None), (ids["card"], "alice")]
    # Why, and whether the card is still frozen: what cards and notifications act on.
    [unfrozen] = of_type(records, "ledger.account_unfrozen")
    assert (unfrozen["schema_version"], unfrozen["payload"]) == (
        2, {"account_id": ids["card"], "reason": "fraud_suspected", "freezes_left": []})



def of_type(records, event_type: str) -> list[dict]:
    return [e for e in (json.loads(r.value) for r in records) if e["type"] == event_type]


async def test_a_credit_limit_change_is_published_so_subscribers_know_what_the_customer_may_spend(ledger, stack):
    # Lending raises Alice's limit; cards shows what she may spend (balance + limit - holds)
    # from events alone. The limit published at opening alone would be stale from now on.
    card = await open_account(ledger, "alice", limit=1_000)
    await call(ledger, "PUT", f"/accounts/{card}/credit-limit", 200, credit_limit_minor=5_000)
    records = await published(stack.bootstrap_servers, {card},
                              lambda envelopes: any(e["type"] != "ledger.account_opened" for e in envelopes), timeout_s=10)
    [limit_set] = of_type(records, "ledger.account_credit_limit_set")
    assert limit_set["payload"] == {"account_id": card, "credit_limit_minor": 5_000, "currency": "RUB"}
    assert limit_set["schema_version"] == 2
    assert limit_set["aggregate_id"] == card and limit_set["aggregate_version"] == 2
    assert [message_errors(r) for r in records] == [[], []]


async def test_a_published_ledger_event_continues_the_trace_of_the_request_that_caused_it(ledger, stack):
    # One trace from the payment request, through ledger.events.v1, into notifications.
    install_tracing("tests", exporter=InMemorySpanExporter())
    with trace.get_tracer("tests").start_as_current_span("POST /payments") as request_span:
        card = await open_account(ledger, "alice")
    trace_id = format(request_span.get_span_context().trace_id, "032x")
    [record] = await published(stack.bootstrap_servers, {card}, lambda envelopes: len(envelopes) >= 1)
    traceparent = dict(record.headers).get("traceparent", b"").decode()
    assert traceparent.split("-")[1:2] == [trace_id], f"traceparent {traceparent!r} is not of the request's trace"


def about_alice(ids: dict[str, str], envelope: dict) -> bool:
    """Whether an event concerns Alice: her accounts, or holds and payments from her card."""
    payload = envelope["payload"]
    if envelope["type"].startswith("ledger.account_"):
        return payload["account_id"] in (ids["card"], ids["spare"])
    if envelope["type"].startswith("ledger.hold_"):
        return payload["hold_id"] in (ids["purchase"], ids["expiring"])
    return any(leg["account_id"] == ids["card"] and leg["amount_minor"] < 0 for leg in payload["legs"])


async def test_every_event_about_a_customers_account_or_card_payment_names_the_customer(ledger, stack):
    # Notifications tells Alice "a purchase of 500 RUB was authorised on your card" from
    # ledger.hold_placed alone: it must not have to rebuild who owns which account first.
    ids, aggregates = await a_day_at_the_bank(ledger)
    records = await published(stack.bootstrap_servers, aggregates, saw_every_type)
    hers = [e for e in (json.loads(r.value) for r in records) if about_alice(ids, e)]
    assert {e["type"] for e in hers} == EVERY_TYPE
    assert {(e["type"], e["position"]): e["customer_id"] for e in hers if e["customer_id"] != "alice"} == {}


async def test_every_amount_a_hold_event_publishes_names_its_currency(ledger, stack):
    # Money on the wire is minor units and an ISO 4217 currency: "300.00 RUB captured",
    # not "30000 of something" that a subscriber must join to the hold's placing to read.
    _, aggregates = await a_day_at_the_bank(ledger)
    records = await published(stack.bootstrap_servers, aggregates, saw_every_type)
    amounts = {e["type"]: e["payload"] for e in (json.loads(r.value) for r in records) if e["type"].startswith("ledger.hold_")}
    assert amounts["ledger.hold_placed"]["amount"]["currency"] == "RUB"
    assert {event_type: payload.get("currency") for event_type, payload in amounts.items()
            if event_type != "ledger.hold_placed"} == dict.fromkeys(
        ("ledger.hold_captured", "ledger.hold_voided", "ledger.hold_expired"), "RUB")


async def test_a_card_purchase_is_told_with_its_merchant_when_authorised_and_again_when_cleared(ledger, stack):
    # Notifications says "Ozon: 500 RUB authorised", then "Ozon: 300 RUB paid", from each event alone.
    ids, aggregates = await a_day_at_the_bank(ledger)
    records = await published(stack.bootstrap_servers, aggregates, saw_every_type)
    envelopes = [json.loads(r.value) for r in records]
    placed = next(e for e in envelopes if e["type"] == "ledger.hold_placed" and e["payload"]["hold_id"] == ids["purchase"])
    cleared = next(e for e in envelopes if e["type"] == "ledger.transfer_posted"
                   and e["payload"]["hold_id"] == ids["purchase"])
    references = {"external_ref": "rrn-123456789012", "metadata": {"merchant": "Ozon", "mcc": "5399"}}
    assert placed["schema_version"] == 2
    assert {key: placed["payload"][key] for key in references} == references
    assert {key: cleared["payload"][key] for key in references} == references


async def test_a_reversal_is_published_naming_the_transfer_it_reverses_and_why(ledger, stack):
    # Notifications tells Bob "the 300 RUB from Alice were returned: posted in error", and
    # an analyst pairs the two transfers, from the events alone.
    settlement, alice, bob = (await open_account(ledger, "bank", "settlement"), await open_account(ledger, "alice"),
                              await open_account(ledger, "bob"))
    tag = uuid.uuid4().hex
    await call(ledger, "POST", "/transfers", 201, transfer_id=f"fund-{tag}", code="top_up",
               legs=[{"account_id": settlement, "amount_minor": -1_000, "currency": "RUB"},
                     {"account_id": alice, "amount_minor": 1_000, "currency": "RUB"}])
    await call(ledger, "POST", "/transfers", 201, transfer_id=f"p2p-{tag}", code="p2p",
               legs=[{"account_id": alice, "amount_minor": -300, "currency": "RUB"},
                     {"account_id": bob, "amount_minor": 300, "currency": "RUB"}])
    await call(ledger, "POST", f"/transfers/p2p-{tag}/reversal", 201, reason="posted_in_error")
    ids = {transfer_aggregate_id(f"p2p-{tag}"), transfer_aggregate_id(f"p2p-{tag}:reversal")}
    records = await published(stack.bootstrap_servers, ids, lambda envelopes: len(envelopes) >= 2)
    by_id = {e["payload"]["transfer_id"]: e for e in (json.loads(r.value) for r in records)}
    reversal = by_id[f"p2p-{tag}:reversal"]
    assert (reversal["type"], reversal["schema_version"]) == ("ledger.transfer_posted", 3)
    assert (reversal["payload"]["reverses"], reversal["payload"]["reversal_reason"], reversal["payload"]["code"]) == (
        f"p2p-{tag}", "posted_in_error", "reversal")
    assert [(leg["customer_id"], leg["amount_minor"]) for leg in reversal["payload"]["legs"]] == [("alice", 300),
                                                                                                  ("bob", -300)]
    assert by_id[f"p2p-{tag}"]["payload"]["reverses"] is None


def test_an_event_whose_time_has_no_timezone_is_refused_at_its_source_not_published_ambiguous():
    # The document promises an RFC 3339 date-time, which has an offset: "09:00" alone is a
    # different instant in Moscow and in UTC, and an analyst's replay would have to guess.
    naive = datetime(2026, 11, 25, 9, 0)
    with pytest.raises(ValueError, match="timezone"):
        IntegrationEvent(event_id=event_id_for("ledger", 1), type="ledger.account_frozen", schema_version=1,
                         source="ledger", position=1, aggregate_id="a1", aggregate_version=2, occurred_at=naive,
                         payload={"account_id": "a1"})
    with pytest.raises(ValueError, match="timezone"):
        HoldPlaced(hold_id="h1", debit_account_id="a1", credit_account_id="a2", code="purchase",
                   amount=MoneyDTO(amount_minor=50_000, currency="RUB"), expires_at=naive, external_ref=None,
                   metadata={})


async def test_two_requests_whose_commands_share_a_writer_batch_and_a_hold_each_keep_their_own_trace(ledger, stack):
    # A card authorisation and its clearing, a moment apart, saved in one batch: the hold's
    # placed event belongs to the authorisation's trace, its capture to the clearing's.
    install_tracing("tests", exporter=InMemorySpanExporter())
    settlement = await open_account(ledger, "bank", kind="settlement")
    card = await open_account(ledger, "alice")
    await call(ledger, "POST", "/transfers", 201, transfer_id=f"fund-{card}", code="top_up", legs=[
        {"account_id": settlement, "amount_minor": -1_000, "currency": "RUB"},
        {"account_id": card, "amount_minor": 1_000, "currency": "RUB"}])
    writer = ledger.parts.writer
    hold_id = f"auth-{uuid.uuid4().hex[:8]}"
    place = c.PlaceHold(hold_id, uuid.UUID(card), uuid.UUID(settlement), 300, "RUB",
                        datetime.now(UTC) + timedelta(hours=1), "card_purchase")
    capture = c.CaptureHold(hold_id, "clearing-1", 300)

    async def in_a_trace(name: str, command) -> str:
        with trace.get_tracer("tests").start_as_current_span(name) as span:
            await writer.submit(command)
        return format(span.get_span_context().trace_id, "032x")

    batches_before = writer.batches_total
    authorisation, clearing = await asyncio.gather(in_a_trace("authorise", place), in_a_trace("clear", capture))
    assert writer.batches_total == batches_before + 1, "both commands were to share one batch"
    capture_transfer = str(Transfer.id_for(capture_transfer_id(hold_id, "clearing-1")))
    records = await published(stack.bootstrap_servers, {str(Hold.id_for(hold_id)), capture_transfer},
                              lambda envelopes: len(envelopes) >= 3)
    trace_of = {json.loads(r.value)["type"]: dict(r.headers)["traceparent"].decode().split("-")[1] for r in records}
    assert trace_of == {"ledger.hold_placed": authorisation, "ledger.hold_captured": clearing,
                        "ledger.transfer_posted": clearing}
