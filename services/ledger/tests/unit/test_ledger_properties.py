"""Property: any sequence of transfers, holds, captures, voids, expiries, freezes, closes
and limit changes, split into any batches, keeps the ledger's invariants."""

from __future__ import annotations

import copy
import dataclasses
from datetime import timedelta
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.domain import commands as c
from ledger.domain.errors import LedgerError
from ledger.domain.hold import Hold, HoldState
from ledger.domain.results import TransferResult
from services.ledger.tests.unit.ledger_world import World

# RUB: 0 settlement, 1 fee income (internal); 2 alice (no limit), 3 alice (limit 300), 4 bob (no limit)
# USD: 5 settlement (internal), 6 bob (limit 50)
RUB_SLOTS, USD_SETTLEMENT, USD_CARD, FEES = 5, 5, 6, 1
CURRENCY = ["RUB"] * 5 + ["USD"] * 2


def build_world() -> tuple[World, list[UUID]]:
    world = World()
    accounts = [world.open("settlement"), world.open("fee_income"), world.open(limit=0), world.open(limit=300),
                world.open(owner="bob"), world.open("settlement", currency="USD"),
                world.open(owner="bob", currency="USD", limit=50)]
    world.run(
        c.PostTransfer("seed-rub", (c.Leg(accounts[0], -3_000, "RUB"), c.Leg(accounts[2], 1_000, "RUB"),
                                    c.Leg(accounts[3], 1_000, "RUB"), c.Leg(accounts[4], 1_000, "RUB")), "top_up"),
        c.PostTransfer("seed-usd", (c.Leg(accounts[5], -100, "USD"), c.Leg(accounts[6], 100, "USD")), "top_up"),
    )
    return world, accounts


rub = st.integers(0, RUB_SLOTS - 1)
any_slot = st.integers(0, len(CURRENCY) - 1)
amount = st.integers(1, 700)
request_id = st.integers(0, 6)  # few ids, so that they repeat: idempotency and conflicts are exercised
hold_id = st.integers(0, 2)  # fewer still, so that captures, voids and expiries find their hold
command_spec = st.one_of(
    st.tuples(st.just("transfer"), request_id, rub, rub, amount, st.booleans()),
    st.tuples(st.just("usd"), request_id, st.booleans(), st.integers(1, 120)),
    st.tuples(st.just("fx"), request_id, st.integers(2, 4), amount, st.integers(1, 30)),
    st.tuples(st.just("hold"), hold_id, st.sampled_from([2, 3, 4, 2, 3, 4, 0]), rub, amount, st.integers(1, 5)),
    st.tuples(st.just("hold"), hold_id, st.sampled_from([2, 3, 4, 2, 3, 4, 0]), rub, amount, st.integers(1, 5)),
    st.tuples(st.just("capture"), hold_id, st.integers(0, 3), st.integers(1, 400)),
    st.tuples(st.just("capture"), hold_id, st.integers(0, 3), st.integers(1, 400)),
    st.tuples(st.just("void"), hold_id),
    st.tuples(st.just("expire"), hold_id),
    st.tuples(st.just("expire"), hold_id),
    st.tuples(st.just("freeze"), any_slot, st.booleans()),
    st.tuples(st.just("close"), any_slot),
    st.tuples(st.just("limit"), st.sampled_from([2, 3, 6]), st.integers(0, 500)),
    st.tuples(st.just("tick"), st.integers(1, 6)),
)


def to_command(spec, accounts, now):
    kind = spec[0]
    if kind == "transfer":
        _, rid, a, b, value, with_fee = spec
        legs = [c.Leg(accounts[a], -value, "RUB"), c.Leg(accounts[b], value, "RUB")]
        if with_fee and FEES not in (a, b):
            legs = [c.Leg(accounts[a], -value - 10, "RUB"), c.Leg(accounts[b], value, "RUB"), c.Leg(accounts[FEES], 10, "RUB")]
        return c.PostTransfer(f"t{rid}", tuple(legs), "p2p")
    if kind == "usd":
        _, rid, from_card, value = spec
        a, b = (USD_CARD, USD_SETTLEMENT) if from_card else (USD_SETTLEMENT, USD_CARD)
        return c.PostTransfer(f"u{rid}", (c.Leg(accounts[a], -value, "USD"), c.Leg(accounts[b], value, "USD")), "p2p")
    if kind == "fx":
        _, rid, payer, rub_value, usd_value = spec
        return c.PostTransfer(f"fx{rid}", (
            c.Leg(accounts[payer], -rub_value, "RUB"), c.Leg(accounts[0], rub_value, "RUB"),
            c.Leg(accounts[USD_SETTLEMENT], -usd_value, "USD"), c.Leg(accounts[USD_CARD], usd_value, "USD"),
        ), "fx")
    if kind == "hold":
        _, rid, a, b, value, hours = spec
        return c.PlaceHold(f"h{rid}", accounts[a], accounts[b], value, "RUB", now + timedelta(hours=hours), "card_purchase")
    if kind == "capture":
        _, rid, cap, value = spec
        return c.CaptureHold(f"h{rid}", f"cap{cap}", value)
    if kind == "void":
        return c.VoidHold(f"h{spec[1]}")
    if kind == "expire":
        return c.ExpireHold(f"h{spec[1]}")
    if kind == "freeze":
        return (c.FreezeAccount if spec[2] else c.UnfreezeAccount)(accounts[spec[1]])
    if kind == "close":
        return c.CloseAccount(accounts[spec[1]])
    if kind == "limit":
        return c.SetCreditLimit(accounts[spec[1]], spec[2])
    return None  # tick


IDEMPOTENT = (c.PostTransfer, c.PlaceHold, c.CaptureHold, c.VoidHold, c.ExpireHold)


def account_states(world: World, accounts: list[UUID]) -> list[tuple]:
    return [(world.balance(a.id), a.state, a.credit_limit_minor, a.version) for a in map(world.account, accounts)]


def check_invariants(world: World, accounts: list[UUID]) -> None:
    rows = [world.account(a) for a in accounts]
    for currency in ("RUB", "USD"):
        assert sum(world.balance(a.id).posted_minor for a in rows if a.currency == currency) == 0, (
            f"trial balance in {currency} is not zero")
    holds = [h for h in world.store.values() if isinstance(h, Hold)]
    legs = [leg for event in world.saved_events if type(event).__qualname__ == "Transfer.Posted" for leg in event.legs]
    for account in rows:
        balance = world.balance(account.id)
        if not account.is_internal:
            assert balance.available_minor(account.credit_limit_minor) >= 0, "forbidden negative balance"
        assert balance.posted_minor == sum(leg["amount_minor"] for leg in legs if leg["account_id"] == str(account.id)), (
            "balance differs from the sum of its legs")
        live = [h for h in holds if h.state == HoldState.ACTIVE and h.debit_account_id == str(account.id)]
        assert balance.held_minor == sum(h.remaining_minor for h in live), "held differs from the live holds"
        paying_in = [h for h in holds if h.state == HoldState.ACTIVE and h.credit_account_id == str(account.id)]
        assert balance.incoming_held_minor == sum(h.remaining_minor for h in paying_in), (
            "incoming held differs from the live holds paying into the account")
    for hold in holds:
        assert hold.captured_minor == sum(hold.captures.values())
        assert 0 <= hold.remaining_minor <= hold.amount_minor
        assert (hold.remaining_minor == 0) == (hold.state != HoldState.ACTIVE)
    # Every aggregate saved by the batch, rebuilt from its stored (transcoded) events,
    # equals the live one the writer keeps.
    for aggregate in world.last_saved:
        assert world.app.repository.get(aggregate.id) == aggregate, f"{type(aggregate).__name__} rebuilt differently"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(command_spec, min_size=5, max_size=40), cuts=st.lists(st.integers(1, 8), min_size=1, max_size=10))
def test_random_operations_in_random_batches_keep_every_invariant(specs, cuts):
    world, accounts = build_world()
    first_transfer_results: dict[str, TransferResult] = {}
    position, cut_index = 0, 0
    while position < len(specs):
        cut = cuts[cut_index % len(cuts)]
        cut_index += 1
        chunk, position = specs[position:position + cut], position + cut
        commands = []
        for spec in chunk:
            if spec[0] == "tick":
                world.later(hours=spec[1])
            else:
                commands.append(to_command(spec, accounts, world.now))
        before, balances_before = copy.deepcopy(world.store), dict(world.balances)
        outcomes = world.run(*commands)
        check_invariants(world, accounts)

        # A refused command changed nothing: the batch without it gives the same answers and state.
        refused = [isinstance(o, LedgerError) for o in outcomes]
        if any(refused):
            twin = World(store=before, balances=balances_before, now=world.now)
            kept = [cmd for cmd, no in zip(commands, refused, strict=True) if not no]
            assert twin.run(*kept) == [o for o, no in zip(outcomes, refused, strict=True) if not no]
            assert account_states(twin, accounts) == account_states(world, accounts)

        # A transfer id answers with the first result, however often it is repeated.
        for command, outcome in zip(commands, outcomes, strict=True):
            if isinstance(command, c.PostTransfer) and not isinstance(outcome, LedgerError):
                first = first_transfer_results.setdefault(command.transfer_id, dataclasses.replace(outcome, replayed=False))
                assert dataclasses.replace(outcome, replayed=False) == first

        # Replaying every accepted request of the batch changes nothing at all.
        replay = [cmd for cmd, no in zip(commands, refused, strict=True) if not no and isinstance(cmd, IDEMPOTENT)]
        if replay:
            states, events_before = account_states(world, accounts), len(world.saved_events)
            again = world.run(*replay)
            assert all(not isinstance(o, LedgerError) and o.replayed for o in again), again
            assert len(world.saved_events) == events_before
            assert account_states(world, accounts) == states
