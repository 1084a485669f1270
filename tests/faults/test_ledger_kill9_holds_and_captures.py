"""`kill -9` of the ledger during a stream of holds, partial captures, voids and transfers:
after the restart, clients retry every command with the same ids, and every hold ends in
exactly the state its commands say, each capture is posted once, every balance is what the
commands add up to, and `kabinet ledger verify` passes."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from tests.faults.ledger_processes import (
    LedgerProcess,
    failed_checks,
    open_account,
    poster_client,
    read_model_caught_up,
    running,
    until_answered,
    verified,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FLOWS = 800  # each: a top-up, a hold, then captures and/or a void (about 3,000 commands)
CARDS = 20
WORKERS = 16
KILL_AFTER_ANSWERS = 1_250
FUNDING_MINOR = 10_000_000  # every hold fits, whatever order the commands land in
FIRST_CAPTURE_MINOR = 300


@dataclass(frozen=True)
class Step:
    path: str
    body: dict | None
    success: int  # the status a success answers with


@dataclass(frozen=True)
class Flow:
    """One card payment's life: commands in the order a client sends them, and where they leave the hold."""

    number: int
    card: int
    top_up_minor: int
    hold_minor: int
    steps: tuple[Step, ...]
    final_state: str
    captured_minor: int

    @property
    def hold_id(self) -> str:
        return f"hold-{self.number}"

    @property
    def captures(self) -> int:
        return sum("/captures" in step.path for step in self.steps)


def flow(number: int, card_ids: list[str], settlement: str, merchant: str, expires_at: str) -> Flow:
    card = number % CARDS
    top_up_minor = 100 + number
    hold_minor = 1_000 + number % 97
    hold_id = f"hold-{number}"
    steps = [
        Step("/transfers", {"transfer_id": f"top-up-{number}", "code": "top_up", "legs": [
            {"account_id": settlement, "amount_minor": -top_up_minor, "currency": "RUB"},
            {"account_id": card_ids[card], "amount_minor": top_up_minor, "currency": "RUB"}]}, 201),
        Step("/holds", {"hold_id": hold_id, "debit_account_id": card_ids[card], "credit_account_id": merchant,
                        "amount_minor": hold_minor, "currency": "RUB", "expires_at": expires_at,
                        "code": "card_purchase"}, 201),
    ]

    def capture(capture_id: str, amount_minor: int) -> Step:
        return Step(f"/holds/{hold_id}/captures", {"capture_id": capture_id, "amount_minor": amount_minor}, 201)

    void = Step(f"/holds/{hold_id}/void", None, 200)
    match number % 4:
        case 0:  # two partial captures, the rest released
            steps += [capture("c1", FIRST_CAPTURE_MINOR), capture("c2", 200), void]
            state, captured = "voided", FIRST_CAPTURE_MINOR + 200
        case 1:  # captured in full, in two parts
            steps += [capture("c1", FIRST_CAPTURE_MINOR), capture("c2", hold_minor - FIRST_CAPTURE_MINOR)]
            state, captured = "captured", hold_minor
        case 2:  # one partial capture, the rest still reserved
            steps += [capture("c1", FIRST_CAPTURE_MINOR)]
            state, captured = "active", FIRST_CAPTURE_MINOR
        case _:  # cancelled before any capture
            steps += [void]
            state, captured = "voided", 0
    return Flow(number, card, top_up_minor, hold_minor, tuple(steps), state, captured)


async def send(client: httpx.AsyncClient, step: Step) -> httpx.Response:
    return await client.post(step.path, json=step.body)


async def test_after_kill_9_mid_stream_every_hold_capture_and_void_retried_lands_exactly_once(
        stack, unique_name, tmp_path):
    settings = stack.service_settings(f"ledger_{unique_name}")
    ledger = LedgerProcess(settings, tmp_path / "ledger.log")
    ledger.start()
    try:
        async with poster_client(ledger) as client:
            settlement = await open_account(client, "settlement", "bank")
            merchant = await open_account(client, "marketplace_clearing", "bank")
            card_ids = [await open_account(client, "card", f"customer-{i}") for i in range(CARDS)]
            for i, card in enumerate(card_ids):
                funded = await client.post("/transfers", json={"transfer_id": f"funding-{i}", "code": "top_up", "legs": [
                    {"account_id": settlement, "amount_minor": -FUNDING_MINOR, "currency": "RUB"},
                    {"account_id": card, "amount_minor": FUNDING_MINOR, "currency": "RUB"}]})
                assert funded.status_code == 201, funded.text
            expires_at = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            flows = [flow(n, card_ids, settlement, merchant, expires_at) for n in range(FLOWS)]

            acknowledged: set[tuple[int, int]] = set()  # (flow, step) answered with success before the kill
            killed = asyncio.Event()

            async def stream(worker: int) -> None:
                for payment in flows[worker::WORKERS]:
                    for index, step in enumerate(payment.steps):
                        if killed.is_set():
                            return
                        try:
                            response = await send(client, step)
                        except httpx.HTTPError:
                            return  # the ledger died under us
                        assert response.status_code == step.success, response.text
                        acknowledged.add((payment.number, index))
                        if len(acknowledged) >= KILL_AFTER_ANSWERS and not killed.is_set():
                            killed.set()
                            ledger.kill()

            await asyncio.gather(*(stream(w) for w in range(WORKERS)))
            assert killed.is_set() and ledger.died(), "the ledger was never killed"
    finally:
        ledger.kill()

    with running(LedgerProcess(settings, tmp_path / "ledger.log", port=ledger.port)) as restarted:
        async with poster_client(restarted) as client:
            # The clients do not know which of their commands landed: they send every one again, in order.
            last_answers: dict[int, dict] = {}
            replayed_acknowledged: Counter[bool] = Counter()
            semaphore = asyncio.Semaphore(WORKERS)

            async def retry(payment: Flow) -> None:
                async with semaphore:
                    for index, step in enumerate(payment.steps):
                        response = await until_answered(lambda step=step: send(client, step))
                        assert response.status_code == step.success, (payment.number, index, response.text)
                        if (payment.number, index) in acknowledged:
                            replayed_acknowledged[response.json()["replayed"]] += 1
                        last_answers[payment.number] = response.json()

            await asyncio.gather(*(retry(payment) for payment in flows))
            # A command acknowledged before the kill was kept: its retry is answered as a replay, not applied again.
            assert replayed_acknowledged == Counter({True: len(acknowledged)}), replayed_acknowledged

            for payment in flows:
                answer = last_answers[payment.number]
                assert (answer["state"], answer["captured_minor"], answer["remaining_minor"]) == (
                    payment.final_state, payment.captured_minor,
                    payment.hold_minor - payment.captured_minor if payment.final_state == "active" else 0,
                ), (payment.number, answer)

            await read_model_caught_up(settings)
            expected_posted = Counter({settlement: -CARDS * FUNDING_MINOR})
            expected_pending: Counter[str] = Counter()
            for card in card_ids:
                expected_posted[card] += FUNDING_MINOR
            for payment in flows:
                card = card_ids[payment.card]
                expected_posted[settlement] -= payment.top_up_minor
                expected_posted[card] += payment.top_up_minor - payment.captured_minor
                expected_posted[merchant] += payment.captured_minor
                if payment.final_state == "active":
                    expected_pending[card] += payment.hold_minor - payment.captured_minor
            for account in [settlement, merchant, *card_ids]:
                balances = (await client.get(f"/accounts/{account}/balance")).json()
                assert (balances["posted"]["amount_minor"], balances["pending"]["amount_minor"]) == (
                    expected_posted[account], expected_pending[account]), (account, balances)
                if account in card_ids:  # no credit limit, not frozen
                    assert balances["available"]["amount_minor"] == expected_posted[account] - expected_pending[account]

        connection = await asyncpg.connect(settings.service_database_url)
        try:
            holds = {row["hold_id"]: (row["state"], row["captured_minor"]) for row in await connection.fetch(
                "SELECT hold_id, state, captured_minor FROM ledger_holds")}
            captures = Counter(row["transfer_id"].split(":capture:")[0] for row in await connection.fetch(
                "SELECT transfer_id FROM ledger_transfers WHERE transfer_id LIKE '%:capture:%'"))
            top_ups = await connection.fetchval("SELECT count(*) FROM ledger_transfers WHERE transfer_id LIKE 'top-up-%'")
        finally:
            await connection.close()
        assert holds == {payment.hold_id: (payment.final_state, payment.captured_minor) for payment in flows}
        assert captures == Counter({payment.hold_id: payment.captures for payment in flows if payment.captures})
        assert top_ups == FLOWS

        report = await verified(settings)
        assert report.ok, failed_checks(report)
