"""Rules of the ledger's reads that customers, staff and auditors rely on line by line: where
a period starts and ends, what an amount filter takes, how pages join, and who may read
what, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.ledger.tests.integration.ledger_support import open_account, read_model_held_back, transfer_body

pytestmark = pytest.mark.integration


async def settled(ledger) -> None:
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)


async def post_at(ledger, instant: datetime, settlement: str, card: str, *amounts_minor: int) -> list[str]:
    """Money into (positive) and out of (negative) the card, posted at `instant`; the transfers' ids."""
    ledger.parts.writer.clock = lambda: instant
    posted = []
    for amount in amounts_minor:
        transfer_id = f"t-{uuid.uuid4().hex[:12]}"
        response = await ledger.post("/transfers", json=transfer_body(transfer_id, (settlement, -amount), (card, amount)))
        assert response.status_code == 201, response.text
        posted.append(transfer_id)
    return posted


def ids(lines: list[dict]) -> list[str]:
    return [line["transfer_id"] for line in lines]


async def test_a_posting_made_at_a_periods_first_instant_is_in_it_and_one_at_its_end_instant_is_in_the_next(ledger):
    # A period is [since, until): a history or statement for one month and one for the next
    # share their bound, and a posting made at that very instant is on the second, once.
    settlement, card = await open_account(ledger, "settlement"), await open_account(ledger)
    start = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)  # within the clock's tolerance
    (early,) = await post_at(ledger, start, settlement, card, 1_000)
    (at_bound,) = await post_at(ledger, start + timedelta(seconds=10), settlement, card, 250)
    await settled(ledger)
    bound = start + timedelta(seconds=10)
    before = {"since": start.isoformat(), "until": bound.isoformat()}
    after = {"since": bound.isoformat(), "until": (bound + timedelta(seconds=10)).isoformat()}

    assert ids((await ledger.get(f"/accounts/{card}/history", params=before)).json()["lines"]) == [early]
    assert ids((await ledger.get(f"/accounts/{card}/history", params=after)).json()["lines"]) == [at_bound]
    first = (await ledger.get(f"/accounts/{card}/statement", params=before)).json()
    second = (await ledger.get(f"/accounts/{card}/statement", params=after)).json()
    assert (ids(first["lines"]), first["closing_balance_minor"]) == ([early], 1_000)
    assert (ids(second["lines"]), second["opening_balance_minor"], second["closing_balance_minor"]) == ([at_bound], 1_000, 1_250)


async def test_an_amount_range_takes_a_debit_by_its_size_so_a_large_payment_out_is_not_at_most_a_small_amount(ledger):
    # "At most 1,000" asked of a history means payments of up to 1,000 either way: a rent of
    # 50,000 paid out is not among them.
    settlement, card = await open_account(ledger, "settlement"), await open_account(ledger)
    start = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)
    salary, rent, coffee, refund = await post_at(ledger, start, settlement, card, 60_000, -50_000, -300, 700)
    await settled(ledger)

    small = (await ledger.get(f"/accounts/{card}/history", params={"amount_max_minor": 1_000})).json()
    assert ids(small["lines"]) == [refund, coffee]
    large = (await ledger.get(f"/accounts/{card}/history", params={"amount_min_minor": 1_000})).json()
    assert ids(large["lines"]) == [rent, salary]
    between = (await ledger.get(f"/accounts/{card}/history", params={"amount_min_minor": 300, "amount_max_minor": 50_000})).json()
    assert ids(between["lines"]) == [refund, coffee, rent]


async def test_a_transfer_of_another_reference_is_no_cursor_for_this_ones_transfers(ledger):
    # Staff reconciling one payment's transfers must not be shown a page that starts after
    # some other payment's transfer, silently leaving out those of this one posted before it.
    settlement, card = await open_account(ledger, "settlement"), await open_account(ledger)
    tag = uuid.uuid4().hex[:8]
    for transfer_id, ref in ((f"a1-{tag}", f"rrn-a-{tag}"), (f"b1-{tag}", f"rrn-b-{tag}"), (f"a2-{tag}", f"rrn-a-{tag}")):
        response = await ledger.post("/transfers", json={**transfer_body(transfer_id, (settlement, -10), (card, 10)), "external_ref": ref})
        assert response.status_code == 201, response.text

    foreign = await ledger.get("/transfers", params={"external_ref": f"rrn-a-{tag}", "cursor": f"b1-{tag}"})
    assert (foreign.status_code, foreign.json()["code"]) == (422, "invalid_cursor"), foreign.text
    own = (await ledger.get("/transfers", params={"external_ref": f"rrn-a-{tag}", "cursor": f"a1-{tag}"})).json()
    assert ([t["transfer_id"] for t in own["transfers"]], own["next_cursor"]) == ([f"a2-{tag}"], None)


async def test_a_line_names_only_the_other_side_of_its_transfer_whatever_the_amounts_paid_beside_it(ledger):
    # A payroll pays each employee another salary: Alice's line names the employer, never Bob,
    # paid 150 beside her 100; and a merchant's line names the card that paid, not the bank's
    # fee taken from the same purchase.
    payroll, fees = await open_account(ledger, "settlement"), await open_account(ledger, "fee_income")
    alices, bobs = await open_account(ledger, owner="alice"), await open_account(ledger, owner="bob")
    shop = await open_account(ledger, owner="shop")
    salaries = transfer_body("payroll-april", (payroll, -250), (alices, 100), (bobs, 150), code="salary")
    assert (await ledger.post("/transfers", json=salaries)).status_code == 201
    purchase = transfer_body("purchase-1", (bobs, -100), (shop, 90), (fees, 10), code="card_purchase")
    assert (await ledger.post("/transfers", json=purchase)).status_code == 201
    await settled(ledger)

    def named(history: dict) -> list[list[str]]:
        return [line["counterparty_account_ids"] for line in history["lines"]]

    assert named((await ledger.get(f"/accounts/{alices}/history")).json()) == [[payroll]]
    assert named((await ledger.get(f"/accounts/{bobs}/history")).json()) == [sorted([shop, fees]), [payroll]]
    assert named((await ledger.get(f"/accounts/{shop}/history")).json()) == [[bobs]]


async def test_a_period_or_amount_range_with_nothing_in_it_is_refused_not_answered_empty(ledger):
    # A statement from an instant to itself, or "at least 101 and at most 100", is a mistake
    # in the request: answered, it would read as an account that moved no money.
    card = await open_account(ledger)
    instant = "2026-11-01T00:00:00Z"
    for path, params, code, field in (
        (f"/accounts/{card}/statement", {"since": instant, "until": instant}, "invalid_period", "until"),
        (f"/accounts/{card}/history", {"amount_min_minor": 101, "amount_max_minor": 100}, "invalid_amount_range", "amount_max_minor"),
    ):
        response = await ledger.get(path, params=params)
        assert (response.status_code, response.json()["code"]) == (422, code), (path, response.text)
        assert [error["field"] for error in response.json()["errors"]] == [field]


async def test_a_hold_or_transfer_the_ledger_confirmed_is_found_by_every_read_asked_after_the_confirmation(ledger, monkeypatch):
    # Card processing places a hold and support looks it up at once; the read model these
    # reads come from follows the commit a moment later (longer under load).
    settlement, shop, card = (
        await open_account(ledger, "settlement"),
        await open_account(ledger, "fee_income"),
        await open_account(ledger),
    )
    assert (await ledger.post("/transfers", json=transfer_body("fund", (settlement, -1_000), (card, 1_000)))).status_code == 201
    await settled(ledger)
    caught_up = read_model_held_back(ledger, monkeypatch)
    rrn = f"rrn-{uuid.uuid4().hex[:12]}"
    placed = await ledger.post(
        "/holds",
        json={
            "hold_id": f"auth-{rrn}",
            "debit_account_id": card,
            "credit_account_id": shop,
            "amount_minor": 400,
            "currency": "RUB",
            "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(),
            "code": "card_purchase",
            "external_ref": rrn,
        },
    )
    assert placed.status_code == 201, placed.text
    paid = await ledger.post("/transfers", json={**transfer_body(f"pay-{rrn}", (card, -100), (settlement, 100)), "external_ref": rrn})
    assert paid.status_code == 201, paid.text
    asyncio.get_running_loop().call_later(0.3, caught_up.set)

    pending, hold, holds, transfer, transfers = await asyncio.gather(
        ledger.get(f"/accounts/{card}/holds"),
        ledger.get(f"/holds/auth-{rrn}"),
        ledger.get("/holds", params={"external_ref": rrn}),
        ledger.get(f"/transfers/pay-{rrn}"),
        ledger.get("/transfers", params={"external_ref": rrn}),
    )
    assert [h["hold_id"] for h in pending.json()["holds"]] == [f"auth-{rrn}"], pending.text
    assert hold.status_code == 200 and hold.json()["remaining_minor"] == 400, hold.text
    assert [h["hold_id"] for h in holds.json()["holds"]] == [f"auth-{rrn}"], holds.text
    assert transfer.status_code == 200, transfer.text
    assert [t["transfer_id"] for t in transfers.json()["transfers"]] == [f"pay-{rrn}"], transfers.text
