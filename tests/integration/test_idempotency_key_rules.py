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
    """The keys' table, and a claimant for the process these tests play."""
    settings = stack.service_settings(unique_name)
    await ensure_database(settings.database_url, settings.service_name)
    pool = await create_pool(settings.service_database_url, max_size=8)
    try:
        await idempotency.ensure_schema(pool)
        async with claimant_of_a_process(settings) as claimant:
            yield KeyStore(pool, claimant, settings)
    finally:
        await pool.close()


@asynccontextmanager
async def claimant_of_a_process(settings):
    claimant = idempotency.Claimant(settings.service_database_url)
    await claimant.start()
    try:
        yield claimant
    finally:
        await claimant.stop()


class KeyStore:
    def __init__(self, pool, claimant, settings) -> None:
        self.pool, self.claimant, self.settings = pool, claimant, settings

    def run_once(self, key: str, operation, claimant=None):
        return idempotency.run_once(self.pool, claimant or self.claimant, scope="transfers", key=key,
                                    body={"amount_minor": 100}, operation=operation)


async def test_a_repeat_racing_an_attempt_that_failed_and_let_its_key_go_gets_a_retryable_answer(stack, unique_name):
    async with key_store(stack, unique_name) as store:
        async def dependency_down() -> tuple[int, dict]:
            raise Problem(503, "dependency_unavailable", "the ledger is restarting", headers={"Retry-After": "1"})

        unexpected: list[BaseException] = []
        for attempt in range(30):
            key = f"k{attempt}"
            outcomes = await asyncio.gather(
                *(store.run_once(key, dependency_down) for _ in range(12)),
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


def run(store: KeyStore, key: str, operation, claimant=None):
    return asyncio.create_task(store.run_once(key, operation, claimant))


async def attempt_running(store: KeyStore, key: str, claimant=None):
    """A first attempt, claimed by `claimant`'s process (the store's by default), still running."""
    first = SlowAttempt({"answered_by": "first"})
    task = run(store, key, first, claimant)
    await first.started.wait()
    return first, task


async def taken_over(store: KeyStore, key: str):
    """A first attempt still running when its lease runs out, and the repeat that takes the
    key over, running too: (first, its task, second, its task)."""
    first, second = SlowAttempt({"answered_by": "first"}), SlowAttempt({"answered_by": "second"})
    first_task = run(store, key, first)
    await first.started.wait()
    await store.pool.execute("UPDATE idempotency_keys SET created_at = created_at - make_interval(secs => $2) WHERE key = $1",
                       key, float(idempotency.CLAIM_LEASE_S + 1))
    second_task = run(store, key, second)
    await second.started.wait()
    return first, first_task, second, second_task


def answering_at_once() -> SlowAttempt:
    """A third attempt: were the key free, it would run and answer at once."""
    third = SlowAttempt({"answered_by": "third"})
    third.release.set()
    return third


async def test_an_attempt_that_outlived_its_lease_does_not_store_its_answer_over_the_one_that_took_over(
        stack, unique_name):
    async with key_store(stack, unique_name) as store:
        first, first_task, second, second_task = await taken_over(store, "late")
        second.release.set()
        await second_task
        first.release.set()
        await first_task
        repeat = await store.run_once("late", answering_at_once())
        assert json.loads(repeat.body) == {"answered_by": "second"}


async def test_an_attempt_that_outlived_its_lease_and_failed_does_not_free_the_key_of_the_one_that_took_over(
        stack, unique_name):
    async with key_store(stack, unique_name) as store:
        first, first_task, second, second_task = await taken_over(store, "busy")
        first.fail = True
        first.release.set()
        with pytest.raises(ConnectionError):
            await first_task
        with pytest.raises(Problem) as still_running:  # the second attempt still holds the key
            await store.run_once("busy", answering_at_once())
        assert still_running.value.status == 409
        second.release.set()
        await second_task


async def lock_connection_dropped(store: KeyStore, claimant: idempotency.Claimant) -> None:
    """What the server sees when the claimant's process is killed: its lock's connection closes.
    Waited for (up to 5 s): a backend told to terminate lets its locks go as it exits, a
    moment later, and a repeat asking before then would find the claim's process alive."""
    dropped = await store.pool.fetchval(
        "SELECT count(*) FILTER (WHERE terminated) FROM (SELECT pg_terminate_backend(pid, 5000) AS terminated"
        " FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::bigint::oid AND objid = $2::bigint::oid"
        " AND objsubid = 2 AND granted) AS killed", idempotency.CLAIMANT_LOCK_CLASS, claimant.id)
    assert dropped == 1


async def test_a_key_claimed_by_a_process_that_died_is_taken_over_by_the_first_repeat_not_after_the_lease(
        stack, unique_name):
    async with key_store(stack, unique_name) as store, claimant_of_a_process(store.settings) as dying_process:
        first, first_task = await attempt_running(store, "orphan", claimant=dying_process)
        await lock_connection_dropped(store, dying_process)
        repeat = await store.run_once("orphan", answering_at_once())
        assert repeat.status_code == 201 and json.loads(repeat.body) == {"answered_by": "third"}
        first.release.set()  # had the process lived on, its late answer would not be the key's
        await first_task
        assert json.loads((await store.run_once("orphan", answering_at_once())).body) == {"answered_by": "third"}


async def test_a_key_claimed_by_a_process_that_lives_is_still_in_progress_for_a_repeat_from_another(
        stack, unique_name):
    async with key_store(stack, unique_name) as store, claimant_of_a_process(store.settings) as other_process:
        first, first_task = await attempt_running(store, "running", claimant=other_process)
        with pytest.raises(Problem) as busy:
            await store.run_once("running", answering_at_once())
        assert busy.value.status == 409 and busy.value.code == "request_in_progress"
        first.release.set()
        assert json.loads((await first_task).body) == {"answered_by": "first"}


async def test_a_process_that_lost_its_claimant_lock_takes_it_back_and_its_claims_are_its_own_again(
        stack, unique_name, monkeypatch):
    monkeypatch.setattr(idempotency, "CLAIMANT_CHECK_INTERVAL_S", 0.05)
    async with key_store(stack, unique_name) as store:
        claimant_id = store.claimant.id
        holding = asyncio.create_task(store.claimant.hold_forever())
        try:
            await lock_connection_dropped(store, store.claimant)
            for _ in range(200):  # 10 s at most
                if store.claimant.holds_lock and await store.pool.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::bigint::oid"
                        " AND objsubid = 2 AND granted", claimant_id) == 1:
                    break
                await asyncio.sleep(0.05)
            assert store.claimant.holds_lock and store.claimant.id == claimant_id
            first, first_task = await attempt_running(store, "after-reconnect")
            async with claimant_of_a_process(store.settings) as other_process:
                with pytest.raises(Problem) as busy:
                    await store.run_once("after-reconnect", answering_at_once(), claimant=other_process)
            assert busy.value.status == 409
            first.release.set()
            await first_task
        finally:
            holding.cancel()
