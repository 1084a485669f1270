"""The ledger bench's WAL-flush figure counts a run's own commits: a server reports its
statistics late (about 10 s after a backend goes idle), so a reading taken at once missed
the run's last stretch and counted the run before's."""

from __future__ import annotations

import asyncpg
import pytest

from bench.ledger import wal_flushes

pytestmark = pytest.mark.integration

COMMITS = 200


async def test_the_wal_flushes_of_a_run_of_synchronous_commits_are_all_counted(stack, unique_name):
    admin = await asyncpg.connect(stack.database_url)
    await admin.execute(f"CREATE DATABASE {unique_name}")
    await admin.close()
    url = stack.database_url.rsplit("/", 1)[0] + f"/{unique_name}"
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("SET synchronous_commit = on; CREATE TABLE payments (n int)")
        before = await wal_flushes(url)
        for n in range(COMMITS):  # each its own transaction: one WAL flush each
            await connection.execute("INSERT INTO payments VALUES ($1)", n)
        counted = await wal_flushes(url) - before
    finally:
        await connection.close()
    # Commits of other tests' databases on the same server may share a flush with one of these.
    assert counted >= 0.9 * COMMITS, f"{COMMITS} synchronous commits, {counted} WAL flushes counted"
