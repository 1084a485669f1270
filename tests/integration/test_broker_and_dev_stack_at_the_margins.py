"""Rules of the Kafka plumbing and of the embedded servers at their margins: topics get the
partitions asked for (and as many as the broker gives a topic made on first use), the first
record of a partition is no more "lost" than any other, a broker that is down or hung fails
fast; the embedded PostgreSQL keeps its data across restarts, trusts loopback only and says
why it did not start; the embedded broker is stopped however it stops answering, and a
start that fails leaves no server and no files behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from kabinet_chassis import kafka
from kabinet_chassis.devstack import broker as broker_module
from kabinet_chassis.devstack import postgres as postgres_module
from kabinet_chassis.devstack.broker import EmbeddedBroker, is_our_broker, stop_saved_broker
from kabinet_chassis.devstack.ephemeral import EphemeralStack
from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import LOOPBACK, free_port, port_is_free
from kabinet_chassis.devstack.postgres import EmbeddedPostgres
from kabinet_chassis.devstack.stack import DevStack
from kabinet_chassis.kafka import BrokerDidNotAnswer, ensure_topics, records_at
from kabinet_chassis.settings import StackSettings
from tests.support.processes import command_line

pytestmark = pytest.mark.integration


async def partition_count(bootstrap_servers: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
        return len(description["partitions"])
    finally:
        await admin.close()


async def publish_one(bootstrap_servers: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"the first event", partition=0)
    finally:
        await producer.stop()


def kill_processes_naming(marker: str) -> None:
    """Stop whatever a failed test left running: only processes whose command line names `marker`
    (a temporary dir, a port of this test's own)."""
    for process in psutil.process_iter():
        if marker in command_line(process):
            process.kill()


def no_database_settings(data: Path, broker_port: int) -> StackSettings:
    """The embedded broker alone: the database is another's (never reached here)."""
    return StackSettings(data_dir=data, broker_port=broker_port, database_url="postgresql://unused@127.0.0.1:1/postgres",
                         kafka_bootstrap_servers=None)


async def test_a_topic_gets_the_partitions_asked_for(stack, unique_name):
    topic = f"{unique_name}.events.v1"
    await ensure_topics(stack.bootstrap_servers, [topic], partitions=2)
    assert await partition_count(stack.bootstrap_servers, topic) == 2


async def test_replicas_of_a_service_making_its_topics_at_once_all_start(stack, unique_name):
    # The broker answers "already exists" to all but one: that is no refusal.
    topics = [f"{unique_name}.events.v1", f"{unique_name}.events.v1.dlq"]
    await asyncio.gather(*(ensure_topics(stack.bootstrap_servers, topics) for _ in range(4)))
    assert [await partition_count(stack.bootstrap_servers, topic) for topic in topics] == [kafka.DEFAULT_PARTITIONS] * 2


async def test_a_topic_created_by_default_has_as_many_partitions_as_one_the_broker_makes_on_first_use(stack, unique_name):
    # A consumer may ask for a topic before the relay creates it (after a broker restart): the
    # broker then makes it itself. Were the counts to differ, a key's partition would depend on
    # who came first, and one account's events could be read out of order.
    created, made_on_first_use = f"{unique_name}.created.v1", f"{unique_name}.first-use.v1"
    await ensure_topics(stack.bootstrap_servers, [created])
    await records_at(stack.bootstrap_servers, made_on_first_use, {0: 0}, timeout_s=0.0)
    assert await partition_count(stack.bootstrap_servers, created) == await partition_count(
        stack.bootstrap_servers, made_on_first_use) == kafka.DEFAULT_PARTITIONS


async def test_the_first_record_of_a_partition_not_handed_back_in_time_is_not_taken_for_lost(stack, unique_name):
    # Offset 0 is a service's first event: taking it for lost would republish its whole history.
    topic = f"{unique_name}.events.v1"
    await ensure_topics(stack.bootstrap_servers, [topic])
    await publish_one(stack.bootstrap_servers, topic)
    with pytest.raises(BrokerDidNotAnswer, match=r"partitions \[0\]"):
        await records_at(stack.bootstrap_servers, topic, {0: 0}, timeout_s=0.0)


async def test_a_record_handed_back_at_once_is_returned_without_waiting_out_the_deadline(stack, unique_name):
    topic = f"{unique_name}.events.v1"
    await ensure_topics(stack.bootstrap_servers, [topic])
    await publish_one(stack.bootstrap_servers, topic)
    began = asyncio.get_running_loop().time()
    found = await records_at(stack.bootstrap_servers, topic, {0: 0}, timeout_s=10.0)
    assert found[0].value == b"the first event"
    assert asyncio.get_running_loop().time() - began < 5.0, "records_at waited out its deadline with the record in hand"


async def test_creating_topics_and_reading_records_back_leave_no_connection_running(stack, unique_name):
    # Both run on every start of a service and every watchdog round: a client left open would
    # keep its connection and its background tasks for the life of the process.
    topic = f"{unique_name}.events.v1"
    before = asyncio.all_tasks()
    await ensure_topics(stack.bootstrap_servers, [topic])
    await publish_one(stack.bootstrap_servers, topic)
    await records_at(stack.bootstrap_servers, topic, {0: 0})
    await asyncio.sleep(0)
    left = {task for task in asyncio.all_tasks() - before if not task.done()} - {asyncio.current_task()}
    assert not left, f"still running: {left}"


async def test_a_broker_that_is_down_fails_topic_creation_at_once_with_a_connection_error():
    began = asyncio.get_running_loop().time()
    with pytest.raises(KafkaConnectionError):
        await ensure_topics(f"{LOOPBACK}:{free_port()}", ["nowhere.events.v1"])
    assert asyncio.get_running_loop().time() - began < 5.0


async def test_a_broker_that_accepts_but_never_answers_fails_topic_creation_within_the_request_timeout(monkeypatch):
    # A hung broker must not hang a service's start for good: it fails, and is retried.
    monkeypatch.setattr(kafka, "_REQUEST_TIMEOUT_MS", 1_000)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hung:
        hung.bind((LOOPBACK, 0))
        hung.listen()
        began = asyncio.get_running_loop().time()
        with pytest.raises(KafkaConnectionError):
            await ensure_topics(f"{LOOPBACK}:{hung.getsockname()[1]}", ["hung.events.v1"])
    assert asyncio.get_running_loop().time() - began < 8.0


async def test_the_embedded_database_keeps_its_data_across_restarts_trusts_loopback_only_and_commits_durably(tmp_path):
    postgres = EmbeddedPostgres(tmp_path / "pg", free_port())
    try:
        postgres.start()
        connection = await asyncpg.connect(postgres.url)
        try:
            # It trusts every connection it accepts (--auth=trust): it must accept them on loopback only.
            assert await connection.fetchval("SHOW listen_addresses") == LOOPBACK
            assert await connection.fetchval("SHOW synchronous_commit") == "on"
            assert await connection.fetchval("SHOW fsync") == "on"
            await connection.execute("CREATE TABLE balances (account text, amount_minor bigint)")
            await connection.execute("INSERT INTO balances VALUES ('alice', 12345)")
        finally:
            await connection.close()
        postgres.start()  # `kabinet up` after `kabinet stack up`: the running server is used as it is
        postgres.stop()
        assert port_is_free(postgres.port)
        postgres.start()
        connection = await asyncpg.connect(postgres.url)
        try:
            assert await connection.fetchval("SELECT amount_minor FROM balances WHERE account = 'alice'") == 12345
        finally:
            await connection.close()
    finally:
        postgres.stop(mode="immediate")


def test_a_database_that_does_not_start_says_why_from_its_own_log(tmp_path, monkeypatch):
    monkeypatch.setitem(postgres_module.SERVER_SETTINGS, "shared_buffers", "a-lot")
    postgres = EmbeddedPostgres(tmp_path / "pg", free_port())
    try:
        with pytest.raises(StackError) as refused:
            postgres.start()
        assert "shared_buffers" in str(refused.value) and str(tmp_path / "pg" / "server.log") in str(refused.value)
        assert not postgres.is_running()
    finally:
        postgres.stop(mode="immediate")


def test_a_data_dir_that_holds_something_else_is_refused_with_initdbs_reason_in_one_readable_error(tmp_path):
    # KABINET_DATA_DIR pointed at a directory already in use, or a pg/ left half-made.
    data_dir = tmp_path / "pg"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("not a database")
    postgres = EmbeddedPostgres(data_dir, free_port())
    with pytest.raises(StackError, match="exists but is not empty") as refused:
        postgres.start()
    assert "\n" not in str(refused.value) and str(data_dir) in str(refused.value)


def test_a_throwaway_stack_whose_broker_cannot_start_stops_its_database_and_leaves_no_files(monkeypatch):
    for name in ("KABINET_DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)  # its own servers, whatever this session runs on
    throwaway = EphemeralStack(prefix="kabinet-mutB-")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.bind((LOOPBACK, 0))
            squatter.listen()
            throwaway.broker = EmbeddedBroker(squatter.getsockname()[1], throwaway.root / "broker.log")
            with pytest.raises(StackError, match="KABINET_BROKER_PORT"), throwaway:
                pytest.fail("the stack started with its broker's port taken")
        assert port_is_free(throwaway.postgres.port), "the database of a stack that failed to start is left running"
        assert not throwaway.root.exists()
    finally:
        kill_processes_naming(str(throwaway.root))


def test_a_broker_that_does_not_listen_in_time_is_stopped_and_the_error_names_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "_START_TIMEOUT_S", 0)
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")
    try:
        with pytest.raises(StackError) as refused:
            broker.start()
        assert str(tmp_path / "broker.log") in str(refused.value)
        listener = f"tcp://{LOOPBACK}:{broker.port}"
        assert not [process for process in psutil.process_iter() if listener in command_line(process)], "orphan broker"
    finally:
        kill_processes_naming(f"tcp://{LOOPBACK}:{broker.port}")


@pytest.fixture
def impatient_broker(tmp_path, monkeypatch) -> Iterator[EmbeddedBroker]:
    """A running embedded broker that is given half a second to stop before it is killed."""
    monkeypatch.setattr(broker_module, "_STOP_TIMEOUT_S", 0.5)
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")
    broker.start()
    try:
        yield broker
    finally:
        kill_processes_naming(f"tcp://{LOOPBACK}:{broker.port}")


def test_our_broker_runs_in_its_own_session_and_one_that_stops_answering_signals_is_killed(impatient_broker):
    pid = impatient_broker.pid
    # A terminal's Ctrl-C of `kabinet up` reaches its group: the broker must not be in it,
    # or it would stop before the services publishing to it.
    assert os.getsid(pid) == pid != os.getsid(0)
    assert is_our_broker(pid, impatient_broker.port)
    assert not is_our_broker(pid, free_port()), "a broker on another port taken for the one stack.json names"
    os.kill(pid, signal.SIGSTOP)  # a SIGTERM now waits, unanswered
    impatient_broker.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_stack_down_kills_a_broker_that_does_not_answer_its_stop_and_it_is_then_seen_stopped(impatient_broker):
    pid = impatient_broker.pid
    os.kill(pid, signal.SIGSTOP)
    assert stop_saved_broker(pid, impatient_broker.port), "our frozen broker was not taken for ours"
    assert impatient_broker._process.wait(timeout=5) == -signal.SIGKILL
    assert not impatient_broker.is_running()


def test_stack_up_uses_the_running_broker_refuses_one_on_another_port_and_down_stops_it_promptly(tmp_path):
    data = tmp_path / "data"
    first_port = free_port()
    endpoints, started = DevStack(no_database_settings(data, first_port)).up()
    try:
        assert started is not None
        again, started_again = DevStack(no_database_settings(data, first_port)).up()
        assert started_again is None and again.bootstrap_servers == endpoints.bootstrap_servers

        elsewhere = no_database_settings(data, free_port())
        with pytest.raises(StackError, match=rf"port {first_port}.*kabinet stack down"):
            DevStack(elsewhere).up()  # a second broker would leave the first one known to no command
        assert DevStack(elsewhere).status()["broker"] == f"running embedded broker on 127.0.0.1:{first_port}"
        assert json.loads((data / "stack.json").read_text())["broker_pid"] == started.pid

        began = time.monotonic()
        DevStack(elsewhere).down()
        assert port_is_free(first_port)
        assert time.monotonic() - began < 5.0, "the broker did not stop on SIGTERM; it was killed after the wait"
    finally:
        kill_processes_naming(f"tcp://{LOOPBACK}:{first_port}")


def test_a_stack_up_whose_broker_cannot_start_stops_only_a_database_it_started_itself(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        settings = StackSettings(data_dir=tmp_path / "data", pg_port=free_port(), broker_port=squatter.getsockname()[1],
                                 database_url=None, kafka_bootstrap_servers=None)
        stack = DevStack(settings)
        try:
            with pytest.raises(StackError, match="KABINET_BROKER_PORT"):
                stack.up()
            assert not stack.postgres.is_running(), "a failed start left its database running"

            stack.postgres.start()  # as `kabinet stack up` earlier: it says its servers keep running
            with pytest.raises(StackError, match="KABINET_BROKER_PORT"):
                stack.up()
            assert stack.postgres.is_running(), "a failed start stopped a database it had not started"

            stack.down()
            assert not stack.postgres.is_running() and port_is_free(settings.pg_port), "stack down left the database running"
        finally:
            stack.postgres.stop(mode="immediate")
