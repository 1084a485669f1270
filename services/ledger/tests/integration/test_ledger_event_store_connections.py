"""The ledger's event store connects as its database URL says, query parameters included
(sslmode, sslrootcert, a socket's host…): its eventsourcing connections must not go without
the TLS checks the URL asks for, nor to another server than the one it names."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from kabinet_chassis.eventstore import event_store_env
from ledger.application import LedgerApplication
from services.ledger.tests.integration.ledger_support import funded_card

pytestmark = pytest.mark.integration


async def test_the_event_store_connects_with_the_database_urls_own_parameters(ledger):
    await funded_card(ledger.parts.writer, 1_000)
    marked = f"kabinet-probe-{uuid.uuid4().hex[:8]}"
    settings = ledger.settings.model_copy(update={"database_url": f"{ledger.settings.database_url}?application_name={marked}"})
    reader = LedgerApplication(env=event_store_env(settings, creates_tables=False))
    try:
        assert reader.recorder.select_notifications(start=0, limit=10), "it reads the ledger's events"
        connection = await asyncpg.connect(ledger.settings.service_database_url)
        try:
            named = await connection.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", marked)
        finally:
            await connection.close()
        assert named >= 1, "the event store's connection was made with the URL's application_name"
    finally:
        reader.close()
