"""Rules of the Idempotency-Key store: however requests with one key interleave, each
gets an answer a client can act on (the first answer, 409 retry later, or the failure of
its own attempt), never a 500 from the store itself."""

from __future__ import annotations

import asyncio

import pytest

from kabinet_chassis import idempotency
from kabinet_chassis.databases import create_pool, ensure_database
from kabinet_chassis.errors import Problem

pytestmark = pytest.mark.integration


async def test_a_repeat_racing_an_attempt_that_failed_and_let_its_key_go_gets_a_retryable_answer(stack, unique_name):
    settings = stack.service_settings(unique_name)
    await ensure_database(settings.database_url, settings.service_name)
    pool = await create_pool(settings.service_database_url, max_size=8)
    try:
        await idempotency.ensure_schema(pool)

        async def dependency_down() -> tuple[int, dict]:
            raise Problem(503, "dependency_unavailable", "the ledger is restarting", headers={"Retry-After": "1"})

        unexpected: list[BaseException] = []
        for attempt in range(30):
            key = f"k{attempt}"
            outcomes = await asyncio.gather(
                *(idempotency.run_once(pool, scope="transfers", key=key, body={"amount_minor": 100},
                                       operation=dependency_down) for _ in range(12)),
                return_exceptions=True,
            )
            # Each failed attempt releases the key; the others were told 409 or failed themselves.
            unexpected += [o for o in outcomes if not (isinstance(o, Problem) and o.status in (409, 503))]
        assert unexpected == [], f"{len(unexpected)} answers a client cannot act on, e.g. {unexpected[0]!r}"
    finally:
        await pool.close()
