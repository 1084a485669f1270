"""A service always stops: a background loop stuck in its clean-up, holding a database
connection, is named in the log and left behind, instead of holding the stop for ever."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from kabinet_chassis import service as service_module
from kabinet_chassis.service import Service

pytestmark = pytest.mark.integration

STOP_WAIT_S = 0.5
CLEAN_UP_HANG_S = 120  # far longer than the stop may take


async def test_a_loop_stuck_in_its_clean_up_with_a_connection_does_not_keep_the_service_from_stopping(
        stack, unique_name, monkeypatch, caplog):
    monkeypatch.setattr(service_module, "STOP_WAIT_S", STOP_WAIT_S)
    service = Service(stack.service_settings(unique_name), title="stops", uses_database=True)
    held_pids: list[int] = []

    async def publisher_loop() -> None:
        async with service.pool.acquire() as connection:
            held_pids.append(await connection.fetchval("SELECT pg_backend_pid()"))
            try:
                await asyncio.Event().wait()
            finally:  # like a producer flushing to a broker that does not answer
                await asyncio.shield(asyncio.sleep(CLEAN_UP_HANG_S))

    service.run_in_background(publisher_loop)
    with caplog.at_level(logging.ERROR, logger=service_module.log.name):
        async with asyncio.timeout(10 * STOP_WAIT_S):  # the stop is bounded: not CLEAN_UP_HANG_S
            async with service.running():
                for _ in range(100):  # bounded: the loop takes its connection at its first turn
                    await asyncio.sleep(0.01)
                    if held_pids:
                        break
    logged = caplog.text
    assert publisher_loop.__qualname__ in logged and "did not end" in logged
    assert "database connections were not given back" in logged
    assert held_pids, "the loop never took its connection"
    assert await the_server_dropped(stack, held_pids[0]), "the connection the stuck loop held is dropped with the pool"
    for task in asyncio.all_tasks():  # the left-behind loop, which a real process would exit from under
        if task.get_name() == publisher_loop.__qualname__:
            task.cancel()


async def the_server_dropped(stack, pid: int) -> bool:
    connection = await asyncpg.connect(stack.database_url)
    try:
        for _ in range(100):  # bounded: the server ends the backend soon after its client goes
            if not await connection.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                return True
            await asyncio.sleep(0.02)
        return False
    finally:
        await connection.close()
