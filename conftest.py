"""Test fixtures shared by every tier.

Integration tests run against the real thing: an embedded PostgreSQL server and the
embedded Kafka-protocol broker, each started once per test session on free loopback
ports, or the servers named by KABINET_DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kabinet_chassis.devstack.broker import EmbeddedBroker
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.devstack.postgres import EmbeddedPostgres
from kabinet_chassis.settings import ServiceSettings


class TestStack:
    """The servers of one test session; the broker can be restarted (losing its data)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.external_database_url = os.environ.get("KABINET_DATABASE_URL")
        self.external_bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        self.postgres = EmbeddedPostgres(root / "pg", free_port())
        self.broker = EmbeddedBroker(free_port(), root / "broker.log")

    @property
    def database_url(self) -> str:
        return self.external_database_url or self.postgres.url

    @property
    def bootstrap_servers(self) -> str:
        return self.external_bootstrap or self.broker.bootstrap_servers

    def start(self) -> None:
        if not self.external_database_url:
            self.postgres.start()
        if not self.external_bootstrap:
            self.broker.start()

    def restart_broker_losing_data(self) -> None:
        if self.external_bootstrap:
            pytest.fail("restarting the broker needs the embedded broker (unset KAFKA_BOOTSTRAP_SERVERS)")
        self.broker.stop(kill=True)
        self.broker.start()

    def stop(self) -> None:
        self.broker.stop()
        self.postgres.stop(mode="immediate")

    def service_settings(self, service_name: str, **overrides) -> ServiceSettings:
        return ServiceSettings(
            service_name=service_name,
            database_url=self.database_url,
            kafka_bootstrap_servers=self.bootstrap_servers,
            worker_threads=overrides.pop("worker_threads", 8),
            **overrides,
        )


@pytest.fixture(scope="session")
def stack() -> Iterator[TestStack]:
    root = Path(tempfile.mkdtemp(prefix="kabinet-test-"))
    test_stack = TestStack(root)
    test_stack.start()
    try:
        yield test_stack
    finally:
        test_stack.stop()


@pytest.fixture
def unique_name() -> str:
    """A name no other test uses: services get their own database and topics."""
    return f"t{uuid.uuid4().hex[:10]}"
