"""What an operator or an auditor relies on from the `kabinet` command line and the settings
behind it: which database a command reads; exit codes that say whether the books were
checked at all (verify: 0 every check passed, 1 a check failed, 2 no verdict); usage and
settings refused before anything is read, in one line, never echoing a secret; `kabinet up`
stopping only what it started; and development keys that every process of a data dir shares.

Most of these need no server: the few that read a ledger's database use the test stack."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import jwt
import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from kabinet_chassis import cli as kabinet_cli
from kabinet_chassis import history_seals
from kabinet_chassis.auth import ACCESS_TOKEN_LIFETIME_MAX_S, verifier_for
from kabinet_chassis.databases import DATABASE_COMMAND_TIMEOUT_S, DATABASE_DOWN_ERRORS, create_pool, ensure_database
from kabinet_chassis.dev_keys import dev_key_file, dev_key_path
from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.devstack.stack import StackEndpoints
from kabinet_chassis.ed25519_keys import load_private_key, new_private_pem, public_pem
from kabinet_chassis.outbox import PRODUCER_STOP_WAIT_S
from kabinet_chassis.settings import ServiceSettings, StackSettings, database_name_for
from ledger import cli as ledger_cli
from ledger.service import build
from services.ledger.tests.integration.ledger_support import funded_card

pytestmark = pytest.mark.integration

# Whatever the environment running the tests names, each test here says which servers it means.
_SERVER_SETTINGS = ("KABINET_DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "KABINET_KAFKA_BOOTSTRAP_SERVERS",
                    "KABINET_HISTORY_SEAL_KEY", "KABINET_HISTORY_SEAL_PUBLIC_KEYS", "KABINET_DATA_DIR",
                    "KABINET_PG_PORT", "KABINET_BROKER_PORT", "KABINET_USE_TESTCONTAINERS")


@pytest.fixture
def operators_shell(monkeypatch, tmp_path) -> pytest.MonkeyPatch:
    """An operator's environment with none of the servers' settings, on a data dir of its own."""
    for name in _SERVER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KABINET_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def nothing_listens() -> str:
    """A database server URL where nothing answers."""
    return f"postgresql://bank:s3cret@127.0.0.1:{free_port()}/postgres"


def kabinet_ledger(*args: str):
    """`kabinet ledger …`, as the `kabinet.cli` entry point registers it, with the settings
    of the environment (ledger_settings() itself, not a test's)."""
    kabinet = typer.Typer()
    kabinet.add_typer(ledger_cli.app, name="ledger")
    return CliRunner().invoke(kabinet, ["ledger", *args])


async def kabinet_ledger_on(settings: ServiceSettings, monkeypatch, *args: str):
    """`kabinet ledger …` with these settings, in a thread: verify runs its own event loop."""
    import anyio

    monkeypatch.setattr("ledger.cli.ledger_settings", lambda: settings)
    return await anyio.to_thread.run_sync(lambda: kabinet_ledger(*args))


def one_line(text: str) -> str:
    return text.strip()


# ---- which database `kabinet ledger …` reads ------------------------------------------------------


def test_a_ledger_command_reads_the_ledger_database_on_the_server_kabinet_database_url_names(operators_shell):
    # An auditor's own server, role and TLS demands: the ledger's database on it, never the
    # server's default database, and the TLS settings kept. No broker is needed to read the books.
    operators_shell.setenv("KABINET_DATABASE_URL", "postgres://auditor:pw@db.internal:6432/postgres?sslmode=verify-full")
    settings = ledger_cli.ledger_settings()
    assert settings.service_name == "ledger"
    assert settings.service_database_url == "postgres://auditor:pw@db.internal:6432/kabinet_ledger?sslmode=verify-full"


def test_a_ledger_command_without_kabinet_database_url_reads_the_embedded_server_of_its_data_dir(operators_shell):
    port = free_port()
    operators_shell.setenv("KABINET_PG_PORT", str(port))
    parts = urlsplit(ledger_cli.ledger_settings().service_database_url)
    assert (parts.hostname, parts.port, parts.path) == ("127.0.0.1", port, "/kabinet_ledger")


@pytest.mark.parametrize("variable", ["KAFKA_BOOTSTRAP_SERVERS", "KABINET_KAFKA_BOOTSTRAP_SERVERS"])
def test_the_stack_and_every_service_read_the_broker_from_either_name(operators_shell, variable):
    operators_shell.setenv(variable, "broker.internal:9092")
    assert StackSettings().kafka_bootstrap_servers == "broker.internal:9092"
    assert ServiceSettings(service_name="ledger", database_url="postgresql://u@h/db").kafka_bootstrap_servers \
        == "broker.internal:9092"


def test_verify_reads_the_database_the_ledger_that_kabinet_up_runs_writes(operators_shell):
    # `kabinet up` gives each service the server; the service picks its own database on it.
    # The auditor's `kabinet ledger verify` on the same server must read that one.
    server = "postgresql://bank:pw@127.0.0.1:55432/postgres"
    operators_shell.setenv("KABINET_DATABASE_URL", server)
    for name, value in kabinet_cli._service_env("ledger", 8101, server, "127.0.0.1:59092").items():
        operators_shell.setenv(name, value)
    as_kabinet_up_runs_it = ServiceSettings()
    assert as_kabinet_up_runs_it.service_name == "ledger"
    assert as_kabinet_up_runs_it.service_database_url == ledger_cli.ledger_settings().service_database_url


# ---- exit codes: no verdict is exit 2, on stderr alone ------------------------------------------


@pytest.mark.parametrize("refused", ["database", "role"])
@pytest.mark.parametrize("command", ["verify", "events", "rebuild-read-model"])
async def test_a_login_the_server_refuses_gives_no_verdict_exit_2_with_its_reason_in_one_line_on_stderr(
        stack, unique_name, monkeypatch, command, refused):
    # Exit 1 would say a check failed (verify) or a rebuild changed nothing (rebuild-read-model):
    # nothing was read. Stdout stays empty: an auditor's tool parses it as the answer. The
    # server's reason, at once: not "cannot reach" after the connect timeout, which sends the
    # operator to the network instead of the URL. (The test server trusts loopback, so a wrong
    # password is let in: a role or a database it does not have are refused.)
    server = urlsplit(stack.database_url)
    role = server.username if refused == "database" else f"nobody_{unique_name}"
    wrong = urlunsplit(server._replace(netloc=f"{role}:Wr0ngPassw0rd@{server.hostname}:{server.port}"))
    settings = stack.service_settings(f"ledger_{unique_name}", database_url=wrong)
    result = await kabinet_ledger_on(settings, monkeypatch, command)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == "", result.stdout
    message = one_line(result.stderr)
    assert message.startswith("error:") and "\n" not in message, message
    refused_name = database_name_for(settings.service_name) if refused == "database" else role
    assert f'{refused} "{refused_name}" does not exist' in message, message
    assert "Wr0ngPassw0rd" not in result.output and "Traceback" not in result.output


async def test_a_ledger_database_missing_a_column_verify_reads_gives_no_verdict_exit_2(stack, unique_name, monkeypatch):
    # A ledger's database of another version, or changed by hand: verify cannot read it, so it
    # has no verdict on the books (not exit 1), and says which column.
    settings = stack.service_settings(f"ledger_{unique_name}")
    service, parts = build(settings)
    async with service.running():
        await funded_card(parts.writer, 1_000)
        await parts.projection.wait_for(parts.writer.last_position)
        assert (await kabinet_ledger_on(settings, monkeypatch, "verify")).exit_code == 0
        await parts.pool.execute("ALTER TABLE ledger_balances RENAME COLUMN posted_minor TO posted_minor_away")
        try:
            result = await kabinet_ledger_on(settings, monkeypatch, "verify", "--json")
        finally:
            await parts.pool.execute("ALTER TABLE ledger_balances RENAME COLUMN posted_minor_away TO posted_minor")
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == "", result.stdout
    assert "cannot read the ledger's database" in result.stderr and "posted_minor" in result.stderr, result.stderr


# ---- usage and settings refused before anything is read ------------------------------------------


@pytest.mark.parametrize(("option", "value"), [("--after", "-1"), ("--limit", "0"), ("--limit", "10001")])
def test_an_events_page_out_of_bounds_is_refused_before_the_database_is_read(operators_shell, option, value):
    operators_shell.setenv("KABINET_DATABASE_URL", nothing_listens())
    result = kabinet_ledger("events", option, value)
    assert result.exit_code == 2 and option in result.output, result.output
    assert "database" not in result.output, result.output


def test_seal_public_key_prints_exactly_the_public_key_of_the_seal_key_and_no_private_key(operators_shell):
    # Auditors paste it into KABINET_HISTORY_SEAL_PUBLIC_KEYS as it is; it needs no database.
    seal_key = new_private_pem().decode()
    operators_shell.setenv("KABINET_DATABASE_URL", nothing_listens())
    operators_shell.setenv("KABINET_HISTORY_SEAL_KEY", seal_key)
    result = kabinet_ledger("seal-public-key")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == public_pem(load_private_key(seal_key, "the seal key"))
    assert "PRIVATE" not in result.output


@pytest.mark.parametrize("variable", ["KABINET_HISTORY_SEAL_KEY", "KABINET_HISTORY_SEAL_PUBLIC_KEYS"])
@pytest.mark.parametrize("command", ["verify", "seal-public-key"])
def test_a_spoilt_seal_key_setting_is_refused_by_name_exit_2_without_echoing_it(operators_shell, variable, command):
    spoilt = new_private_pem().decode().replace("A", "B", 3)
    if variable == "KABINET_HISTORY_SEAL_PUBLIC_KEYS":
        spoilt = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAnotakey=\n-----END PUBLIC KEY-----\n"
    operators_shell.setenv("KABINET_DATABASE_URL", nothing_listens())
    operators_shell.setenv(variable, spoilt)
    result = kabinet_ledger(command)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    message = result.stderr
    assert message.startswith("error:") and variable.removeprefix("KABINET_").lower() in message, message
    assert "notakey" not in message and "PRIVATE KEY" not in message and "Traceback" not in message, message


@pytest.mark.parametrize("service_name", ["", "Ledger", "1ledger", "ledger-east", "ledger\n", 'ledger"; DROP DATABASE x; --'])
def test_a_service_name_that_cannot_name_a_database_is_refused(service_name):
    # It becomes the database's name (`kabinet_<name>`, created by a CREATE DATABASE) and its topics'.
    with pytest.raises(ValidationError, match="service_name"):
        ServiceSettings(service_name=service_name, database_url="postgresql://u@h/db", kafka_bootstrap_servers="k:9092")


def test_a_postgres_scheme_url_is_a_database_url_too():
    # What Heroku-style platforms and libpq docs hand out.
    settings = ServiceSettings(service_name="ledger", database_url="postgres://u@h:5432/db", kafka_bootstrap_servers="k:9092")
    assert settings.service_database_url == "postgres://u@h:5432/kabinet_ledger"


@pytest.mark.parametrize(("setting", "refused", "default"), [
    ("kafka_replication_factor", (0, 8), 1),  # the embedded broker is one node: more replicas cannot be placed
    ("worker_threads", (0, 65), 8),  # the connection pool is as big: 0 would serve nothing
    ("gc_young_threshold", (699, 1_000_001), 10_000),
    ("kafka_session_timeout_ms", (999, 300_001), 10_000),  # a heartbeat every 333 ms at the least
])
def test_a_services_sizes_are_bounded_and_default_to_what_the_embedded_stack_runs(setting, refused, default):
    given = {"service_name": "ledger", "database_url": "postgresql://u@h/db", "kafka_bootstrap_servers": "k:9092"}
    assert getattr(ServiceSettings(**given), setting) == default
    for value in refused:
        with pytest.raises(ValidationError, match=setting):
            ServiceSettings(**given, **{setting: value})


def test_a_services_producer_is_not_idempotent_unless_asked_for_the_embedded_broker_has_no_such_producer():
    settings = ServiceSettings(service_name="ledger", database_url="postgresql://u@h/db", kafka_bootstrap_servers="k:9092")
    assert settings.kafka_enable_idempotence is False


@pytest.mark.parametrize("setting", ["pg_port", "broker_port"])
@pytest.mark.parametrize("port", [0, 65_536])
def test_a_dev_stack_port_that_is_no_port_is_refused_at_start(setting, port):
    with pytest.raises(ValidationError, match=setting):
        StackSettings(**{setting: port})


def test_the_services_read_the_standard_otel_endpoint_variable(operators_shell):
    operators_shell.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    settings = ServiceSettings(service_name="ledger", database_url="postgresql://u@h/db", kafka_bootstrap_servers="k:9092")
    assert settings.otel_exporter_otlp_endpoint == "http://collector:4318"


# ---- the database a service starts on ------------------------------------------------------------


def as_role(server_url: str, role: str, password: str) -> str:
    server = urlsplit(server_url)
    return urlunsplit(server._replace(netloc=f"{role}:{password}@{server.hostname}:{server.port}"))


async def test_a_service_whose_role_may_not_create_databases_starts_on_the_database_made_for_it(stack, unique_name):
    # In production the operator creates the service's database and gives it a role that may
    # create none: starting must not ask for what the role may not do.
    admin = await asyncpg.connect(stack.database_url)
    role, database = f"role_{unique_name}", database_name_for(unique_name)
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' NOCREATEDB")
    try:
        await admin.execute(f'CREATE DATABASE "{database}" OWNER {role}')
        try:
            assert await ensure_database(as_role(stack.database_url, role, "pw"), unique_name) == database
        finally:
            await admin.execute(f'DROP DATABASE "{database}"', timeout=120)
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_the_processes_of_a_service_starting_at_once_on_a_fresh_server_all_start(stack, unique_name):
    # Replicas of a service deployed for the first time: each makes sure the database is there.
    try:
        made = await asyncio.gather(*(ensure_database(stack.database_url, unique_name) for _ in range(4)),
                                    return_exceptions=True)
        assert made == [database_name_for(unique_name)] * 4, made
    finally:
        admin = await asyncpg.connect(stack.database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database_name_for(unique_name)}"', timeout=120)
        finally:
            await admin.close()


async def test_a_database_server_that_never_answers_is_down_within_seconds_not_minutes():
    # A network black hole: the server's port takes the connection and says nothing. A service
    # starting on it fails (and is restarted) in seconds; it is "down" (503, exit 2), not a crash.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen()
        server = f"postgresql://bank:pw@127.0.0.1:{black_hole.getsockname()[1]}/postgres"
        started = time.monotonic()
        tries = [asyncio.ensure_future(create_pool(server, max_size=1)), asyncio.ensure_future(ensure_database(server, "x"))]
        done, pending = await asyncio.wait(tries, timeout=25)
        for task in pending:
            task.cancel()
    assert not pending, f"still connecting after {time.monotonic() - started:.0f} s"
    for task in done:
        assert isinstance(task.exception(), DATABASE_DOWN_ERRORS), repr(task.exception())


async def test_a_pool_lends_no_more_than_its_size_and_a_borrower_it_cannot_serve_gives_up_in_bounded_time(stack):
    # Its size is the service's worker threads (what the server's max_connections is planned
    # with); a request that cannot have a connection answers 503, it does not wait for ever.
    pool = await create_pool(stack.database_url, max_size=1)
    try:
        async with pool.acquire():
            borrowing = asyncio.ensure_future(pool.acquire())
            done, _ = await asyncio.wait({borrowing}, timeout=DATABASE_COMMAND_TIMEOUT_S + 10)
            if not done:
                borrowing.cancel()
            assert done, "a borrower waited for ever for a connection"
            assert isinstance(borrowing.exception(), TimeoutError), "a second connection was lent from a pool of one"
    finally:
        await pool.close()


async def test_a_server_that_has_no_connection_left_for_the_service_is_down_not_a_crash(stack, unique_name):
    # max_connections reached (or the role's limit): wait and try again, a 503 for a request.
    admin = await asyncpg.connect(stack.database_url)
    role = f"role_{unique_name}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 0")
    try:
        with pytest.raises(DATABASE_DOWN_ERRORS):
            await asyncpg.connect(as_role(stack.database_url, role, "pw"))
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


# ---- development keys ----------------------------------------------------------------------------


def test_a_developer_token_is_trusted_by_a_service_on_the_default_data_dir(operators_shell, tmp_path):
    # `make run` sets no data dir: `kabinet dev-token` and the services it calls must agree on
    # the default one, or every hand-made token is refused.
    operators_shell.delenv("KABINET_DATA_DIR")
    operators_shell.chdir(tmp_path)
    printed = CliRunner().invoke(kabinet_cli.app, ["dev-token", "payments", "--role", "ledger:post"])
    assert printed.exit_code == 0, printed.output
    service = ServiceSettings(service_name="ledger", database_url="postgresql://u@h/db", kafka_bootstrap_servers="k:9092")
    assert verifier_for(service).verify(printed.stdout.strip()).roles == ("ledger:post",)


def test_a_developer_token_lives_an_hour_unless_told_and_never_past_the_longest_a_service_accepts(operators_shell):
    def lifetime(*options: str) -> int:
        printed = CliRunner().invoke(kabinet_cli.app, ["dev-token", "payments", *options])
        assert printed.exit_code == 0, printed.output
        claims = jwt.decode(printed.stdout.strip(), options={"verify_signature": False})
        return claims["exp"] - claims["iat"]

    assert lifetime() == 3600
    assert lifetime("--ttl-s", "120") == 120
    assert lifetime("--ttl-s", str(ACCESS_TOKEN_LIFETIME_MAX_S)) == ACCESS_TOKEN_LIFETIME_MAX_S
    for ttl_s in (0, ACCESS_TOKEN_LIFETIME_MAX_S + 1):
        refused = CliRunner().invoke(kabinet_cli.app, ["dev-token", "payments", "--ttl-s", str(ttl_s)])
        assert refused.exit_code == 2 and "--ttl-s" in refused.output, refused.output


def test_two_processes_making_the_same_development_key_at_once_both_read_the_one_that_won(tmp_path):
    # The other process (the gateway, as `make run` starts it beside the ledger) puts its key in
    # place while this one is writing its own: both must sign and check with the same key.
    theirs = b"the gateway's key"

    def generate_while_another_process_wins() -> bytes:
        path = dev_key_path(tmp_path, "dev-test.pem")
        path.write_bytes(theirs)
        return b"the ledger's key"

    assert dev_key_file(tmp_path, "dev-test.pem", generate_while_another_process_wins) == theirs
    assert dev_key_path(tmp_path, "dev-test.pem").read_bytes() == theirs
    assert [path.name for path in (tmp_path / "keys").iterdir()] == ["dev-test.pem"], "a half-made key file was left"


def test_a_development_key_once_made_is_read_never_made_again(tmp_path):
    made: list[bytes] = []

    def generate() -> bytes:
        made.append(new_private_pem())
        return made[-1]

    first = dev_key_file(tmp_path, "dev-test.pem", generate)
    assert dev_key_file(tmp_path, "dev-test.pem", generate) == first
    assert len(made) == 1
    assert [path.name for path in (tmp_path / "keys").iterdir()] == ["dev-test.pem"]


def test_a_key_file_another_container_with_the_same_pid_is_writing_does_not_stop_this_one(tmp_path):
    # Two containers sharing the data dir both run their service as pid 1.
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / f"dev-test.pem.{os.getpid()}").write_bytes(b"")
    assert dev_key_file(tmp_path, "dev-test.pem", lambda: b"key") == b"key"


# ---- `kabinet up` and `kabinet stack up` ---------------------------------------------------------


def test_kabinet_up_with_a_port_taken_fails_in_one_line_and_starts_nothing(operators_shell, monkeypatch):
    def no_stack(*args, **kwargs):
        raise AssertionError("the stack was started although a service's port is taken")

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(kabinet_cli, "GATEWAY_PORT", taken)
        monkeypatch.setattr(kabinet_cli, "SERVICE_PORTS", {"ledger": free_port()})
        monkeypatch.setattr(kabinet_cli, "DevStack", no_stack)
        result = CliRunner().invoke(kabinet_cli.app, ["up"])
    assert result.exit_code == 1, (result.output, result.exception)
    message = one_line(result.stderr)
    assert "\n" not in message and f"port {taken} for gateway is taken" in message, message


def test_kabinet_stack_up_that_cannot_start_fails_in_one_line(operators_shell, monkeypatch):
    class CannotStart:
        def up(self):
            raise StackError("port 55432 (KABINET_PG_PORT) is taken")

    monkeypatch.setattr(kabinet_cli, "DevStack", CannotStart)
    result = CliRunner().invoke(kabinet_cli.app, ["stack", "up"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert one_line(result.stderr) == "error: port 55432 (KABINET_PG_PORT) is taken"


class _Server:
    """An embedded server `kabinet up` may start, watch and stop."""

    def __init__(self, name: str, running: bool, stopped: list[str]) -> None:
        self.name, self.running, self._stopped = name, running, stopped

    def is_running(self) -> bool:
        return self.running

    def stop(self) -> None:
        self.running = False
        self._stopped.append(self.name)


class _Stack:
    """The dev stack as `kabinet up` sees it: what was running before, what up() starts."""

    def __init__(self, data_dir: Path, *, external_database: bool, running_before: bool) -> None:
        self.stopped: list[str] = []
        self.settings = SimpleNamespace(database_url="postgresql://bank@db.internal/postgres" if external_database else None)
        self.data_dir = data_dir
        self.postgres = _Server("PostgreSQL", running_before and not external_database, self.stopped)
        self.broker = _Server("broker", running_before, self.stopped)

    def up(self):
        database_url = self.settings.database_url or "postgresql://kabinet@127.0.0.1:55432/postgres"
        if self.settings.database_url is None:
            self.postgres.running = True
        started = None if self.broker.running else self.broker
        self.broker.running = True
        return StackEndpoints(database_url, "127.0.0.1:59092", self.settings.database_url is None, True), started

    def stop_broker(self, broker) -> None:
        broker.stop()


class _Service:
    """A service process `kabinet up` spawned: it stops when sent SIGTERM (or exits at once)."""

    def __init__(self, env: dict[str, str], exits_at_once: bool) -> None:
        self.env, self.signals = env, []
        self.returncode = 1 if exits_at_once else None

    def poll(self):
        return self.returncode

    def send_signal(self, signum) -> None:
        self.signals.append(signum)
        self.returncode = 0

    def wait(self, timeout=None):
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9


def _kabinet_up_in_a_world_of_fakes(monkeypatch, stack: _Stack, stop_with: int, *, a_service_dies_at_start=False):
    """`kabinet up` on a faked stack and faked service processes, a gateway ready at once;
    `stop_with` arrives once it is up. Its CLI result and the services it spawned."""
    handlers: dict[int, object] = {}
    services: dict[str, _Service] = {}

    def sleep(seconds: float) -> None:  # only the up-and-watching loop sleeps: the signal arrives meanwhile
        handlers[stop_with](stop_with, None)

    def spawn(name, port, env, log_dir):
        services[name] = _Service(env, a_service_dies_at_start)
        return services[name]

    monkeypatch.setattr(kabinet_cli, "port_is_free", lambda port: True)
    monkeypatch.setattr(kabinet_cli, "DevStack", lambda: stack)
    monkeypatch.setattr(kabinet_cli, "_spawn", spawn)
    monkeypatch.setattr(kabinet_cli, "signal", SimpleNamespace(
        SIGINT=signal.SIGINT, SIGTERM=signal.SIGTERM, SIGHUP=signal.SIGHUP,
        signal=lambda signum, handler: handlers.__setitem__(signum, handler)))
    monkeypatch.setattr(kabinet_cli, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    monkeypatch.setattr(kabinet_cli, "httpx", SimpleNamespace(
        get=lambda url, timeout: SimpleNamespace(status_code=200), HTTPError=httpx.HTTPError))
    return CliRunner().invoke(kabinet_cli.app, ["up"]), services


@pytest.mark.parametrize(("external_database", "running_before", "stop_with", "stops"), [
    (False, False, signal.SIGINT, ["broker", "PostgreSQL"]),  # `make run` on a fresh checkout, Ctrl-C
    (False, True, signal.SIGHUP, []),  # beside `kabinet stack up`, which says its servers keep running; the terminal closed
    (True, False, signal.SIGTERM, ["broker"]),  # KABINET_DATABASE_URL: an embedded PostgreSQL is none of its business
], ids=["started-it-all", "beside-stack-up", "external-database"])
def test_kabinet_up_stops_every_service_and_only_the_servers_it_started(
        operators_shell, tmp_path, external_database, running_before, stop_with, stops):
    stack = _Stack(tmp_path, external_database=external_database, running_before=running_before)
    result, services = _kabinet_up_in_a_world_of_fakes(operators_shell, stack, stop_with)
    assert result.exit_code == 0, (result.output, result.exception)
    assert set(services) == {"ledger", "gateway"}
    for name, service in services.items():
        assert service.signals == [signal.SIGTERM], name  # once: a second signal makes uvicorn skip its clean stop
        assert service.env["KABINET_SERVICE_NAME"] == name
        assert service.env["KABINET_DATABASE_URL"] == (stack.settings.database_url
                                                        or "postgresql://kabinet@127.0.0.1:55432/postgres")
    assert stack.stopped == stops


def test_kabinet_up_whose_service_dies_at_start_fails_and_stops_what_it_started(operators_shell, tmp_path):
    stack = _Stack(tmp_path, external_database=False, running_before=False)
    result, _ = _kabinet_up_in_a_world_of_fakes(operators_shell, stack, signal.SIGINT, a_service_dies_at_start=True)
    assert result.exit_code == 1, (result.output, result.exception)
    assert "a service exited during start" in result.stderr, result.output
    assert stack.stopped == ["broker", "PostgreSQL"]


def test_kabinet_up_watches_the_servers_it_runs_on_and_no_other(tmp_path):
    stack = _Stack(tmp_path, external_database=False, running_before=True)
    broker = stack.broker
    assert kabinet_cli._stack_part_gone(stack, True, broker) is None
    broker.running = False
    assert kabinet_cli._stack_part_gone(stack, True, broker) == "the broker"
    assert kabinet_cli._stack_part_gone(stack, True, None) is None  # `kabinet stack up`'s broker: not its to watch
    stack.postgres.running = False
    assert kabinet_cli._stack_part_gone(stack, True, None) == "PostgreSQL"
    # On KABINET_DATABASE_URL, a stopped embedded PostgreSQL is no part of the bank.
    assert kabinet_cli._stack_part_gone(stack, False, None) is None


def test_a_service_that_does_not_stop_when_asked_is_killed_and_named(monkeypatch, capsys):
    class Stuck(_Service):
        def wait(self, timeout=None):
            if self.returncode != -9:
                raise subprocess.TimeoutExpired("uvicorn", timeout)
            return self.returncode

    stuck = Stuck({}, exits_at_once=False)
    monkeypatch.setattr(kabinet_cli, "STOP_TIMEOUT_S", 0)
    kabinet_cli._stop_children({"ledger": stuck})
    assert stuck.signals == [signal.SIGTERM] and stuck.returncode == -9
    assert "ledger did not stop within" in capsys.readouterr().err


def test_kabinet_up_waits_for_a_services_clean_stop_before_killing_it():
    # The ledger's last sealing pass and the relay's producer, at most: killed sooner, the
    # ledger would leave its last events unsealed.
    assert kabinet_cli.STOP_TIMEOUT_S > history_seals.LAST_PASS_WAIT_S + PRODUCER_STOP_WAIT_S


def test_docs_asyncapi_writes_the_document_to_the_file_it_is_given(tmp_path):
    written = tmp_path / "asyncapi.json"
    result = CliRunner().invoke(kabinet_cli.app, ["docs", "asyncapi", "--output", str(written)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "asyncapi" in json.loads(written.read_text()) and str(written) in result.stdout
