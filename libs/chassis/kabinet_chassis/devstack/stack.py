"""The dev stack as a whole: which database server and broker the bank runs on.

Embedded by default; the servers named by KABINET_DATABASE_URL and
KAFKA_BOOTSTRAP_SERVERS when set; testcontainers when KABINET_USE_TESTCONTAINERS=1
and a Docker engine answers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kabinet_chassis.devstack.broker import EmbeddedBroker, is_our_broker
from kabinet_chassis.devstack.errors import StackError
from kabinet_chassis.devstack.postgres import EmbeddedPostgres
from kabinet_chassis.settings import StackSettings


@dataclass
class StackEndpoints:
    database_url: str
    bootstrap_servers: str
    database_is_embedded: bool
    broker_is_embedded: bool


class DevStack:
    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings()
        self.data_dir = self.settings.data_dir.resolve()
        self.postgres = EmbeddedPostgres(self.data_dir / "pg", self.settings.pg_port)
        self.state_path = self.data_dir / "stack.json"

    def _saved_broker(self) -> tuple[int | None, int]:
        """The pid and port stack.json names, if it names a broker at all."""
        try:
            saved = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None, self.settings.broker_port
        pid, port = (saved.get("broker_pid"), saved.get("broker_port")) if isinstance(saved, dict) else (None, None)
        if not isinstance(port, int) or isinstance(port, bool):
            port = self.settings.broker_port
        if not isinstance(pid, int) or isinstance(pid, bool):
            pid = None
        return pid, port

    def _load_broker(self) -> EmbeddedBroker:
        """The broker stack.json names, with its pid only while that pid is provably our broker:
        a pid outlives its process in the file, and the system hands it to another process."""
        pid, port = self._saved_broker()
        broker = EmbeddedBroker(port, self.data_dir / "broker.log")
        if pid is not None and is_our_broker(pid, port):
            broker.pid = pid
        return broker

    def _save_broker(self, broker: EmbeddedBroker) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps({"broker_pid": broker.pid, "broker_port": broker.port}))

    def _forget_broker(self, pid: int | None = None) -> None:
        """Remove the saved broker (only if it has this pid, when one is given)."""
        saved_pid, _ = self._saved_broker()
        if pid is None or saved_pid == pid:
            self.state_path.unlink(missing_ok=True)

    def stop_broker(self, broker: EmbeddedBroker) -> None:
        """Stop a broker that up() started, and forget it: once it is gone its pid may be any process's."""
        pid = broker.pid
        broker.stop()
        self._forget_broker(pid)

    def up(self) -> tuple[StackEndpoints, EmbeddedBroker | None]:
        """Start what is embedded and not running; returns endpoints and a broker we started.

        A broker started here is stopped with stop_broker(), which forgets it too. When the
        broker cannot start, a PostgreSQL started here is stopped: a failed start leaves nothing."""
        if os.environ.get("KABINET_USE_TESTCONTAINERS") == "1":
            return self._testcontainers(), None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        database_url = self.settings.database_url
        database_started = database_url is None and not self.postgres.is_running()
        if database_url is None:
            self.postgres.start()
            database_url = self.postgres.url
        try:
            bootstrap, started = self._broker_up()
        except StackError:
            if database_started:
                self.postgres.stop()
            raise
        endpoints = StackEndpoints(
            database_url, bootstrap, self.settings.database_url is None, self.settings.kafka_bootstrap_servers is None
        )
        return endpoints, started

    def _broker_up(self) -> tuple[str, EmbeddedBroker | None]:
        """The broker's bootstrap servers, starting the embedded one if it is not running; and
        the broker started here, if one was."""
        bootstrap = self.settings.kafka_bootstrap_servers
        started: EmbeddedBroker | None = None
        if bootstrap is None:
            broker = self._load_broker()
            if broker.is_running() and broker.port != self.settings.broker_port:
                raise StackError(
                    f"the embedded broker of an earlier `kabinet stack up` runs on port {broker.port}, "
                    f"not KABINET_BROKER_PORT={self.settings.broker_port}: run `kabinet stack down` first"
                )
            if not broker.is_running():
                broker = EmbeddedBroker(self.settings.broker_port, self.data_dir / "broker.log")
                broker.start()
                self._save_broker(broker)
                started = broker
            bootstrap = broker.bootstrap_servers
        return bootstrap, started

    def down(self) -> None:
        broker = self._load_broker()
        broker.stop()  # signals nothing unless the saved pid is still our broker
        self._forget_broker()
        self.postgres.stop()

    def status(self) -> dict[str, str]:
        broker = self._load_broker()
        database = (
            f"external {self.settings.database_url}" if self.settings.database_url
            else ("running " if self.postgres.is_initialised() and self.postgres.is_running() else "stopped ")
            + f"embedded PostgreSQL on 127.0.0.1:{self.settings.pg_port} (data {self.postgres.data_dir})"
        )
        kafka = (
            f"external {self.settings.kafka_bootstrap_servers}" if self.settings.kafka_bootstrap_servers
            else ("running " if broker.is_running() else "stopped ")
            + f"embedded broker on 127.0.0.1:{broker.port if broker.is_running() else self.settings.broker_port}"
        )
        return {"database": database, "broker": kafka}

    def _testcontainers(self) -> StackEndpoints:
        from testcontainers.community.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        try:
            postgres = PostgresContainer("postgres:18").start()
            kafka = KafkaContainer().with_kraft().start()
        except Exception as error:
            raise StackError(f"KABINET_USE_TESTCONTAINERS=1 but no Docker engine answers: {error}") from error
        url = postgres.get_connection_url().replace("postgresql+psycopg2://", "postgresql://")
        return StackEndpoints(url, kafka.get_bootstrap_server(), False, False)
