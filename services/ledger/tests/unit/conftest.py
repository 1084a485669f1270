"""The unit tests' world: the ledger's domain with its batches saved in memory (ledger_world.py)."""

from __future__ import annotations

import pytest

from services.ledger.tests.unit.ledger_world import World


@pytest.fixture
def world() -> World:
    return World()
