"""Rules of the ledger's read side (balances, history, statements, account lists), on real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ledger import projections
from ledger.domain import commands
from services.ledger.tests.integration.ledger_support import (
    as_an_older_ledger_left_it,
    failed_checks,
    open_account,
    pages_after,
    transfer_body,
)

pytestmark = pytest.mark.integration


async def settled(client) -> None:
    await client.parts.projection.wait_for(client.parts.writer.last_position)


async def test_a_statement_paged_while_money_keeps_arriving_adds_up_to_what_its_first_page_says(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    start = datetime.now(UTC) - timedelta(seconds=1)
    for number, amount in enumerate((500, 300, 200)):
        assert (await ledger.post("/transfers", json=transfer_body(f"in-{number}", (settlement, -amount),
                                                                    (card, amount)))).status_code == 201
    await settled(ledger)
    period = {"since": start.isoformat(), "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}  # this month, say

    first = (await ledger.get(f"/accounts/{card}/statement", params={**period, "limit": 2})).json()
    # A salary arrives while the customer's statement is being fetched page by page.
    assert (await ledger.post("/transfers", json=transfer_body("salary", (settlement, -10_000),
                                                                (card, 10_000)))).status_code == 201
    await settled(ledger)
    pages, cursor = [first], first["next_cursor"]
    for _ in range(10):  # bounded
        if cursor is None:
            break
        page = (await ledger.get(f"/accounts/{card}/statement", params={**period, "limit": 2, "cursor": cursor})).json()
        pages.append(page)
        cursor = page["next_cursor"]
    lines = [line for page in pages for line in page["lines"]]
    totals = {(p["opening_balance_minor"], p["closing_balance_minor"], p["credits_minor"], p["debits_minor"]) for p in pages}
    assert totals == {(0, 1_000, 1_000, 0)}, "one statement, one set of totals on every page"
    assert [line["transfer_id"] for line in lines] == ["in-0", "in-1", "in-2"]
    assert first["opening_balance_minor"] + sum(line["amount_minor"] for line in lines) == first["closing_balance_minor"]
    # The next statement asked for afresh shows the salary.
    fresh = (await ledger.get(f"/accounts/{card}/statement", params=period)).json()
    assert fresh["closing_balance_minor"] == 11_000 and fresh["lines"][-1]["transfer_id"] == "salary"



async def post_at(ledger, instant: datetime, settlement: str, card: str, *amounts_minor: int) -> None:
    """Money into (positive) and out of (negative) the card, posted at `instant`."""
    ledger.parts.writer.clock = lambda: instant
    for amount in amounts_minor:
        response = await ledger.post("/transfers", json=transfer_body(str(uuid.uuid4()), (settlement, -amount), (card, amount)))
        assert response.status_code == 201, response.text


async def statement_pages(ledger, card: str, since: datetime, until: datetime, limit: int) -> list[dict]:
    period = {"since": since.isoformat(), "until": until.isoformat(), "limit": limit}
    pages = [(await ledger.get(f"/accounts/{card}/statement", params=period)).json()]
    for _ in range(20):  # bounded
        if pages[-1]["next_cursor"] is None:
            break
        pages.append((await ledger.get(f"/accounts/{card}/statement",
                                       params={**period, "cursor": pages[-1]["next_cursor"]})).json())
    return pages


async def test_a_statement_for_a_period_in_the_middle_counts_only_its_own_credits_and_debits_on_every_page(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    before = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)  # within the clock's tolerance
    await post_at(ledger, before, settlement, card, 5_000, -1_200)
    await post_at(ledger, before + timedelta(seconds=10), settlement, card, 700, -300, -100, 50)
    await post_at(ledger, before + timedelta(seconds=20), settlement, card, 9_999, -1)
    await settled(ledger)

    pages = await statement_pages(ledger, card, before + timedelta(seconds=5), before + timedelta(seconds=15), limit=3)
    totals = {(p["opening_balance_minor"], p["closing_balance_minor"], p["credits_minor"], p["debits_minor"]) for p in pages}
    assert totals == {(3_800, 4_150, 750, 400)}, "the period's own turnover, the same on every page"
    amounts = [line["amount_minor"] for page in pages for line in page["lines"]]
    assert len(pages) == 2 and amounts == [700, -300, -100, 50]
    assert [line["balance_after_minor"] for page in pages for line in page["lines"]] == [4_500, 4_200, 4_100, 4_150]


async def test_a_periods_history_paged_line_by_line_shows_each_line_once_newest_first_ties_included(ledger):
    # Lines posted at one instant share a time: a page ends between them and the next goes on
    # with the rest, filtered (a bounded window of entries) or not.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    before = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)
    await post_at(ledger, before, settlement, card, 5_000)
    await post_at(ledger, before + timedelta(seconds=10), settlement, card, 700, -300, -100)
    await post_at(ledger, before + timedelta(seconds=20), settlement, card, 50, -1)
    await post_at(ledger, before + timedelta(seconds=30), settlement, card, 9)
    await settled(ledger)

    async def paged(**filters) -> list[int]:
        params = {"since": (before + timedelta(seconds=5)).isoformat(),
                  "until": (before + timedelta(seconds=25)).isoformat(), "limit": 1, **filters}
        amounts, cursor = [], None
        for _ in range(20):  # bounded
            page = (await ledger.get(f"/accounts/{card}/history",
                                     params={**params, **({"cursor": cursor} if cursor else {})})).json()
            amounts += [line["amount_minor"] for line in page["lines"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return amounts
        raise AssertionError("more pages than lines")

    assert await paged() == [-1, 50, -100, -300, 700]
    assert await paged(amount_min_minor=50) == [50, -100, -300, 700]


async def test_a_read_model_from_before_running_credits_gets_them_at_the_next_start_and_its_statements_agree(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    before = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)
    await post_at(ledger, before, settlement, card, 2_000, -500)
    await post_at(ledger, before + timedelta(seconds=10), settlement, card, 300, -50)
    await settled(ledger)
    period = (before + timedelta(seconds=5), before + timedelta(seconds=15))
    expected = await statement_pages(ledger, card, *period, limit=1)

    await as_an_older_ledger_left_it(ledger.parts.pool, "ALTER TABLE ledger_entries DROP COLUMN credits_after_minor")
    await projections.ensure_schema(ledger.parts.pool)  # at the next start
    assert await statement_pages(ledger, card, *period, limit=1) == expected
    assert (expected[0]["credits_minor"], expected[0]["debits_minor"]) == (300, 50)
    assert await failed_checks(ledger) == {}, "every entry's running credits, old and new, are what the events say"
    await post_at(ledger, before + timedelta(seconds=20), settlement, card, 40)  # and the next entries run on from them
    await settled(ledger)
    whole = await statement_pages(ledger, card, before, before + timedelta(seconds=30), limit=10)
    assert (whole[0]["credits_minor"], whole[0]["debits_minor"], whole[0]["closing_balance_minor"]) == (2_340, 550, 1_790)

async def test_an_owners_accounts_come_in_bounded_pages_that_join_into_all_of_them(ledger):
    owner = f"business-{uuid.uuid4().hex[:8]}"
    opened = await asyncio.gather(*(open_account(ledger, owner=owner) for _ in range(projections.ACCOUNTS_PAGE_SIZE_MAX + 1)))

    first = (await ledger.get("/accounts", params={"owner_id": owner})).json()
    assert len(first["accounts"]) == projections.ACCOUNTS_PAGE_SIZE_MAX and first["next_cursor"]
    listed, cursor = [a["account_id"] for a in first["accounts"]], first["next_cursor"]
    for _ in range(100):  # bounded
        if cursor is None:
            break
        page = (await ledger.get("/accounts", params={"owner_id": owner, "limit": 7, "cursor": cursor})).json()
        assert len(page["accounts"]) <= 7
        listed += [a["account_id"] for a in page["accounts"]]
        cursor = page["next_cursor"]
    assert sorted(listed) == sorted(opened) and len(set(listed)) == len(listed)
    too_many = await ledger.get("/accounts", params={"owner_id": owner, "limit": projections.ACCOUNTS_PAGE_SIZE_MAX + 1})
    assert too_many.status_code == 422 and {e["field"] for e in too_many.json()["errors"]} == {"limit"}


async def test_accounts_opened_within_one_instant_are_each_listed_once_in_opening_order_while_more_are_opened(ledger):
    # After the clock steps back (or beside a writer whose clock is slow) batches post at the
    # last batch's time (ADR 0002): accounts opened then share one instant, and the order
    # they were opened in is not their ids'. An account opened while the owner pages through
    # them, its id below the cursor's, comes on a later page all the same.
    owner = f"business-{uuid.uuid4().hex[:8]}"
    instant = datetime.now(UTC) + timedelta(seconds=5)
    ledger.parts.writer.clock = lambda: instant
    lowest, middle, highest = sorted(str(uuid.uuid4()) for _ in range(3))
    for account_id in (middle, highest):
        await open_account(ledger, owner=owner, account_id=account_id)
    one_at_a_time = {"owner_id": owner, "limit": 1}
    first_page = (await ledger.get("/accounts", params=one_at_a_time)).json()
    await open_account(ledger, owner=owner, account_id=lowest)
    listed = [account for page in await pages_after(ledger, "/accounts", one_at_a_time, first_page)
              for account in page["accounts"]]
    assert {account["opened_at"] for account in listed} == {instant.isoformat()}
    assert [account["account_id"] for account in listed] == [middle, highest, lowest]


async def test_a_read_model_from_before_opening_positions_is_replayed_from_the_log_and_pages_every_account(ledger):
    owner = f"business-{uuid.uuid4().hex[:8]}"
    opened = [await open_account(ledger, owner=owner) for _ in range(3)]
    await settled(ledger)
    await as_an_older_ledger_left_it(
        ledger.parts.pool,
        "ALTER TABLE ledger_accounts DROP COLUMN opened_position; ALTER TABLE ledger_transfers DROP COLUMN posted_position;"
        " CREATE INDEX ledger_accounts_owner_order ON ledger_accounts (owner_id, opened_at, account_id)")
    await projections.ensure_schema(ledger.parts.pool)  # at the next start: the read model is emptied
    assert await ledger.parts.pool.fetchval("SELECT count(*) FROM ledger_accounts") == 0
    assert await ledger.parts.pool.fetchval("SELECT to_regclass('ledger_accounts_owner_order')") is None
    opened.append(await open_account(ledger, owner=owner))  # the running projection finds its position reset
    await settled(ledger)
    pages = [(await ledger.get("/accounts", params={"owner_id": owner, "limit": 3})).json()]
    pages.append((await ledger.get("/accounts", params={"owner_id": owner, "limit": 3,
                                                        "cursor": pages[-1]["next_cursor"]})).json())
    assert [account["account_id"] for page in pages for account in page["accounts"]] == opened
    assert pages[-1]["next_cursor"] is None
    assert await failed_checks(ledger) == {}


async def test_an_account_page_cursor_must_be_one_of_the_owners_accounts(ledger):
    # A stale or mistyped cursor must not read as "no more accounts"; another owner's
    # account as a cursor answers exactly as an unknown id (nothing learnt about it).
    await open_account(ledger, owner="alice")
    bobs = await open_account(ledger, owner="bob")
    answers = [await ledger.get("/accounts", params={"owner_id": "alice", "cursor": cursor})
               for cursor in (str(uuid.uuid4()), bobs)]
    for answer in answers:
        assert answer.status_code == 422 and answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["code"] == "invalid_cursor"
    assert answers[0].json() == answers[1].json()


async def test_a_closed_credit_card_shows_no_money_available(ledger):
    card = await open_account(ledger, limit=50_000)
    assert (await ledger.get(f"/accounts/{card}/balance")).json()["available"]["amount_minor"] == 50_000
    closed = await ledger.post(f"/accounts/{card}/close", json={"reason": "customer_request"},
                               headers={"Idempotency-Key": str(uuid.uuid4())})
    assert closed.status_code == 200 and closed.json()["state"] == "closed", closed.text
    balances = (await ledger.get(f"/accounts/{card}/balance")).json()
    assert balances["available"]["amount_minor"] == 0 and balances["posted"]["amount_minor"] == 0


async def test_a_frozen_account_shows_no_money_available_until_it_is_unfrozen(ledger):
    # Frozen, it can be neither debited nor held against (ledger rule): "available" is what
    # may be spent now, so showing the posted money and the limit there would promise a payment
    # the ledger refuses. The money itself stays in view as posted.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger, limit=50_000)
    posted = await ledger.post("/transfers", json=transfer_body("salary-frozen", (settlement, -7_000), (card, 7_000)))
    assert posted.status_code == 201, posted.text
    frozen = await ledger.post(f"/accounts/{card}/freeze", json={"reason": "fraud_suspected"},
                               headers={"Idempotency-Key": str(uuid.uuid4())})
    assert frozen.status_code == 200 and frozen.json()["state"] == "frozen", frozen.text
    balances = (await ledger.get(f"/accounts/{card}/balance")).json()
    assert balances["available"]["amount_minor"] == 0 and balances["posted"]["amount_minor"] == 7_000
    assert frozen.json()["balances"]["available"]["amount_minor"] == 0
    await ledger.post(f"/accounts/{card}/unfreeze", json={"reason": "fraud_suspected"}, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert (await ledger.get(f"/accounts/{card}/balance")).json()["available"]["amount_minor"] == 57_000


async def test_a_history_page_names_the_currency_of_its_amounts_as_a_statement_does(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    assert (await ledger.post("/transfers", json=transfer_body("in-rub", (settlement, -700), (card, 700)))).status_code == 201
    page = (await ledger.get(f"/accounts/{card}/history")).json()
    assert page["currency"] == "RUB" and page["account_id"] == card and [line["amount_minor"] for line in page["lines"]] == [700]


async def test_a_rarely_matching_history_filter_reads_a_bounded_window_per_page_and_still_finds_every_line(
        ledger, monkeypatch):
    # On a bank account with millions of entries, one page must not read them all looking
    # for a counterparty that paid once: it stops after a window and hands on a cursor.
    monkeypatch.setattr(projections, "HISTORY_SCAN_ROWS_MAX", 5)
    settlement = await open_account(ledger, "settlement")
    fees = await open_account(ledger, "fee_income")
    rare_payer = await open_account(ledger, "settlement")
    tag = uuid.uuid4().hex[:8]
    assert (await ledger.post("/transfers", json=transfer_body(f"rare-{tag}", (rare_payer, -7), (fees, 7)))).status_code == 201
    for number in range(12):
        response = await ledger.post("/transfers", json=transfer_body(f"fee-{tag}-{number}", (settlement, -1), (fees, 1)))
        assert response.status_code == 201
    await settled(ledger)

    def pages(**filters):
        async def read() -> list[list[dict]]:
            found, cursor = [], None
            for _ in range(20):  # bounded: 13 entries, 5 read a page
                page = (await ledger.get(f"/accounts/{fees}/history", params={
                    **filters, "limit": 2, **({"cursor": cursor} if cursor else {})})).json()
                found.append(page["lines"])
                cursor = page["next_cursor"]
                if cursor is None:
                    return found
            raise AssertionError("history pages never ended")
        return read()

    rare = await pages(counterparty_account_id=rare_payer)
    assert [line["transfer_id"] for page in rare for line in page] == [f"rare-{tag}"]
    assert len(rare) >= 3 and rare[0] == [], "the first page read its window, found nothing, and handed on a cursor"
    small = await pages(amount_max_minor=1)
    assert sorted(line["transfer_id"] for page in small for line in page) == sorted(f"fee-{tag}-{n}" for n in range(12))
    assert all(len(page) <= 2 for page in small)


async def test_a_bank_accounts_statement_totals_more_than_a_bigint_of_turnover_without_a_server_error(ledger):
    # A settlement account's balance stays within what the ledger can hold, but what flows
    # through it over a long period (a year, or "since opening" for an auditor) need not.
    big = 10**15  # the largest leg the ledger takes
    settlement = await open_account(ledger, "settlement")
    fees = await open_account(ledger, "fee_income")
    start = datetime.now(UTC) - timedelta(seconds=1)
    debits_count, credits_count = 320, 9_300  # 9.3e18 in: more than PostgreSQL's bigint (9.22e18)

    async def post(number: int, amount_minor: int) -> None:
        # Straight to the writer, not over HTTP: the statement is the rule here, and 9,620
        # requests took half a minute.
        await ledger.parts.writer.submit(commands.PostTransfer(f"flow-{number}", (
            commands.Leg(uuid.UUID(settlement), amount_minor, "RUB"), commands.Leg(uuid.UUID(fees), -amount_minor, "RUB"),
        ), "p2p"))

    amounts = [-big] * debits_count + [big] * credits_count  # out first, so the balance never passes 9e18
    for chunk in range(0, len(amounts), 500):
        await asyncio.gather(*(post(number, amounts[number]) for number in range(chunk, min(chunk + 500, len(amounts)))))
    await settled(ledger)
    response = await ledger.get(f"/accounts/{settlement}/statement", params={
        "since": start.isoformat(), "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat(), "limit": 1})
    assert response.status_code == 200, response.text
    statement = response.json()
    assert statement["credits_minor"] == credits_count * big and statement["debits_minor"] == debits_count * big
    assert statement["opening_balance_minor"] + statement["credits_minor"] - statement["debits_minor"] == \
        statement["closing_balance_minor"] == (credits_count - debits_count) * big


async def test_an_owner_id_no_account_can_have_is_refused_by_name_not_a_server_error(ledger):
    # No account's owner holds a NUL (the ledger refuses one at opening; PostgreSQL text cannot hold it).
    response = await ledger.get("/accounts", params={"owner_id": "alice\x00"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert {error["field"] for error in response.json()["errors"]} == {"owner_id"}


async def test_a_transfers_message_shows_on_the_lines_of_both_the_payer_and_the_payee(ledger):
    alices, bobs = await open_account(ledger), await open_account(ledger, owner="bob")
    settlement = await open_account(ledger, "settlement")
    start = datetime.now(UTC) - timedelta(seconds=1)
    assert (await ledger.post("/transfers", json=transfer_body("fund", (settlement, -500), (alices, 500)))
            ).status_code == 201
    sent = await ledger.post("/transfers", json={**transfer_body("dinner", (alices, -300), (bobs, 300)),
                                                 "metadata": {"message": "for dinner"}})
    assert sent.status_code == 201, sent.text
    await settled(ledger)
    period = {"since": start.isoformat(), "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}
    for account in (alices, bobs):
        history = (await ledger.get(f"/accounts/{account}/history")).json()["lines"]
        statement = (await ledger.get(f"/accounts/{account}/statement", params=period)).json()["lines"]
        for lines in (history, statement):
            assert [line["metadata"] for line in lines if line["transfer_id"] == "dinner"] == [{"message": "for dinner"}]
    assert (await ledger.get(f"/accounts/{alices}/history")).json()["lines"][-1]["metadata"] == {}, "the top-up said none"


async def test_a_statement_page_reads_from_the_database_little_more_than_it_can_answer(ledger, monkeypatch):
    # A payroll's lines may each carry the most metadata the ledger takes (32 keys and values
    # of 256 characters, here 4 bytes each): some 65 KB a line. A page ends once its lines pass
    # PAGE_LINES_BYTES_MAX, so the ledger (the bank's only writer) must not first read every
    # line a page may ask for (5,000 on a statement) only to drop all but the first few dozen.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    metadata = {f"{key:02d}" + "\U0001F600" * 254: "\U0001F600" * 256 for key in range(32)}
    start = datetime.now(UTC) - timedelta(seconds=1)
    lines_posted = 300  # some 20 MB of lines

    async def pay(number: int) -> None:
        response = await ledger.post("/transfers", json={
            **transfer_body(f"salary-{number}", (settlement, -1), (card, 1)), "metadata": metadata})
        assert response.status_code == 201, response.text

    for first in range(0, lines_posted, 50):
        await asyncio.gather(*(pay(number) for number in range(first, first + 50)))
    await settled(ledger)

    fetched = {"bytes": 0}  # of the lines' rows the ledger took from PostgreSQL, as they came
    fetch = asyncpg.Connection.fetch

    async def counting_fetch(connection, query, *args, **kwargs):
        rows = await fetch(connection, query, *args, **kwargs)
        lines = [dict(row) for row in rows if "legs" in dict(row)]  # a history or statement line's row
        fetched["bytes"] += sum(len(str(value).encode()) for line in lines for value in line.values())
        return rows

    monkeypatch.setattr(asyncpg.Connection, "fetch", counting_fetch)
    period = {"since": start.isoformat(), "until": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}
    # So too a history page (200 lines), filtered or not.
    for path, params in ((f"/accounts/{card}/statement", period),  # its default limit: 5,000 lines
                         (f"/accounts/{card}/history", {"limit": 200}),
                         (f"/accounts/{card}/history", {"limit": 200, "amount_min_minor": 1})):  # filtered: a window
        fetched["bytes"] = 0
        response = await ledger.get(path, params=params)
        assert response.status_code == 200, response.text[:300]
        page = response.json()
        assert 0 < len(page["lines"]) < lines_posted and page["next_cursor"], (path, params)
        assert len(response.content) > projections.PAGE_LINES_BYTES_MAX, "the page was cut by size, not by count"
        assert fetched["bytes"] <= 2 * projections.PAGE_LINES_BYTES_MAX, (path, params, fetched["bytes"], len(page["lines"]))
    # Where a page stops, the next goes on: every line once, in order (each balance one more).
    pages = await statement_pages(ledger, card, start, datetime.now(UTC) + timedelta(minutes=1), limit=5_000)
    lines = [line for page in pages for line in page["lines"]]
    assert sorted(line["transfer_id"] for line in lines) == sorted(f"salary-{n}" for n in range(lines_posted))
    assert [line["balance_after_minor"] for line in lines] == list(range(1, lines_posted + 1)) and len(pages) > 2
