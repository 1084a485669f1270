"""Rules of the dev stack that need no server: which ports count as free and what a taken one
says, what a stack.json left by an earlier command is trusted for (a pid outlives its process
in the file; the file may not even be ours), what a producer waits for before a record
counts as written, which topics a broker refused to create, and how a throwaway stack's files go."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kabinet_chassis.devstack.broker import EmbeddedBroker, _broker_command, is_our_broker
from kabinet_chassis.devstack.ephemeral import remove_without_waiting
from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import LOOPBACK, free_port, port_is_free, require_free_port, wait_until_listening
from kabinet_chassis.devstack.stack import DevStack
from kabinet_chassis.kafka import new_producer, refused_topics
from kabinet_chassis.settings import StackSettings


def a_pid_no_process_has() -> int:
    """The pid of a process that has ended and been reaped, as a broker's after a reboot."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def no_database_settings(data: Path, broker_port: int | None = None) -> StackSettings:
    """A stack whose database is another's, so that only the broker is the stack's concern."""
    return StackSettings(data_dir=data, broker_port=broker_port or free_port(), database_url="postgresql://unused@127.0.0.1:1/postgres",
                         kafka_bootstrap_servers=None)


def test_a_port_a_stopped_server_left_in_time_wait_counts_as_free(tmp_path: Path):
    # The servers bind with SO_REUSEADDR: a port whose last connection the server closed
    # (the broker or PostgreSQL just stopped) is theirs again at once, and `stack up` right
    # after `stack down` must not call it taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((LOOPBACK, 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection((LOOPBACK, port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server closes first: its side of the port waits in TIME_WAIT
            client.recv(1)
    assert port_is_free(port), f"port {port} in TIME_WAIT after its server stopped was called taken"


def test_a_taken_port_is_refused_in_one_line_naming_the_port_and_the_setting_to_change():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(StackError) as refused:
            require_free_port(port, "the Kafka-protocol broker", "KABINET_BROKER_PORT")
    message = str(refused.value)
    assert f"port {port}" in message and "the Kafka-protocol broker" in message and "KABINET_BROKER_PORT" in message
    assert "\n" not in message


def test_waiting_for_a_server_that_never_listens_gives_up_within_its_bound():
    began = time.monotonic()
    assert wait_until_listening(free_port(), timeout_s=0.3) is False
    assert time.monotonic() - began < 2.0


def test_a_stack_json_naming_a_process_that_is_gone_reads_as_stopped_and_down_forgets_it(tmp_path: Path):
    settings = no_database_settings(tmp_path / "data")
    settings.data_dir.mkdir()
    state = settings.data_dir / "stack.json"
    state.write_text(json.dumps({"broker_pid": a_pid_no_process_has(), "broker_port": settings.broker_port}))
    assert DevStack(settings).status()["broker"].startswith("stopped")
    DevStack(settings).down()
    assert not state.exists()


@pytest.mark.parametrize("contents", ["{not json", "[4242, 9092]", '"a string"', '{"broker_pid": "4242", "broker_port": null}'],
                         ids=["not-json", "a-list", "a-string", "wrong-types"])
def test_a_stack_json_that_is_not_what_the_stack_wrote_is_taken_for_no_broker(tmp_path: Path, contents: str):
    # Truncated by a full disk, edited by hand: `kabinet stack status` and `stack down` must
    # still answer, not fail with a traceback, and signal nothing.
    settings = no_database_settings(tmp_path / "data")
    settings.data_dir.mkdir()
    state = settings.data_dir / "stack.json"
    state.write_text(contents)
    assert DevStack(settings).status()["broker"] == f"stopped embedded broker on 127.0.0.1:{settings.broker_port}"
    DevStack(settings).down()
    assert not state.exists()


def test_stopping_a_broker_forgets_it_only_while_stack_json_still_names_that_broker(tmp_path: Path):
    # `kabinet up` stops the broker it started; if another command has since saved a broker of
    # its own, that one must stay known, or no `stack down` could ever stop it.
    settings = no_database_settings(tmp_path / "data")
    settings.data_dir.mkdir()
    state = settings.data_dir / "stack.json"
    saved = {"broker_pid": a_pid_no_process_has(), "broker_port": settings.broker_port}
    state.write_text(json.dumps(saved))
    ours = EmbeddedBroker(settings.broker_port, settings.data_dir / "broker.log", pid=a_pid_no_process_has())
    DevStack(settings).stop_broker(ours)
    assert json.loads(state.read_text()) == saved


def test_a_process_with_the_brokers_arguments_that_is_not_the_broker_binary_is_never_taken_for_it(tmp_path: Path):
    port = free_port()
    (tmp_path / "broker").write_text("import time\ntime.sleep(300)\n")
    # argv[0] "impostor", then exactly the arguments the broker is started with.
    impostor = subprocess.Popen(["impostor", *_broker_command("", port)[1:]], executable=sys.executable, cwd=tmp_path)
    try:
        settings = no_database_settings(tmp_path / "data", port)
        settings.data_dir.mkdir()
        (settings.data_dir / "stack.json").write_text(json.dumps({"broker_pid": impostor.pid, "broker_port": port}))
        deadline = time.monotonic() + 10
        while Path(f"/proc/{impostor.pid}/cmdline").read_bytes().split(b"\0")[0] != b"impostor":
            assert time.monotonic() < deadline, "the impostor did not start"
            time.sleep(0.01)
        assert not is_our_broker(impostor.pid, port)
        DevStack(settings).down()
        with pytest.raises(subprocess.TimeoutExpired):
            impostor.wait(timeout=0.5)  # still alive: stack down signalled only what is provably our broker
    finally:
        impostor.kill()
        impostor.wait()


async def test_a_producer_counts_a_record_written_only_once_every_in_sync_replica_has_it():
    # acks=all: with three replicas and two in sync required, a leader lost right after its
    # acknowledgement does not lose the record. (Not observable on the one-node embedded broker,
    # so the setting aiokafka was given is read back.)
    for idempotent in (True, False):
        producer = new_producer(f"{LOOPBACK}:{free_port()}", enable_idempotence=idempotent)
        try:
            assert producer._sender._acks == -1
        finally:
            await producer.stop()


def test_a_topic_the_broker_refused_is_named_with_why_and_one_made_meanwhile_is_not_refused():
    # The broker answers each topic apart, and aiokafka raises none of its refusals: a service
    # must not start as if its topics were there. (The embedded broker refuses nothing, so its
    # answers are written here as a cluster of one broker would give them, in both versions.)
    answer_v0 = [("ledger.events.v1", 38), ("ledger.events.v1.dlq", 0)]
    answer_v1 = [("ledger.events.v1", 38, "Replication factor: 3 larger than available brokers: 1."),
                 ("ledger.events.v1.dlq", 36, "Topic 'ledger.events.v1.dlq' already exists.")]
    assert refused_topics(answer_v0) == ["ledger.events.v1: InvalidReplicationFactorError"]
    assert refused_topics(answer_v1) == ["ledger.events.v1: InvalidReplicationFactorError (Replication factor: 3"
                                         " larger than available brokers: 1.)"]
    assert refused_topics([("ledger.events.v1", 29, None)]) == ["ledger.events.v1: TopicAuthorizationFailedError"]


def test_a_stopped_throwaway_stacks_files_are_out_of_the_way_at_once_and_gone_soon_after(tmp_path: Path):
    root = tmp_path / "kabinet-test-stack"
    (root / "pg" / "base").mkdir(parents=True)
    for index in range(100):
        (root / "pg" / "base" / str(index)).write_bytes(b"\0" * 8192)
    remove_without_waiting(root)
    assert not root.exists(), "a new stack may take its place at once"
    deadline = time.monotonic() + 30
    while any(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.iterdir()) == [], "the files were never removed"
    remove_without_waiting(root)  # a stack stopped twice: nothing left to remove
