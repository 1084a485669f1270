"""Test fixtures shared by every tier.

Integration tests run against the real thing: an embedded PostgreSQL server and the
embedded Kafka-protocol broker, started once per test session on free loopback
ports, or the servers named by KABINET_DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kabinet_chassis.devstack.ephemeral import EphemeralStack

pytest_plugins = ["tests.support.hang_watchdog", "tests.support.metrics"]


@pytest.fixture(scope="session")
def stack() -> Iterator[EphemeralStack]:
    with EphemeralStack(prefix="kabinet-test-") as test_stack:
        yield test_stack


@pytest.fixture
def unique_name() -> str:
    """A name no other test uses: services get their own database and topics."""
    return f"t{uuid.uuid4().hex[:10]}"
