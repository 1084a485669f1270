"""Rules of a service's database pool: the next user of a connection never inherits what
the last one left behind."""

from __future__ import annotations

import pytest

from kabinet_chassis.databases import create_pool

pytestmark = pytest.mark.integration


async def test_a_transaction_left_open_is_rolled_back_before_the_connection_is_used_again(stack):
    pool = await create_pool(stack.database_url, max_size=1)  # one connection: the next user gets the same one
    try:
        async with pool.acquire() as connection:
            await connection.execute("CREATE TABLE IF NOT EXISTS pool_rule (n int)")
        async with pool.acquire() as connection:
            left_open = connection.transaction()
            await left_open.start()
            await connection.execute("INSERT INTO pool_rule VALUES (1)")
            await connection.execute("SET LOCAL statement_timeout = '1ms'")
        async with pool.acquire() as connection:
            assert not connection.is_in_transaction()
            assert await connection.fetchval("SELECT count(*) FROM pool_rule") == 0
            assert await connection.fetchval("SHOW statement_timeout") == "0"
    finally:
        await pool.close()
