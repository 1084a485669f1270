"""Property: any sequence of transfers, holds, captures, voids and expiries, split into
any batches, keeps the ledger's invariants."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.domain import commands as c
from ledger.domain.account import Account
from ledger.domain.errors import LedgerError
from ledger.domain.hold import Hold, HoldState
from services.ledger.tests.unit.ledger_world import T0, World

ACCOUNT_SLOTS = 5  # 0: settlement (internal), 1: fee income (internal), 2..4 customers


def build_world() -> tuple[World, list[UUID]]:
    world = World()
    accounts = [world.open("settlement"), world.open("fee_income"), world.open(limit=0),
                world.open(limit=300), world.open(owner="bob", limit=0)]
    return world, accounts


slot = st.integers(0, ACCOUNT_SLOTS - 1)
amount = st.integers(1, 700)
request_id = st.integers(0, 7)  # small, so that ids repeat: idempotency is exercised
command_spec = st.one_of(
    st.tuples(st.just("transfer"), request_id, slot, slot, amount, st.booleans()),
    st.tuples(st.just("hold"), request_id, slot, slot, amount, st.integers(1, 5)),
    st.tuples(st.just("capture"), request_id, request_id, amount),
    st.tuples(st.just("void"), request_id),
    st.tuples(st.just("expire"), request_id),
    st.tuples(st.just("freeze"), slot, st.booleans()),
    st.tuples(st.just("tick"), st.integers(1, 3)),
)


def to_command(spec, accounts):
    kind = spec[0]
    if kind == "transfer":
        _, rid, a, b, value, with_fee = spec
        legs = [c.Leg(accounts[a], -value, "RUB"), c.Leg(accounts[b], value, "RUB")]
        if with_fee and 1 not in (a, b):
            legs = [c.Leg(accounts[a], -value - 10, "RUB"), c.Leg(accounts[b], value, "RUB"), c.Leg(accounts[1], 10, "RUB")]
        return c.PostTransfer(f"t{rid}", tuple(legs), "p2p")
    if kind == "hold":
        _, rid, a, b, value, hours = spec
        return c.PlaceHold(f"h{rid}", accounts[a], accounts[b], value, "RUB", T0 + timedelta(hours=hours), "card_purchase")
    if kind == "capture":
        _, rid, cap, value = spec
        return c.CaptureHold(f"h{rid}", f"cap{cap}", value)
    if kind == "void":
        return c.VoidHold(f"h{spec[1]}")
    if kind == "expire":
        return c.ExpireHold(f"h{spec[1]}")
    if kind == "freeze":
        return (c.FreezeAccount if spec[2] else c.UnfreezeAccount)(accounts[spec[1]])
    return None  # tick


def check_invariants(world: World, accounts: list[UUID]) -> None:
    rows = [world.account(a) for a in accounts]
    assert sum(a.posted_minor for a in rows) == 0, "trial balance is not zero"
    for account in rows:
        if not account.is_internal:
            assert account.posted_minor - account.held_minor >= -account.credit_limit_minor, "forbidden negative balance"
        entries = [e for ev in world.saved_events if ev.originator_id == account.id and type(ev).__qualname__ == "Account.Posted"
                   for e in ev.entries]
        assert account.posted_minor == sum(e["amount_minor"] for e in entries), "balance differs from its legs"
        live_holds = [h for h in world.store.values() if isinstance(h, Hold) and h.state == HoldState.ACTIVE
                      and h.debit_account_id == str(account.id)]
        assert account.held_minor == sum(h.remaining_minor for h in live_holds), "held differs from live holds"
    # Rebuilding every aggregate from its saved events gives the same state.
    for aggregate_id, aggregate in world.store.items():
        rebuilt = None
        for event in (e for e in world.saved_events if e.originator_id == aggregate_id):
            rebuilt = event.mutate(rebuilt)
        if isinstance(aggregate, Account):
            assert (rebuilt.posted_minor, rebuilt.held_minor, rebuilt.state) == (
                aggregate.posted_minor, aggregate.held_minor, aggregate.state)
        assert rebuilt.version == aggregate.version


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(command_spec, min_size=1, max_size=40), cuts=st.lists(st.integers(1, 8), min_size=1, max_size=40))
def test_random_operations_in_random_batches_keep_every_invariant(specs, cuts):
    world, accounts = build_world()
    world.run(c.PostTransfer("seed", (c.Leg(accounts[0], -3_000, "RUB"), c.Leg(accounts[2], 1_000, "RUB"),
                                      c.Leg(accounts[3], 1_000, "RUB"), c.Leg(accounts[4], 1_000, "RUB")), "top_up"))
    first_results: dict[tuple, object] = {}
    position = 0
    for cut in cuts * (len(specs) // max(1, len(cuts)) + 1):
        if position >= len(specs):
            break
        chunk = specs[position:position + cut]
        position += cut
        commands = []
        for spec in chunk:
            if spec[0] == "tick":
                world.later(hours=spec[1])
            else:
                commands.append(to_command(spec, accounts))
        events_before = len(world.saved_events)
        outcomes = world.run(*commands)
        for command, outcome in zip(commands, outcomes, strict=True):
            if isinstance(command, c.PostTransfer) and not isinstance(outcome, LedgerError):
                key = ("transfer", command.transfer_id)
                if key in first_results and outcome.replayed:
                    assert first_results[key] == c.fingerprint(command)
                first_results.setdefault(key, c.fingerprint(command))
        check_invariants(world, accounts)
        # Replaying the whole chunk again changes no balance.
        balances = [world.account(a).posted_minor for a in accounts]
        replay = [cmd for cmd, out in zip(commands, outcomes, strict=True)
                  if isinstance(cmd, c.PostTransfer) and not isinstance(out, LedgerError)]
        if replay:
            world.run(*replay)
            assert [world.account(a).posted_minor for a in accounts] == balances
        assert len(world.saved_events) >= events_before
