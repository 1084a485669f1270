"""`kabinet ledger verify` holds the event store to the rules it was written by.

A forger with the database's password can change, delete or reorder events, then make
everything derived from them agree: the read model rebuilt from the changed events, the
saved balances recomputed, the read model's position moved (`cover_up`). What is left to
catch him is what the events themselves promise: a capture moves what its hold says, a
finished hold holds nothing, a stream's versions follow the log one by one, posting times
never go back, and the posting clock is the time of the newest event. Each rule below
tampers in one of these ways and expects a failed check naming what and where.

What no rule can catch, the seals catch (test_ledger_history_is_sealed.py): a plain
transfer's amounts changed on both sides, a whole transfer deleted from the middle, or the
newest deleted with the posting clock put back too."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from kabinet_chassis import history_seals
from kabinet_chassis.eventstore import events_table
from kabinet_chassis.settings import database_name_for
from ledger import verify as verify_module
from ledger.domain import commands as c
from ledger.domain.hold import Hold
from ledger.domain.transfer import Transfer
from ledger.verify import CHECKING_SEALS, REPLAYING, verify
from services.ledger.tests.integration.ledger_support import cover_up, failed_checks, forge_history, funded_card, run_cli

pytestmark = pytest.mark.integration

# Every forgery here changes sealed events (forge_history seals first), and the seals show
# it too; the rule named beside it says what went wrong in the books.
SEALED = "history matches its seals"


def authorisation(card, shop, **references) -> c.PlaceHold:
    """A card purchase of 300 authorised as hold 'auth', for an hour."""
    return c.PlaceHold("auth", card, shop, 300, "RUB", datetime.now(UTC) + timedelta(hours=1), "card_purchase",
                       **references)


async def settled(ledger) -> None:
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    assert await failed_checks(ledger) == {}


# ---- the forger ------------------------------------------------------------------------------


async def rewrite_event(ledger, originator_id, version, change) -> None:
    """Rewrite one stored event's JSON state in place: `change(state)` edits the dict."""
    table = events_table(ledger.parts.app.recorder)
    state = await ledger.parts.pool.fetchval(
        f"SELECT state FROM {table} WHERE originator_id = $1 AND originator_version = $2", originator_id, version)
    state = json.loads(state)
    change(state)
    await forge_history(ledger, "UPDATE {table} SET state = $3 WHERE originator_id = $1 AND originator_version = $2",
                        originator_id, version, json.dumps(state).encode())


async def swap_versions(ledger, originator_id, version_a, version_b) -> None:
    """Two events of one stream trade versions; each keeps its place in the log."""
    parked = 1_000_000  # a version no test stream reaches
    for version_from, version_to in ((version_a, parked), (version_b, version_a), (parked, version_b)):
        await forge_history(
            ledger, "UPDATE {table} SET originator_version = $3 WHERE originator_id = $1 AND originator_version = $2",
            originator_id, version_from, version_to)


async def delete_event(ledger, originator_id, version) -> None:
    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = $1 AND originator_version = $2",
                        originator_id, version)


def at(state_time: dict) -> datetime:
    return datetime.fromisoformat(state_time["_data_"])


def moved(state_time: dict, by: timedelta) -> dict:
    return {**state_time, "_data_": (at(state_time) + by).isoformat()}


# ---- the rules -------------------------------------------------------------------------------


async def test_the_forgers_cover_up_alone_leaves_the_books_verified(ledger):
    # The rules below fail only for what the forger changed, not for his tools.
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await settled(ledger)
    await cover_up(ledger)
    assert await failed_checks(ledger) == {}


def moving(amount_minor: int):
    """A rewrite of a stored two-leg transfer to move `amount_minor` the same way instead."""
    def rewrite(state: dict) -> None:
        for leg in state["legs"]:
            leg["amount_minor"] = amount_minor if leg["amount_minor"] > 0 else -amount_minor
    return rewrite


async def test_a_capture_moves_exactly_what_its_hold_says_was_captured(ledger):
    # The capture's transfer rewritten on both legs (the trial balance still holds): the
    # card pays the shop 250 where the hold's events say 100 was captured.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(authorisation(card, settlement))
    await writer.submit(c.CaptureHold("auth", "c1", 100))
    await settled(ledger)

    await rewrite_event(ledger, Transfer.id_for("auth:capture:c1"), 1, moving(250))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["holds add up", SEALED]
    assert f"transfer auth:capture:c1 moves 250 RUB from {card} to {settlement}" in failed["holds add up"]
    assert f"hold auth's capture c1 took 100 RUB from {card} to {settlement}" in failed["holds add up"]


async def test_a_capture_says_it_is_the_purchase_its_hold_was_placed_for(ledger):
    # The capture's transfer rewritten to name another shop: Alice's history line would say
    # she paid somewhere she never authorised.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(authorisation(card, settlement, external_ref="rrn-1", metadata={"merchant": "Ozon"}))
    await writer.submit(c.CaptureHold("auth", "c1", 100))
    await settled(ledger)
    assert await failed_checks(ledger) == {}
    await rewrite_event(ledger, Transfer.id_for("auth:capture:c1"), 1,
                        lambda state: state.update(metadata={"merchant": "Casino"}))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["holds add up", SEALED]
    assert "transfer auth:capture:c1 (capture c1 of hold auth) says it is ('rrn-1', {'merchant': 'Casino'})" \
        in failed["holds add up"] and "placed for ('rrn-1', {'merchant': 'Ozon'})" in failed["holds add up"]


async def a_payment_and_its_reversal(ledger) -> None:
    """Alice's card pays 100 ('pay'), reversed as posted in error ('pay:reversal'); verify passes."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PostTransfer("pay", (c.Leg(card, -100, "RUB"), c.Leg(settlement, 100, "RUB")), "p2p"))
    await writer.submit(c.ReverseTransfer("pay", "posted_in_error"))
    await settled(ledger)


async def test_no_money_leaves_an_account_while_it_is_frozen_as_the_log_stood_then(ledger):
    # Alice's card arrested by a court; the forger makes a later purchase from her other card
    # come from the arrested one, as if the ledger had let it through.
    writer = ledger.parts.writer
    _, arrested = await funded_card(writer, 1_000)
    shop, other = await funded_card(writer, 1_000)
    await writer.submit(c.FreezeAccount(arrested, "court_order"))
    await writer.submit(c.PostTransfer("coffee", (c.Leg(other, -300, "RUB"), c.Leg(shop, 300, "RUB")), "card_purchase"))
    await settled(ledger)

    def from_the_arrested_card(state: dict) -> None:
        for leg in state["legs"]:
            if leg["account_id"] == str(other):
                leg["account_id"] = str(arrested)

    await rewrite_event(ledger, Transfer.id_for("coffee"), 1, from_the_arrested_card)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {SEALED, "account states"}, failed
    assert (f"Transfer.Posted coffee takes 300 RUB from account {arrested}, frozen by then (for court_order)"
            in failed["account states"])


async def test_an_account_closes_only_empty_as_the_log_stood_then(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.PostTransfer("payout", (c.Leg(card, -1_000, "RUB"), c.Leg(settlement, 1_000, "RUB")),
                                       "payout"))
    await writer.submit(c.CloseAccount(card, "customer_request"))
    await settled(ledger)
    await rewrite_event(ledger, Transfer.id_for("payout"), 1, moving(900))  # 100 left behind on a closed card
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert set(failed) == {SEALED, "account states"}, failed
    assert f"account {card} closed holding 100/0/0 RUB (posted/held/incoming held)" in failed["account states"]


async def test_a_reversal_moves_back_exactly_what_the_transfer_it_names_moved(ledger):
    # The reversal rewritten to return 250 of a 100 payment (the trial balance still holds):
    # the payee would be debited more than she was ever paid.
    await a_payment_and_its_reversal(ledger)
    await rewrite_event(ledger, Transfer.id_for("pay:reversal"), 1, moving(250))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["reversals", SEALED]
    assert "transfer pay:reversal reverses pay, but moves" in failed["reversals"]


async def test_a_transfer_is_never_posted_after_its_own_reversal(ledger):
    # The payment moved to the head of the log, dated with its reversal's time (so posting
    # times still never go back): the statement would show the money returned before it left.
    await a_payment_and_its_reversal(ledger)
    reversal_at, reversal = await ledger.parts.pool.fetchrow(
        f"SELECT notification_id, state FROM {events_table(ledger.parts.app.recorder)} WHERE originator_id = $1",
        Transfer.id_for("pay:reversal"))
    dated = json.loads(reversal)

    await rewrite_event(ledger, Transfer.id_for("pay"), 1,
                        lambda state: state.update(timestamp=dated["timestamp"], posted_at=dated["posted_at"]))
    await forge_history(ledger, "UPDATE {table} SET notification_id = $2 WHERE originator_id = $1",
                        Transfer.id_for("pay"), reversal_at + 1)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["reversals", SEALED]
    assert f"position {reversal_at + 1}: transfer pay is posted after its reversal at position {reversal_at}" \
        in failed["reversals"]


async def voided_hold(ledger):
    """Alice's card funded with 1,000; hold 'auth' of 300 to the settlement account,
    100 captured, the rest voided; verify passes."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(authorisation(card, settlement))
    await writer.submit(c.CaptureHold("auth", "c1", 100))
    await writer.submit(c.VoidHold("auth"))
    await settled(ledger)
    return settlement, card


async def test_a_voided_hold_releases_all_it_had_left(ledger):
    # The hold's amount raised after the fact: a voided hold that still reserves 200 of Alice's money.
    await voided_hold(ledger)
    await rewrite_event(ledger, Hold.id_for("auth"), 1, lambda state: state.update(amount_minor=500))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["holds add up", SEALED]
    assert "hold auth: voided at position" in failed["holds add up"]
    assert "releasing 200 RUB where 400 RUB was left" in failed["holds add up"]


async def test_a_capture_never_takes_more_than_its_hold_has_left(ledger):
    await voided_hold(ledger)
    await rewrite_event(ledger, Hold.id_for("auth"), 1, lambda state: state.update(amount_minor=50))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert "holds add up" in failed
    assert "capture c1 at position" in failed["holds add up"] and "takes 100 RUB where 50 RUB was left" \
        in failed["holds add up"]


async def test_a_streams_versions_follow_the_log_one_by_one_so_a_deleted_capture_shows(ledger):
    # Hold 'auth' of 300 captured in two parts; the first capture (its event and its
    # transfer) deleted: the hold now looks live with 100 left, and everything derived agrees.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(authorisation(card, settlement))
    await writer.submit(c.CaptureHold("auth", "c1", 100))
    await writer.submit(c.CaptureHold("auth", "c2", 200))
    await settled(ledger)
    await delete_event(ledger, Hold.id_for("auth"), 2)
    await delete_event(ledger, Transfer.id_for("auth:capture:c1"), 1)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["event order", SEALED, "aggregates rebuild"]
    assert f"Hold.Captured is version 3 of hold auth ({Hold.id_for('auth')}), after version 1" in failed["event order"]
    # The writer cannot load the hold either: its capture or void would fail, not be refused.
    assert failed["aggregates rebuild"] == ("hold auth cannot be rebuilt from its events: version 2 is missing"
                                            " (version 3 follows), so the writer cannot load it")


async def test_an_accounts_events_reordered_are_found_and_the_account_rebuilt_as_it_stands(ledger):
    # Frozen (version 2) and Unfrozen (version 3) swapped: the read model, replayed in log
    # order, shows the card open, while the writer rebuilds it frozen.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await writer.submit(c.FreezeAccount(card, "customer_request"))
    await writer.submit(c.UnfreezeAccount(card, "customer_request"))
    await settled(ledger)
    await swap_versions(ledger, card, 2, 3)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert f"Account.Unfrozen is version 2 of account {card}, after version 3" in failed["event order"]
    assert f"account {card}: rebuilt frozen/0 (for customer_request), events say open/0" in failed["aggregates rebuild"]


async def test_a_holds_events_reordered_are_found_and_the_hold_rebuilt_as_the_writer_would_use_it(ledger):
    # Captured 100 (version 2), then voided, releasing 200 (version 3), swapped: replayed in
    # log order the hold is voided; the writer, rebuilding it in version order, would hold it
    # captured in full. Each rule sees its half.
    await voided_hold(ledger)
    await swap_versions(ledger, Hold.id_for("auth"), 2, 3)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert f"Hold.Voided is version 2 of hold auth ({Hold.id_for('auth')}), after version 3" in failed["event order"]
    assert failed["aggregates rebuild"] == ("hold auth: rebuilt captured (captured 100, released 200),"
                                            " events say voided (captured 100, released 200)")


async def test_verify_keeps_a_rebuilt_hold_only_while_it_is_live(ledger, monkeypatch):
    # A card issuer's ledger places millions of holds a year: verify compares each finished
    # hold with its rebuilt aggregate as the hold finishes, and lets the aggregate go.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    deadline = datetime.now(UTC) + timedelta(hours=1)
    for hold_id in ("taxi", "coffee", "hotel"):
        await writer.submit(c.PlaceHold(hold_id, card, settlement, 100, "RUB", deadline, "card_purchase"))
    await writer.submit(c.CaptureHold("taxi", "c1", 100))
    await writer.submit(c.VoidHold("coffee"))
    await settled(ledger)
    replays: list[verify_module._Replay] = []

    class SeenReplay(verify_module._Replay):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            replays.append(self)

    monkeypatch.setattr(verify_module, "_Replay", SeenReplay)
    assert (await verify(ledger.parts.app, ledger.settings)).ok
    rebuilt_holds = [aggregate.client_hold_id for aggregate in replays[0].rebuilt.aggregates.values()
                     if isinstance(aggregate, Hold)]
    assert rebuilt_holds == ["hotel"]
    assert [hold.rebuilt_compared for hold in replays[0].holds.values()] == [True, True, False]


async def test_a_transfer_copied_under_another_id_is_posted_twice_and_found(ledger):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await settled(ledger)
    table = events_table(ledger.parts.app.recorder)
    forged = uuid.uuid4()
    await ledger.parts.pool.execute(
        f"INSERT INTO {table} (originator_id, originator_version, topic, state)"
        f" SELECT $2, 1, topic, state FROM {table} WHERE originator_id = $1", Transfer.id_for(f"fund-{card}"), forged)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert f"Transfer.Posted fund-{card} is stored as {forged}, not as {Transfer.id_for(f'fund-{card}')}" \
        in failed["event order"]


async def three_transfers(ledger):
    """Alice's card funded, then two spends ('spend-a', 'spend-b'), each its own batch."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    for transfer_id in ("spend-a", "spend-b"):
        await writer.submit(c.PostTransfer(transfer_id, (c.Leg(card, -100, "RUB"), c.Leg(settlement, 100, "RUB")),
                                           "card_purchase"))
    await settled(ledger)
    return settlement, card


def _named_per_leg(state):
    state["leg_owner_ids"] = ["mallory", None]


def _listed_as_stored_before_legs_named_theirs(state):
    del state["leg_owner_ids"]
    state["leg_customer_ids"] = ["mallory"]


@pytest.mark.parametrize(("rewrite", "said"), [
    (_named_per_leg, "names its legs' customers ['mallory', None], but its legs' accounts belong to ['alice', None]"),
    (_listed_as_stored_before_legs_named_theirs,
     "is published for customers ['mallory'], but its legs' accounts belong to ['alice']"),
], ids=["named per leg", "listed, as stored before"])
async def test_a_transfer_is_published_only_for_the_customers_whose_accounts_it_moves(ledger, rewrite, said):
    # Routed to a stranger, Alice's card payment would tell Mallory where Alice shops.
    await three_transfers(ledger)
    await rewrite_event(ledger, Transfer.id_for("spend-a"), 1, rewrite)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["events replay", SEALED]
    assert f"Transfer.Posted spend-a {said}" in failed["events replay"]


async def test_posting_times_never_go_back_along_the_log(ledger):
    # spend-a dated a day back, in its event and everywhere derived: statements would show
    # it a day before the funding it spent.
    await three_transfers(ledger)

    def backdate(state):
        state["timestamp"] = moved(state["timestamp"], -timedelta(days=1))
        state["posted_at"] = moved(state["posted_at"], -timedelta(days=1))
    await rewrite_event(ledger, Transfer.id_for("spend-a"), 1, backdate)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["event order", SEALED]
    assert "Transfer.Posted spend-a was posted at" in failed["event order"]
    assert "before the event before it" in failed["event order"]


async def test_the_newest_event_deleted_is_found_by_the_posting_clock(ledger):
    await three_transfers(ledger)
    await delete_event(ledger, Transfer.id_for("spend-b"), 1)
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == ["log head", SEALED]
    assert "the posting clock says the last batch was posted at" in failed["log head"]


@pytest.mark.parametrize("change", ["- interval '1 hour'", "+ interval '1 second'"])
async def test_the_posting_clock_is_the_time_of_the_newest_event(ledger, change):
    # Set back, the next batch would post before the newest event; set ahead, it hides a deleted one.
    await three_transfers(ledger)
    await ledger.parts.pool.execute(f"UPDATE ledger_posting_clock SET posted_at = posted_at {change}")
    failed = await failed_checks(ledger)
    assert list(failed) == ["log head"]
    assert "the posting clock says the last batch was posted at" in failed["log head"]


async def test_positions_recorded_past_the_newest_event_show_it_was_deleted(ledger):
    # The forger deleted the newest event and put the posting clock back, but the read model
    # and the outbox relay had already reached it.
    await three_transfers(ledger)
    table = events_table(ledger.parts.app.recorder)
    head = await ledger.parts.pool.fetchval(f"SELECT max(notification_id) FROM {table}")
    await delete_event(ledger, Transfer.id_for("spend-a"), 1)  # spend-a, not the newest: the clock stays right
    await forge_history(ledger, "UPDATE {table} SET notification_id = $1 WHERE notification_id = $2", head + 5, head)
    await cover_up(ledger)
    await ledger.parts.pool.execute("UPDATE projection_position SET position = $1 WHERE projection = 'ledger_read_model'",
                                    head + 7)
    failed = await failed_checks(ledger)
    assert list(failed) == ["log head", SEALED]
    assert f"the read model has applied events up to position {head + 7}, past the newest event {head + 5}" \
        in failed["log head"]


# ---- the report ------------------------------------------------------------------------------


async def test_an_auditors_tool_reads_the_verdict_as_json_with_every_check_and_its_problems(ledger, monkeypatch):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await settled(ledger)
    result = await run_cli(ledger, monkeypatch, "verify", "--json")
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["ok"] is True and verdict["events_read"] == 3
    assert {check["name"] for check in verdict["checks"]} >= {"trial balance", "log head", "read model equals event store"}
    assert all(check["ok"] and check["problems_count"] == 0 for check in verdict["checks"])

    await ledger.parts.pool.execute("UPDATE ledger_balances SET posted_minor = posted_minor + 5 WHERE account_id = $1", card)
    result = await run_cli(ledger, monkeypatch, "verify", "--json")
    assert result.exit_code == 1, result.output
    failed = [check for check in json.loads(result.stdout)["checks"] if not check["ok"]]
    assert [check["name"] for check in failed] == ["balances equal legs and holds"]
    assert failed[0]["problems_count"] == 1 and str(card) in failed[0]["problems"][0]


async def test_an_auditor_is_told_how_far_verify_has_read_the_history_page_by_page(ledger, monkeypatch):
    # On a history of hours, the auditor sees verify move towards the head it started from:
    # once replaying the events, then once more checking them against their seals.
    monkeypatch.setattr("ledger.verify.PAGE_SIZE", 2)
    monkeypatch.setattr("kabinet_chassis.history_seals.SEAL_EVENTS_MAX", 2)
    await three_transfers(ledger)
    table = events_table(ledger.parts.app.recorder)
    await history_seals.seal_new_events(ledger.parts.pool, table, history_seals.seal_key_for(ledger.settings))
    head = await ledger.parts.pool.fetchval(f"SELECT max(notification_id) FROM {table}")
    told: list[tuple[str, int, int]] = []
    report = await verify(ledger.parts.app, ledger.settings, on_progress=lambda *progress: told.append(progress))
    assert report.ok
    assert [stage for stage, _, _ in told] == sorted((stage for stage, _, _ in told), key=[REPLAYING, CHECKING_SEALS].index)
    assert {up_to for _, _, up_to in told} == {head}
    for stage in (REPLAYING, CHECKING_SEALS):
        positions = [position for told_stage, position, _ in told if told_stage == stage]
        assert len(positions) >= 3 and positions == sorted(set(positions)), (stage, told)  # a page (a seal) at a time
        assert positions[-1] == head, (stage, told)


async def test_an_auditors_role_that_may_only_read_verifies_the_books(ledger, monkeypatch):
    # The auditor is given SELECT on the ledger's tables and nothing else, in read-only
    # transactions (as on a replica): verify creates and writes nothing.
    await three_transfers(ledger)
    pool, auditor = ledger.parts.pool, f"auditor_{uuid.uuid4().hex[:8]}"
    schema = await pool.fetchval("SELECT current_schema()")
    await pool.execute(f"CREATE ROLE \"{auditor}\" LOGIN PASSWORD 'auditor'")
    try:
        await pool.execute(f'ALTER ROLE "{auditor}" SET default_transaction_read_only = on')
        await pool.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO "{auditor}"')
        server = urlsplit(ledger.settings.database_url)
        as_auditor = ledger.settings.model_copy(update={"database_url": urlunsplit(server._replace(
            netloc=f"{auditor}:auditor@{server.hostname}:{server.port}"))})
        result = await run_cli(ledger, monkeypatch, "verify", "--json", settings=as_auditor)
        assert result.exit_code == 0, (result.output, result.exception)
        assert json.loads(result.stdout)["ok"] is True
        printed = await run_cli(ledger, monkeypatch, "events", settings=as_auditor)
        assert printed.exit_code == 0 and "Transfer.Posted" in printed.stdout, (printed.output, printed.exception)

        # Without the grants, no verdict and no events: one line that says why (exit 2).
        await pool.execute(f'REVOKE SELECT ON ALL TABLES IN SCHEMA {schema} FROM "{auditor}"')
        for command in ("verify", "events"):
            refused = await run_cli(ledger, monkeypatch, command, settings=as_auditor)
            assert refused.exit_code == 2, (command, refused.output, refused.exception)
            assert "cannot read the ledger's database" in refused.output and "permission denied" in refused.output
    finally:  # roles are the server's, shared by every test's database
        await pool.execute(f'DROP OWNED BY "{auditor}"')
        await pool.execute(f'DROP ROLE "{auditor}"')


async def test_verify_pointed_at_a_database_that_is_no_ledger_says_so_and_leaves_it_as_it_was(ledger, monkeypatch):
    name = f"empty_{uuid.uuid4().hex[:8]}"
    elsewhere = ledger.settings.model_copy(update={"service_name": name})
    await ledger.parts.pool.execute(f'CREATE DATABASE "{database_name_for(name)}"')
    try:
        result = await run_cli(ledger, monkeypatch, "verify", settings=elsewhere)
        assert result.exit_code == 2, (result.output, result.exception)
        assert "cannot read the ledger's database" in result.output
        empty = await asyncpg.connect(elsewhere.service_database_url)
        try:
            assert await empty.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()") == []
        finally:
            await empty.close()
    finally:
        # Dropping a database waits for a checkpoint, which on a busy server takes longer than
        # the pool's 10 s query limit.
        await ledger.parts.pool.execute(f'DROP DATABASE "{database_name_for(name)}"', timeout=120)


async def test_a_wrong_balance_says_by_how_much_and_in_what_currency(ledger):
    settlement, card = await funded_card(ledger.parts.writer, 1_000)
    await settled(ledger)
    await ledger.parts.pool.execute("UPDATE ledger_balances SET posted_minor = posted_minor + 5 WHERE account_id = $1", card)
    failed = await failed_checks(ledger)
    assert f"account {card}: saved balance 1005/0/0 (posted/held/incoming held), legs and holds say 1000/0/0" \
           " (RUB minor units; posted off by 5)" in failed["balances equal legs and holds"]


async def test_reads_a_replica_cancels_give_no_verdict_exit_2_saying_what_to_do(ledger, monkeypatch):
    # A long verify on a replica, as the README suggests: the replica's recovery may cancel its
    # reads (SQLSTATE 40001). No verdict, and how to run it so that they are not.
    async def cancelled_by_recovery(*args, **kwargs):
        raise asyncpg.SerializationError("canceling statement due to conflict with recovery")

    monkeypatch.setattr("ledger.verify.verify", cancelled_by_recovery)
    result = await run_cli(ledger, monkeypatch, "verify")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "conflict with recovery" in result.output and "hot_standby_feedback" in result.output


async def test_a_database_verify_cannot_read_gives_no_verdict_exit_2_in_one_line(ledger, monkeypatch):
    # A wrong database, or an auditor's role without the grants: nothing was checked, so not exit 1.
    await settled(ledger)
    await ledger.parts.pool.execute("ALTER TABLE ledger_entries RENAME TO ledger_entries_away")
    try:
        result = await run_cli(ledger, monkeypatch, "verify")
    finally:
        await ledger.parts.pool.execute("ALTER TABLE ledger_entries_away RENAME TO ledger_entries")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "cannot read the ledger's database" in result.output and "ledger_entries" in result.output


async def test_verify_passes_while_holds_are_placed_captured_and_voided_under_it(ledger, monkeypatch):
    # The rules on holds, captures and the log's head read one snapshot: a ledger that keeps
    # writing, across many small pages, raises no false alarm.
    monkeypatch.setattr("ledger.verify.PAGE_SIZE", 7)
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000_000)
    stop = asyncio.Event()
    soon = datetime.now(UTC) + timedelta(hours=1)

    async def keep_writing() -> int:
        for number in range(100_000):  # bounded; stopped long before
            if stop.is_set():
                return number
            hold_id = f"auth-{number}"
            await writer.submit(c.PlaceHold(hold_id, card, settlement, 30, "RUB", soon, "card_purchase"))
            await asyncio.gather(writer.submit(c.CaptureHold(hold_id, "c1", 10)),
                                 writer.submit(c.PostTransfer(f"p2p-{number}", (c.Leg(card, -1, "RUB"),
                                                                                c.Leg(settlement, 1, "RUB")), "p2p")))
            await writer.submit(c.CaptureHold(hold_id, "c2", 20) if number % 2 else c.VoidHold(hold_id))
        return -1

    traffic = asyncio.create_task(keep_writing())
    try:
        reports = [await verify(ledger.parts.app, ledger.settings) for _ in range(3)]
    finally:
        stop.set()
    assert await traffic > 3  # the ledger really was writing while verify ran
    for report in reports:
        assert report.ok, [(check.name, check.detail) for check in report.checks if not check.ok]
