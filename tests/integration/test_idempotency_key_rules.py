"""Rules of the Idempotency-Key store: however requests with one key interleave, each
gets an answer a client can act on (the first answer, 409 retry later, or the failure of
its own attempt), never a 500 from the store itself."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import pytest

from kabinet_chassis import idempotency
from kabinet_chassis.databases import create_pool, ensure_database
from kabinet_chassis.errors import Problem

pytestmark = pytest.mark.integration


@asynccontextmanager
async def key_store(stack, unique_name):
    settings = stack.service_settings(unique_name)
    await ensure_database(settings.database_url, settings.service_name)
    pool = await create_pool(settings.service_database_url, max_size=8)
    try:
        await idempotency.ensure_schema(pool)
        yield pool
    finally:
        await pool.close()


async def test_a_repeat_racing_an_attempt_that_failed_and_let_its_key_go_gets_a_retryable_answer(stack, unique_name):
    async with key_store(stack, unique_name) as pool:
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


class SlowAttempt:
    """An operation that runs until released, then answers or fails."""

    def __init__(self, answer: dict) -> None:
        self.answer = answer
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self) -> tuple[int, dict]:
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise ConnectionError("the ledger went away")
        return 201, self.answer


def run(pool, key: str, operation):
    return asyncio.create_task(idempotency.run_once(pool, scope="transfers", key=key, body={"amount_minor": 100},
                                                    operation=operation))


async def taken_over(pool, key: str):
    """A first attempt still running when its lease runs out, and the repeat that takes the
    key over, running too: (first, its task, second, its task)."""
    first, second = SlowAttempt({"answered_by": "first"}), SlowAttempt({"answered_by": "second"})
    first_task = run(pool, key, first)
    await first.started.wait()
    await pool.execute("UPDATE idempotency_keys SET created_at = created_at - make_interval(secs => $2) WHERE key = $1",
                       key, float(idempotency.CLAIM_LEASE_S + 1))
    second_task = run(pool, key, second)
    await second.started.wait()
    return first, first_task, second, second_task


def answering_at_once() -> SlowAttempt:
    """A third attempt: were the key free, it would run and answer at once."""
    third = SlowAttempt({"answered_by": "third"})
    third.release.set()
    return third


async def test_an_attempt_that_outlived_its_lease_does_not_store_its_answer_over_the_one_that_took_over(
        stack, unique_name):
    async with key_store(stack, unique_name) as pool:
        first, first_task, second, second_task = await taken_over(pool, "late")
        second.release.set()
        await second_task
        first.release.set()
        await first_task
        repeat = await idempotency.run_once(pool, scope="transfers", key="late", body={"amount_minor": 100},
                                            operation=answering_at_once())
        assert json.loads(repeat.body) == {"answered_by": "second"}


async def test_an_attempt_that_outlived_its_lease_and_failed_does_not_free_the_key_of_the_one_that_took_over(
        stack, unique_name):
    async with key_store(stack, unique_name) as pool:
        first, first_task, second, second_task = await taken_over(pool, "busy")
        first.fail = True
        first.release.set()
        with pytest.raises(ConnectionError):
            await first_task
        with pytest.raises(Problem) as still_running:  # the second attempt still holds the key
            await idempotency.run_once(pool, scope="transfers", key="busy", body={"amount_minor": 100},
                                       operation=answering_at_once())
        assert still_running.value.status == 409
        second.release.set()
        await second_task
