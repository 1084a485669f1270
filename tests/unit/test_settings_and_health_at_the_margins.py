"""Rules of a service's settings and event-store wiring that need no server: a setting that
cannot work is refused at start, by name (a service name becomes a database's and topics'
name; a pool of no threads serves nothing; a topic of no replicas cannot be made); what
libpq accepts is accepted; a service listens on loopback unless told otherwise; a database
password is passed on as written, once decoded from its URL; a service holding PII does not
start without its cipher key; and the domain never sees the trace context stored beside
its events."""

from __future__ import annotations

import pytest
from eventsourcing.persistence import DatetimeAsISO, JSONTranscoder, UUIDAsHex
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pydantic import ValidationError

from kabinet_chassis.eventstore import TracingMapper, event_store_env, quoted
from kabinet_chassis.settings import ServiceSettings
from tests.support.notes import Note

REQUIRED = {"database_url": "postgresql://bank@127.0.0.1:5432/postgres", "kafka_bootstrap_servers": "k:9092"}


@pytest.mark.parametrize("service_name", ["Ledger", "ledger-eu", 'ledger"; DROP DATABASE kabinet_ledger; --', "1ledger"])
def test_a_service_name_that_is_not_a_plain_lower_case_identifier_is_refused_by_name(service_name):
    # It becomes the name of the service's database and of its topics, unquoted in places.
    with pytest.raises(ValidationError, match="service_name"):
        ServiceSettings(service_name=service_name, **REQUIRED)


@pytest.mark.parametrize(("setting", "value"), [
    ("worker_threads", 0), ("worker_threads", 65),
    ("kafka_replication_factor", 0), ("kafka_replication_factor", 8),
    ("http_port", 0), ("gc_young_threshold", 699),
])
def test_a_size_that_cannot_work_is_refused_at_start_by_name(setting, value):
    with pytest.raises(ValidationError, match=setting):
        ServiceSettings(service_name="ledger", **REQUIRED, **{setting: value})


def test_a_database_url_in_libpqs_short_form_is_accepted():
    settings = ServiceSettings(service_name="ledger", database_url="postgres://bank@db.internal:5432/postgres",
                               kafka_bootstrap_servers="k:9092")
    assert settings.service_database_url == "postgres://bank@db.internal:5432/kabinet_ledger"


def test_seal_public_keys_that_are_no_ed25519_keys_are_refused_at_start_by_name():
    # An auditor's check would otherwise fail only when it came to the first seal.
    with pytest.raises(ValidationError, match="history_seal_public_keys"):
        ServiceSettings(service_name="ledger", **REQUIRED, history_seal_public_keys="not a PEM public key")


def test_a_service_listens_on_loopback_only_unless_told_otherwise():
    # Internal services are reached through the gateway: one exposed by a default is not.
    assert ServiceSettings(service_name="ledger", **REQUIRED).http_host == "127.0.0.1"


def test_a_database_password_and_user_written_url_encoded_reach_the_event_store_decoded():
    # A generated password holds '@', '/' or '%', which a URL must encode.
    settings = ServiceSettings(service_name="ledger", database_url="postgresql://bank%2Fops:p%40ss%2Fw%25rd@db:6432/x",
                               kafka_bootstrap_servers="k:9092")
    env = event_store_env(settings)
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == ("bank/ops", "p@ss/w%rd")
    assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"], env["POSTGRES_DBNAME"]) == ("db", "6432", "kabinet_ledger")


def test_a_service_that_holds_pii_is_refused_without_a_cipher_key_naming_the_setting():
    with pytest.raises(ValueError, match="KABINET_CIPHER_KEY"):
        event_store_env(ServiceSettings(service_name="identity", **REQUIRED, cipher_key=None), encrypted=True)


def test_an_identifier_with_a_double_quote_is_quoted_whole_for_plain_sql():
    assert quoted('events"; DROP TABLE ledger_events; --') == '"events""; DROP TABLE ledger_events; --"'


def test_the_domain_never_sees_the_trace_context_stored_beside_an_event():
    mapper = TracingMapper(transcoder=JSONTranscoder())
    for transcoding in (UUIDAsHex(), DatetimeAsISO()):
        mapper.transcoder.register(transcoding)
    [written] = Note(text="hello").collect_events()
    span = NonRecordingSpan(SpanContext(trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7,
                                        is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    token = context.attach(trace.set_span_in_context(span))
    try:
        stored = mapper.to_stored_event(written)
    finally:
        context.detach(token)
    decoded, carrier = mapper.to_domain_event_with_trace(stored)
    assert carrier["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert vars(mapper.to_domain_event(stored)) == vars(decoded) == vars(written)
