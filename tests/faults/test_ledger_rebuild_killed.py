"""A rebuild of the ledger's read model killed (kill -9) halfway: the live read model is as it
was, the ledger goes on, and the next rebuild clears what the killed one left and succeeds."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid

import asyncpg
import pytest

from ledger import projections
from ledger.domain import commands as c
from ledger.rebuild import REBUILD_SCHEMA, rebuild_read_model
from ledger.service import build
from tests.faults.ledger_processes import REPO_ROOT, failed_checks, verified

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TRANSFERS = 3_000
CONCURRENT_SUBMITS = 100
KILL_WAIT_MAX_S = 60

# The rebuild, alone in a process to kill: small pages, so that it is killed between them.
REBUILD_IN_A_CHILD = """
import asyncio, sys
from pathlib import Path
from kabinet_chassis.eventstore import event_store_env
from kabinet_chassis.settings import ServiceSettings
from ledger import rebuild
from ledger.application import LedgerApplication
service_name, database_url, data_dir = sys.argv[1:4]
settings = ServiceSettings(service_name=service_name, database_url=database_url, kafka_bootstrap_servers="unused:9092",
                           data_dir=Path(data_dir))
rebuild.PAGE_EVENTS = 50
asyncio.run(rebuild.rebuild_read_model(LedgerApplication(env=event_store_env(settings)), settings.service_database_url))
"""


async def read_model_rows(pool) -> dict[str, list]:
    return {table: [tuple(row) for row in await pool.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
            for table in projections.READ_MODEL_TABLES}


async def entries_built(pool) -> int:
    """The entries a rebuild has committed so far (0 before it has made its tables)."""
    try:
        return await pool.fetchval(f"SELECT count(*) FROM {REBUILD_SCHEMA}.ledger_entries")
    except asyncpg.UndefinedTableError:
        return 0


async def test_a_rebuild_killed_halfway_leaves_the_live_read_model_as_it_was(stack, unique_name):
    settings = stack.service_settings(f"ledger_{unique_name}")
    service, parts = build(settings)
    async with service.running():
        settlement, card = uuid.uuid4(), uuid.uuid4()
        await parts.writer.submit(c.OpenAccount(settlement, "bank", "settlement", "RUB"))
        await parts.writer.submit(c.OpenAccount(card, "alice", "card", "RUB"))
        for first in range(0, TRANSFERS, CONCURRENT_SUBMITS):
            await asyncio.gather(*(parts.writer.submit(c.PostTransfer(
                f"top-up-{n}", (c.Leg(settlement, -10, "RUB"), c.Leg(card, 10, "RUB")), "top_up"))
                for n in range(first, first + CONCURRENT_SUBMITS)))
        await parts.projection.wait_for(parts.writer.last_position)
        before = await read_model_rows(parts.pool)

        child = subprocess.Popen([sys.executable, "-c", REBUILD_IN_A_CHILD, settings.service_name,
                                  settings.database_url, str(settings.data_dir)], cwd=REPO_ROOT)
        try:
            built, deadline = 0, time.monotonic() + KILL_WAIT_MAX_S
            while time.monotonic() < deadline and child.poll() is None:
                built = await entries_built(parts.pool)
                if built > 0:
                    break
                await asyncio.sleep(0.01)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL, "the rebuild ended before it was killed halfway"
        assert 0 < built < 2 * TRANSFERS

        assert await read_model_rows(parts.pool) == before
        assert await parts.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", REBUILD_SCHEMA) == 1
        await parts.writer.submit(c.PostTransfer("after-the-kill", (c.Leg(card, -5, "RUB"), c.Leg(settlement, 5, "RUB")),
                                                 "p2p"))
        rebuilt = await rebuild_read_model(parts.app, settings.service_database_url)
        assert rebuilt.events_applied == parts.writer.last_position
        assert await parts.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", REBUILD_SCHEMA) == 0
        await parts.projection.wait_for(parts.writer.last_position)
        report = await verified(settings)
        assert report.ok, failed_checks(report)
