"""More rules of the ledger: holds and freezes, idempotency of holds and captures, limits,
ids, the aggregates' own guards, and the domain layer's purity."""

from __future__ import annotations

import ast
import pathlib
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import pytest

from ledger.domain import commands as c
from ledger.domain import errors
from ledger.domain.balance import Balance
from ledger.domain.batch import BALANCE_MINOR_MAX, aggregate_ids_of, capture_transfer_id
from ledger.domain.errors import (
    AccountClosed,
    AccountFrozen,
    AccountNotEmpty,
    CaptureExceedsHold,
    HoldNotActive,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAccount,
    InvalidHold,
    InvalidTransfer,
    UnbalancedTransfer,
)
from ledger.domain.hold import Hold
from ledger.domain.transfer import Transfer
from services.ledger.tests.unit.ledger_world import T0, funded, transfer
from services.ledger.tests.unit.test_ledger_transfers_refusals_and_balances_at_the_margins import REFUSALS

DAY = timedelta(days=1)


def hold(hold_id: str, debit, credit, amount: int, expires_at=T0 + DAY, code: str = "card_purchase") -> c.PlaceHold:
    return c.PlaceHold(hold_id, debit, credit, amount, "RUB", expires_at, code)


def test_every_refusal_has_a_stable_code_and_status():
    for code, (name, status) in REFUSALS.items():
        error = getattr(errors, name)
        assert issubclass(error, errors.LedgerError) and (error.code, error.status) == (code, status)


def test_a_hold_reserves_funds_for_later_commands_of_the_same_batch(world):
    settlement, card = funded(world, 1_000)
    placed, refused = world.run(hold("h1", card, settlement, 700), transfer("spend", (card, -301), (settlement, 301)))
    assert placed.remaining_minor == 700 and isinstance(refused, InsufficientFunds)
    assert "300" in str(refused) and "301" in str(refused)


def test_capture_of_a_hold_placed_before_a_freeze_still_goes_through(world):
    # The money was reserved when the hold was placed; the freeze stops new spending only.
    settlement, card = funded(world, 1_000)
    merchant = world.open("marketplace_clearing")
    world.one(hold("h1", card, merchant, 400))
    world.one(c.FreezeAccount(card, "customer_request"))
    result = world.one(c.CaptureHold("h1", "clearing-1", 400))
    assert result.state == "captured" and result.transfer_id == capture_transfer_id("h1", "clearing-1")
    assert (world.balance(card).posted_minor, world.balance(card).held_minor) == (600, 0)
    with pytest.raises(AccountFrozen):
        world.one(hold("h2", card, merchant, 1))


def test_a_capture_posts_a_transfer_that_links_back_to_its_hold(world):
    settlement, card = funded(world, 1_000)
    merchant = world.open("marketplace_clearing")
    world.one(hold("h1", card, merchant, 400))
    world.one(c.CaptureHold("h1", "c1", 150))
    posted = world.store[Transfer.id_for("h1:capture:c1")]
    assert (posted.hold_id, posted.capture_id, posted.code) == ("h1", "c1", "card_purchase")
    assert posted.legs == [{"account_id": str(card), "amount_minor": -150, "currency": "RUB"},
                           {"account_id": str(merchant), "amount_minor": 150, "currency": "RUB"}]



def test_each_capture_of_a_hold_posts_with_what_the_hold_is_for(world):
    # The line in Alice's history names the shop and the authorisation, as the pending hold did.
    settlement, card = funded(world, 1_000)
    merchant = world.open("marketplace_clearing")
    world.one(replace(hold("h1", card, merchant, 400), external_ref="rrn-42", metadata={"merchant": "Ozon"}))
    world.one(c.CaptureHold("h1", "c1", 150))
    world.one(c.CaptureHold("h1", "c2", 250))
    for capture_id in ("c1", "c2"):
        posted = world.store[Transfer.id_for(f"h1:capture:{capture_id}")]
        assert (posted.external_ref, posted.metadata) == ("rrn-42", {"merchant": "Ozon"})


def test_same_hold_id_same_body_returns_the_hold_and_other_body_is_conflict(world):
    settlement, card = funded(world, 1_000)
    first = world.one(hold("h1", card, settlement, 100))
    again = world.one(hold("h1", card, settlement, 100))
    assert again.replayed and again.hold_id == first.hold_id and world.balance(card).held_minor == 100
    with pytest.raises(IdempotencyConflict):
        world.one(hold("h1", card, settlement, 200))
    with pytest.raises(IdempotencyConflict):  # the same hold said to be for something else
        world.one(replace(hold("h1", card, settlement, 100), metadata={"merchant": "Ozon"}))


def test_a_retried_placement_or_capture_gets_its_first_answer_whatever_became_of_the_hold_since(world):
    # The card network retries its first clearing after the second has settled the rest:
    # reading the second's outcome as its own, it would book 400 captured, not 150.
    settlement, card = funded(world, 1_000)
    placed = world.one(hold("h1", card, settlement, 400))
    first = world.one(c.CaptureHold("h1", "c1", 150))
    world.one(c.CaptureHold("h1", "c2", 250))
    again = world.one(c.CaptureHold("h1", "c1", 150))
    assert again.replayed and (again.state, again.captured_minor, again.remaining_minor, again.transfer_id) == (
        "active", 150, 250, "h1:capture:c1") == (first.state, first.captured_minor, first.remaining_minor,
                                                 first.transfer_id)
    placed_again = world.one(hold("h1", card, settlement, 400))
    assert placed_again == replace(placed, replayed=True)
    assert world.store[Hold.id_for("h1")].state == "captured" and world.balance(card).posted_minor == 600, "no second effect"


def test_opening_an_existing_account_again_with_another_credit_limit_is_a_conflict_not_a_replay(world):
    card = world.open(limit=0)
    with pytest.raises(IdempotencyConflict):
        world.one(c.OpenAccount(card, "alice", "card", "RUB", 50_000))
    assert world.account(card).credit_limit_minor == 0
    assert world.one(c.OpenAccount(card, "alice", "card", "RUB", 0)).replayed


def test_no_two_different_hold_and_capture_ids_can_name_the_same_capture_transfer(world):
    settlement, card = funded(world, 1_000)
    with pytest.raises(InvalidHold, match="end with"):
        world.one(hold("A:capture", card, settlement, 100))  # "A:capture" + ":capture:" + "Z" ...
    world.one(hold("A", card, settlement, 100))
    with pytest.raises(InvalidHold, match="start with"):
        world.one(c.CaptureHold("A", "capture:Z", 100))  # ... would equal "A" + ":capture:" + "capture:Z"
    with pytest.raises(InvalidHold, match="contain"):
        world.one(c.CaptureHold("A", "x:capture:y", 100))
    assert world.balance(card).held_minor == 100


@pytest.mark.parametrize("text", ["a\x00b", "\ud800"], ids=["NUL", "lone surrogate"])
def test_text_no_reader_of_the_log_could_store_is_refused_at_the_door(world, text):
    settlement, card = funded(world, 1_000)
    for poisoned in (
        c.PostTransfer("t1", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p", metadata={"note": text}),
        c.PostTransfer("t2", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p", external_ref=text),
        c.PostTransfer("t3", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p", customer_ids=(text,)),
        replace(hold("h1", card, settlement, 1), metadata={"merchant": text}),
        replace(hold("h2", card, settlement, 1), external_ref=text),
    ):
        with pytest.raises(InvalidTransfer, match="NUL or lone surrogates"):
            world.one(poisoned)
    with pytest.raises(errors.InvalidAccount, match="NUL or lone surrogates"):
        world.one(c.OpenAccount(uuid4(), text, "card", "RUB"))
    assert world.balance(card).posted_minor == 1_000


@pytest.mark.parametrize("expires_at", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
def test_a_hold_cannot_expire_outside_the_calendar_and_its_neighbours_are_untouched(world, expires_at):
    settlement, card = funded(world, 1_000)
    extreme = datetime.fromisoformat(expires_at)
    refused, placed = world.run(hold("far", card, settlement, 100, expires_at=extreme), hold("near", card, settlement, 100))
    assert isinstance(refused, InvalidHold) and "expires_at" in str(refused)
    assert placed.state == "active" and world.balance(card).held_minor == 100


def test_no_balance_grows_past_what_the_store_can_hold_and_the_batch_goes_on(world):
    settlement, suspense = world.open("settlement", owner="bank"), world.open("suspense", owner="bank")
    largest = c.AMOUNT_MINOR_MAX
    world.balances[suspense] = Balance(BALANCE_MINOR_MAX - largest + 1, 0, 1)  # as after some thousands of the largest legs
    refused, accepted = world.run(transfer("too-far", (settlement, -largest), (suspense, largest)),
                                  transfer("fits", (settlement, -1), (suspense, 1)))
    assert isinstance(refused, InvalidTransfer) and "the most a balance may hold" in str(refused)
    assert accepted.transfer_id == "fits" and world.balance(suspense).posted_minor == BALANCE_MINOR_MAX - largest + 2


def test_same_capture_id_other_amount_is_conflict(world):
    settlement, card = funded(world, 1_000)
    world.one(hold("h1", card, settlement, 500))
    world.one(c.CaptureHold("h1", "c1", 100))
    with pytest.raises(IdempotencyConflict):
        world.one(c.CaptureHold("h1", "c1", 101))
    assert world.balance(card).posted_minor == 900


def test_same_body_with_the_same_instant_in_another_offset_is_a_replay(world):
    settlement, card = funded(world, 1_000)
    moscow = timezone(timedelta(hours=3))
    world.one(hold("h1", card, settlement, 100, expires_at=T0 + DAY))
    assert world.one(hold("h1", card, settlement, 100, expires_at=(T0 + DAY).astimezone(moscow))).replayed


def test_void_and_capture_of_a_finished_hold_are_refused(world):
    settlement, card = funded(world, 1_000)
    world.one(hold("h1", card, settlement, 100))
    world.one(c.CaptureHold("h1", "all", 100))
    with pytest.raises(HoldNotActive):
        world.one(c.VoidHold("h1"))
    world.one(hold("h2", card, settlement, 100))
    world.one(c.VoidHold("h2"))
    with pytest.raises(HoldNotActive):
        world.one(c.CaptureHold("h2", "late", 1))


def test_a_hold_must_expire_in_the_future_and_move_a_positive_amount(world):
    settlement, card = funded(world, 1_000)
    with pytest.raises(InvalidHold):
        world.one(hold("past", card, settlement, 1, expires_at=T0))
    with pytest.raises(InvalidHold):
        world.one(hold("zero", card, settlement, 0))
    with pytest.raises(InvalidHold):
        world.one(hold("self", card, card, 1))
    with pytest.raises(InvalidHold):
        world.one(hold("naive", card, settlement, 1, expires_at=(T0 + DAY).replace(tzinfo=None)))


def test_closing_with_a_live_hold_is_refused_until_it_is_voided(world):
    settlement = world.open("settlement")
    card = world.open(limit=100)  # posted 0, yet it can reserve against its limit
    world.one(hold("h1", card, settlement, 80))
    world.one(c.CaptureHold("h1", "part", 30))
    world.one(transfer("repay", (settlement, -30), (card, 30)))
    with pytest.raises(AccountNotEmpty, match="balance 0 and holds 50"):
        world.one(c.CloseAccount(card, "customer_request"))
    world.one(c.VoidHold("h1"))
    assert world.one(c.CloseAccount(card, "customer_request")).state == "closed"
    assert world.one(c.CloseAccount(card, "customer_request")).replayed
    with pytest.raises(AccountClosed):
        world.one(c.FreezeAccount(card, "customer_request"))


def test_emptying_and_closing_in_one_batch_closes_an_empty_account(world):
    settlement, card = funded(world, 100)
    before = len(world.saved_events)
    emptied, closed, refused = world.run(
        transfer("empty", (card, -100), (settlement, 100)), c.CloseAccount(card, "customer_request"),
        transfer("too-late", (settlement, -1), (card, 1)),
    )
    assert closed.state == "closed" and isinstance(refused, AccountClosed)
    assert world.events_of(card, before) == ["Account.Closed"]
    assert world.balance(card) == Balance(posted_minor=0, held_minor=0, version=world.balance(card).version)


def test_credit_limit_cannot_drop_below_what_is_used(world):
    settlement, card = funded(world, 1, limit=500)
    world.one(transfer("spend", (card, -301), (settlement, 301)))
    with pytest.raises(InsufficientFunds):
        world.one(c.SetCreditLimit(card, 299))
    world.one(c.SetCreditLimit(card, 300))
    assert world.available(card) == 0
    with pytest.raises(InvalidAccount):
        world.one(c.SetCreditLimit(settlement, 100))


def test_amounts_are_integers_within_limits(world):
    settlement, card = funded(world)
    with pytest.raises(InvalidTransfer):
        world.one(transfer("float", (card, -1.5), (settlement, 1.5)))
    huge = c.AMOUNT_MINOR_MAX + 1
    with pytest.raises(InvalidTransfer):
        world.one(transfer("huge", (settlement, -huge), (card, huge)))
    with pytest.raises(InvalidAccount):
        world.one(c.OpenAccount(uuid4(), "alice", "card", "RUB", credit_limit_minor=10.0))


def test_transfer_shape_limits(world):
    settlement, card = funded(world)
    with pytest.raises(InvalidTransfer):
        world.one(transfer("one-leg", (card, -1)))
    many = [world.open("suspense") for _ in range(c.LEGS_MAX)]
    legs = [(a, 1) for a in many] + [(settlement, -c.LEGS_MAX)]
    with pytest.raises(InvalidTransfer, match="65"):
        world.one(transfer("too-many", *legs))
    world.one(transfer("max", *[(a, 1) for a in many[1:]], (settlement, -(c.LEGS_MAX - 1))))  # 64 legs is fine
    with pytest.raises(InvalidTransfer):
        world.one(transfer("Bad Code", (card, -1), (settlement, 1), code="Card Purchase"))
    with pytest.raises(InvalidTransfer):
        world.one(c.PostTransfer("meta", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p",
                                 metadata={f"k{i}": "v" for i in range(c.METADATA_KEYS_MAX + 1)}))


def test_legs_must_balance_in_each_currency_not_in_total(world):
    with pytest.raises(UnbalancedTransfer, match="RUB"):
        world.one(c.PostTransfer("fx", (c.Leg(uuid4(), -100, "RUB"), c.Leg(uuid4(), 100, "USD")), "fx"))


def test_no_client_id_can_take_a_captures_transfer_id(world):
    settlement, card = funded(world)
    with pytest.raises(InvalidTransfer, match="reserved"):
        world.one(transfer("h1:capture:c1", (card, -1), (settlement, 1)))
    with pytest.raises(InvalidHold):
        world.one(hold("a:capture:b", card, settlement, 1))


def test_the_writer_is_told_every_aggregate_a_capture_will_touch():
    capture = c.CaptureHold("h1", "c1", 10)
    assert aggregate_ids_of(capture) == ([Transfer.id_for(capture_transfer_id("h1", "c1"))], [Hold.id_for("h1")])


def test_aggregates_guard_their_own_rules(world):
    settlement, card = funded(world, 100)
    with pytest.raises(AccountNotEmpty):
        world.account(card).close("customer_request", world.balance(card).posted_minor, world.balance(card).held_minor, 0,
                                  at=world.now, requested_by="staff-1")
    world.one(hold("h1", card, settlement, 60))
    held = world.store[next(k for k, v in world.store.items() if getattr(v, "client_hold_id", None) == "h1")]
    with pytest.raises(CaptureExceedsHold):
        held.capture(client_hold_id="h1", capture_id="x", amount_minor=61, transfer_id="t", debit_customer_id="alice",
                     at=world.now, requested_by="payments")
    assert held.pending_events == [] and held.remaining_minor == 60


def test_every_event_survives_the_store(world):
    settlement, card = funded(world, 1_000, limit=200)
    merchant = world.open("marketplace_clearing")
    world.run(hold("h1", card, merchant, 300), c.SetCreditLimit(card, 100), c.FreezeAccount(card, "customer_request"))
    world.run(c.CaptureHold("h1", "c1", 100), c.UnfreezeAccount(card, "customer_request"),
              transfer("p", (card, -5), (merchant, 5)))
    world.later(days=2)
    world.run(c.ExpireHold("h1"))
    for aggregate_id, live in world.store.items():
        assert world.app.repository.get(aggregate_id) == live


DOMAIN = pathlib.Path(__file__).resolve().parents[2] / "ledger" / "domain"
IO_LIBRARIES = {"asyncpg", "psycopg", "psycopg2", "fastapi", "faststream", "opentelemetry", "aiokafka", "httpx", "anyio"}


def test_the_domain_layer_imports_no_io_library():
    for module in DOMAIN.glob("*.py"):
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in IO_LIBRARIES, f"{module.name} imports {name}"


def test_a_request_fingerprint_is_the_sha256_of_its_canonical_json_so_retries_stored_long_ago_still_match():
    import hashlib
    import json
    from dataclasses import asdict

    account, other = uuid4(), uuid4()
    commands = [
        c.PostTransfer("t-1", (c.Leg(account, -5, "RUB"), c.Leg(other, 5, "RUB")), "p2p", "ext-1", ("cust-1",),
                       {"b": "2", "a": "1"}),
        c.PlaceHold("h-1", account, other, 7, "RUB", T0 + timedelta(days=1), "card_auth"),
    ]
    for command in commands:
        request = asdict(command)
        del request["requested_by"]  # who asked is not the request: fingerprints stored before it still match
        if isinstance(command, c.PlaceHold):  # holds gained references later: a hold placed without them as before
            del request["external_ref"], request["metadata"]
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
        assert c.fingerprint(command) == hashlib.sha256(canonical.encode()).hexdigest()
        assert c.fingerprint(replace(command, requested_by="payments")) == c.fingerprint(command)
    # A hold placed with references is another request than the same hold without them.
    hold = commands[1]
    variants = [hold, replace(hold, external_ref="rrn-1"), replace(hold, metadata={"merchant": "Ozon"}),
                replace(hold, external_ref="rrn-1", metadata={"merchant": "Ozon"})]
    assert len({c.fingerprint(command) for command in variants}) == 4
