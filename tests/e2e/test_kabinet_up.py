"""`kabinet up` (what `make run` calls) runs the whole bank and stops it cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.ed25519_keys import new_private_pem
from kabinet_chassis.topology import GATEWAY_PORT, service_url
from tests.support.processes import command_line

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 120
SEALED_WITHIN_S = 20  # verify runs once a second meanwhile


def up_env(data_dir: Path) -> dict[str, str]:
    """`kabinet up` on its own data dir and ports, with the embedded servers."""
    env = {**os.environ, "KABINET_DATA_DIR": str(data_dir),
           "KABINET_PG_PORT": str(free_port()), "KABINET_BROKER_PORT": str(free_port())}
    env.pop("KABINET_DATABASE_URL", None)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return env


def start_up(env: dict[str, str], *, own_terminal: bool = False) -> tuple[subprocess.Popen, str | None, list[str]]:
    """Start `kabinet up`; read its output until it announces the gateway (or ends): the
    process, the gateway URL it announced, and the lines read. With `own_terminal`, in a
    session of its own, as a terminal runs it: a signal to its group is what a terminal's
    Ctrl-C (or its closing) sends."""
    kabinet = Path(sys.executable).with_name("kabinet")
    process = subprocess.Popen([str(kabinet), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=own_terminal)
    output: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Gateway:" in line:
            return process, line.split("Gateway:")[1].split()[0], output
    return process, None, output


def dev_token(env: dict[str, str], subject: str, *roles: str) -> str:
    kabinet = Path(sys.executable).with_name("kabinet")
    role_options = [option for role in roles for option in ("--role", role)]
    printed = subprocess.run([str(kabinet), "dev-token", subject, *role_options], env=env, capture_output=True,
                             text=True, timeout=30, check=True)
    return printed.stdout.strip()


def a_customer_sees_her_money_through_the_gateway(gateway_url: str, env: dict[str, str]) -> None:
    """Across the real processes: a service posts with its own token, the customer reads with hers."""
    ledger = httpx.Client(base_url=f"{service_url('ledger')}/ledger/v1", timeout=10,
                          headers={"Authorization": f"Bearer {dev_token(env, 'payments', 'ledger:post')}"})
    with ledger:
        def open_account(owner: str, kind: str) -> str:
            opened = ledger.post("/accounts", json={"owner_id": owner, "kind": kind, "currency": "RUB"},
                                 headers={"Idempotency-Key": str(uuid.uuid4())})
            assert opened.status_code == 201, opened.text
            return opened.json()["account_id"]

        settlement, card = open_account("bank", "settlement"), open_account("alice", "card")
        posted = ledger.post("/transfers", json={"transfer_id": f"salary-{card}", "code": "top_up", "legs": [
            {"account_id": settlement, "amount_minor": -12_345, "currency": "RUB"},
            {"account_id": card, "amount_minor": 12_345, "currency": "RUB"}]})
        assert posted.status_code == 201, posted.text
    alice = {"Authorization": f"Bearer {dev_token(env, 'alice')}"}
    mine = httpx.get(f"{gateway_url}/v1/me/accounts", headers=alice, timeout=10)
    assert mine.status_code == 200 and [a["account_id"] for a in mine.json()["accounts"]] == [card], mine.text
    balance = httpx.get(f"{gateway_url}/v1/me/accounts/{card}/balance", headers=alice, timeout=10)
    assert balance.json()["posted"] == {"amount_minor": 12_345, "currency": "RUB"}, balance.text
    history = httpx.get(f"{gateway_url}/v1/me/accounts/{card}/history", headers=alice, timeout=10)
    assert [line["transfer_id"] for line in history.json()["lines"]] == [f"salary-{card}"], history.text
    bob = {"Authorization": f"Bearer {dev_token(env, 'bob')}"}
    assert httpx.get(f"{gateway_url}/v1/me/accounts/{card}", headers=bob, timeout=10).status_code == 404


def an_auditor_verifies_the_books_and_their_seals(env: dict[str, str]) -> None:
    """`kabinet ledger verify` beside the running bank: every check passes, and the history
    the ledger process sealed (with the development seal key under the data dir) is checked,
    to its newest event, within a few seals' time, by an auditor given only the public key
    (`kabinet ledger seal-public-key`; the auditor's own seal key is another)."""
    kabinet = Path(sys.executable).with_name("kabinet")
    given = subprocess.run([str(kabinet), "ledger", "seal-public-key"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert given.returncode == 0 and "BEGIN PUBLIC KEY" in given.stdout, given.stdout + given.stderr
    auditors = {**env, "KABINET_HISTORY_SEAL_PUBLIC_KEYS": given.stdout,
                "KABINET_HISTORY_SEAL_KEY": new_private_pem().decode()}
    for _ in range(SEALED_WITHIN_S):
        result = subprocess.run([str(kabinet), "ledger", "verify", "--json"], env=auditors, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        seals = next(check for check in json.loads(result.stdout)["checks"] if check["name"] == "history matches its seals")
        if "; 0 newer events not sealed yet" in seals["detail"]:
            assert "; the last, seal " in seals["detail"], seals
            return
        time.sleep(1)
    raise AssertionError(f"the history was not sealed to its head within {SEALED_WITHIN_S} s: {seals}")


def test_kabinet_up_serves_ready_gateway_and_ctrl_c_leaves_no_process(tmp_path: Path):
    env = up_env(tmp_path / "data")
    process, gateway_url, output = start_up(env)
    descendants: list[psutil.Process] = []
    try:
        assert gateway_url == f"http://127.0.0.1:{GATEWAY_PORT}", "".join(output)
        # Known before anything else can fail, so that a failing test stops them all too.
        descendants = psutil.Process(process.pid).children(recursive=True)
        postgres_pid = int((tmp_path / "data" / "pg" / "postmaster.pid").read_text().split()[0])
        descendants.append(psutil.Process(postgres_pid))

        ready = httpx.get(f"{gateway_url}/health/ready", timeout=5)
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        assert ready.json()["checks"]["ledger"]["status"] == "up"
        watched = ready.json()["watched"]
        # The public gateway says up or down only; the ledger, internal, names what it reached.
        assert watched["database"] == {"status": "up"} and watched["broker"] == {"status": "up"}, ready.text
        ledger_ready = httpx.get(f"{service_url('ledger')}/health/ready", timeout=5).json()
        assert "PostgreSQL" in ledger_ready["checks"]["database"]["detail"], ledger_ready
        assert httpx.get(f"{gateway_url}/docs", timeout=5).status_code == 200
        assert len(descendants) >= 4, "the broker, the gateway and the ledger run as their own processes, beside PostgreSQL"
        a_customer_sees_her_money_through_the_gateway(gateway_url, env)
        an_auditor_verifies_the_books_and_their_seals(env)

        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    except BaseException:
        # The test failed midway: stop what it started, so no later test finds the ports taken.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        process.kill()
        for leftover in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        raise
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{GATEWAY_PORT}/health/live", timeout=2)


def test_a_taken_port_gives_one_line_saying_what_to_do(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken_port = squatter.getsockname()[1]
        env = {
            **os.environ,
            "KABINET_DATA_DIR": str(tmp_path / "data"),
            "KABINET_PG_PORT": str(taken_port),
            "KABINET_BROKER_PORT": str(free_port()),
        }
        env.pop("KABINET_DATABASE_URL", None)
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        kabinet = Path(sys.executable).with_name("kabinet")
        result = subprocess.run([str(kabinet), "stack", "up"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    message = (result.stdout + result.stderr).strip()
    assert "\n" not in message, message
    assert f"port {taken_port}" in message and "KABINET_PG_PORT" in message, message
    assert "Traceback" not in message
    assert not (tmp_path / "data" / "pg").exists() or not any((tmp_path / "data" / "pg").glob("postmaster.pid"))


@pytest.mark.parametrize("command", [["up"], ["stack", "up"]], ids=["up", "stack up"])
def test_a_start_whose_broker_cannot_start_leaves_no_database_running(tmp_path: Path, command: list[str]):
    # PostgreSQL starts first: a broker that cannot start must not leave it behind, holding
    # its port and data dir, for a start that said it failed.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        env = {**up_env(tmp_path / "data"), "KABINET_BROKER_PORT": str(squatter.getsockname()[1])}
        kabinet = Path(sys.executable).with_name("kabinet")
        result = subprocess.run([str(kabinet), *command], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert result.returncode != 0
        assert "KABINET_BROKER_PORT" in result.stdout + result.stderr, result.stdout + result.stderr
        status = subprocess.run([str(kabinet), "stack", "status"], env=env, capture_output=True, text=True, timeout=60)
        assert "database  stopped" in status.stdout, status.stdout
    finally:
        subprocess.run([str(kabinet), "stack", "down"], env=env, capture_output=True, text=True, timeout=120)


def _up_until_ready_then_ctrl_c(env: dict[str, str]) -> tuple[int | None, str]:
    """Run `kabinet up`, ask /health/ready once the gateway is announced, then Ctrl-C it."""
    process, gateway_url, output = start_up(env)
    ready = None
    try:
        if gateway_url:
            ready = httpx.get(f"{gateway_url}/health/ready", timeout=5).status_code
        process.send_signal(signal.SIGINT)
        output.append(process.communicate(timeout=60)[0])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return ready, "".join(output)


def test_kabinet_up_again_on_the_same_data_dir_comes_up_and_ctrl_c_forgets_the_broker(tmp_path: Path):
    """Once `kabinet up` has stopped its broker, stack.json must not name it: the pid goes to
    another process, which a later `kabinet up` or `kabinet stack down` would trust."""
    data = tmp_path / "data"
    env = up_env(data)
    for run in ("first", "second"):
        ready, output = _up_until_ready_then_ctrl_c(env)
        assert ready == 200, f"{run} run:\n{output}"
        state = data / "stack.json"
        assert not state.exists() or "broker_pid" not in state.read_text(), f"after the {run} run: {state.read_text()}"


def test_kabinet_up_stops_everything_and_fails_when_a_service_dies(tmp_path: Path):
    process, gateway_url, output = start_up(up_env(tmp_path / "data"))
    descendants: list[psutil.Process] = []
    try:
        assert gateway_url, "".join(output)
        descendants = psutil.Process(process.pid).children(recursive=True)
        [ledger] = [child for child in descendants if "ledger.service:create_app" in command_line(child)]
        ledger.kill()  # as an out-of-memory kill would
        rest = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, rest
    assert "ledger exited; stopped everything" in rest, rest
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"


def test_ledger_verify_with_no_database_to_read_says_so_in_one_line_and_no_verdict(tmp_path: Path):
    env = {**os.environ, "KABINET_DATA_DIR": str(tmp_path / "data"),
           "KABINET_DATABASE_URL": f"postgresql://kabinet@127.0.0.1:{free_port()}/postgres"}  # nothing listens
    kabinet = Path(sys.executable).with_name("kabinet")
    result = subprocess.run([str(kabinet), "ledger", "verify"], env=env, capture_output=True, text=True, timeout=60)
    message = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, message  # 1 would say a check failed: nothing was checked
    assert "cannot reach the ledger's database" in message and "Traceback" not in message, message
    assert "\n" not in message, message


def _everything_started_by(process: subprocess.Popen, data_dir: Path) -> list[psutil.Process]:
    """`kabinet up`'s children (the broker, the services) and the embedded PostgreSQL it started."""
    started = psutil.Process(process.pid).children(recursive=True)
    return [*started, psutil.Process(int((data_dir / "pg" / "postmaster.pid").read_text().split()[0]))]


def _stop_leftovers(process: subprocess.Popen, started: list[psutil.Process]) -> None:
    """A test that failed midway stops what it started, so no later test finds the ports taken."""
    if process.poll() is None:
        process.kill()
    for leftover in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()


def _up_until_it_ends(data: Path, end, *, own_terminal: bool = False) -> tuple[subprocess.Popen, str, list]:
    """Run `kabinet up` until the gateway is announced, `end(process, started)` (a signal, a
    death), and the end of `kabinet up`: the process, what it printed after, and what it had
    started that is still alive (stopped by now, so that no later test finds the ports taken)."""
    process, gateway_url, output = start_up(up_env(data), own_terminal=own_terminal)
    started: list[psutil.Process] = []
    try:
        assert gateway_url, "".join(output)
        started = _everything_started_by(process, data)
        end(process, started)
        rest = process.communicate(timeout=90)[0]
    except BaseException:
        _stop_leftovers(process, started)
        raise
    gone, alive = psutil.wait_procs(started, timeout=15)
    _stop_leftovers(process, alive)
    return process, rest, alive


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "terminal-closed"])
def test_a_terminals_ctrl_c_or_closing_stops_every_service_cleanly_and_the_database_too(tmp_path: Path, signum):
    # The terminal signals its whole foreground group. A service hit twice (by the terminal and
    # by `kabinet up`) quit at once without its clean stop, and a closed terminal (SIGHUP) left
    # the embedded PostgreSQL running, holding its port.
    data = tmp_path / "data"
    process, rest, alive = _up_until_it_ends(data, lambda up, started: os.killpg(up.pid, signum), own_terminal=True)
    assert alive == [], f"left behind: {alive}"
    assert process.returncode == 0 and "stopped" in rest and "killed" not in rest, rest
    ledger_log = (data / "logs" / "ledger.log").read_text()
    assert "Application shutdown complete" in ledger_log, ledger_log[-2_000:]


def test_kabinet_up_stops_everything_and_fails_when_its_broker_dies(tmp_path: Path):
    def kill_the_broker(up, started):
        [broker] = [child for child in started if "tansu" in child.name()]
        broker.kill()

    process, rest, alive = _up_until_it_ends(tmp_path / "data", kill_the_broker)
    assert process.returncode != 0 and "the broker exited; stopped everything" in rest, rest
    assert alive == [], f"left behind: {alive}"


def test_kabinet_up_on_a_stack_started_by_stack_up_leaves_that_stack_running(tmp_path: Path):
    # `kabinet stack up` says its servers keep running: a `kabinet up` beside them stops only
    # what it started itself.
    data = tmp_path / "data"
    env = up_env(data)
    kabinet = Path(sys.executable).with_name("kabinet")
    stack_up = subprocess.run([str(kabinet), "stack", "up"], env=env, capture_output=True, text=True, timeout=120)
    assert stack_up.returncode == 0, stack_up.stdout + stack_up.stderr
    try:
        ready, output = _up_until_ready_then_ctrl_c(env)
        assert ready == 200, output
        status = subprocess.run([str(kabinet), "stack", "status"], env=env, capture_output=True, text=True, timeout=60)
        assert "database  running" in status.stdout and "broker    running" in status.stdout, status.stdout
    finally:
        subprocess.run([str(kabinet), "stack", "down"], env=env, capture_output=True, text=True, timeout=120)
