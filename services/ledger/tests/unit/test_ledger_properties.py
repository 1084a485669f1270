"""Property: the whole command space (several legs in several currencies, fees, holds to and
from internal accounts, partial and repeated captures, voids after captures, expiry at and
around the deadline, freezes, closes, limits raised and lowered, and retries of every
command with its own and with another body, also after the state changed) keeps every
rule of the bank, in any batches.

Each command is also judged by a model of the rules written here, apart from batch.py:
a command is accepted exactly when no rule forbids it, given the ledger as it stands.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.domain import commands as c
from ledger.domain.account import CREDIT_LIMIT_MINOR_MAX, Account, AccountState
from ledger.domain.batch import capture_transfer_id, reversal_transfer_id
from ledger.domain.errors import IdempotencyConflict, LedgerError
from ledger.domain.hold import CAPTURES_PER_HOLD_MAX, Hold, HoldState
from ledger.domain.refusal import Refusal
from ledger.domain.transfer import Transfer
from services.ledger.tests.unit.ledger_world import World

# slot: (kind, owner, currency, credit limit)
SLOTS = [
    ("settlement", "bank", "RUB", 0), ("fee_income", "bank", "RUB", 0), ("card", "alice", "RUB", 0),
    ("card", "alice", "RUB", 300), ("savings", "bob", "RUB", 0), ("settlement", "bank", "USD", 0),
    ("card", "bob", "USD", 50), ("suspense", "bank", "RUB", 0), ("card", "carol", "USD", 0),
    ("rewards", "dave", "RUB", 0),  # empty: it may close, and only once nothing is to be paid into it
]
BY_CURRENCY = {"RUB": [0, 1, 2, 3, 4, 7, 9], "USD": [5, 6, 8]}
EMPTY = 9
STEP = timedelta(minutes=30)  # holds expire and time moves in these steps, so deadlines are met exactly


def build_world() -> tuple[World, list[UUID]]:
    world = World()
    accounts = [world.open(kind, owner=owner, currency=currency, limit=limit) for kind, owner, currency, limit in SLOTS]
    world.run(
        c.PostTransfer("seed-rub", (c.Leg(accounts[0], -3_000, "RUB"), c.Leg(accounts[2], 1_000, "RUB"),
                                    c.Leg(accounts[3], 1_000, "RUB"), c.Leg(accounts[4], 1_000, "RUB")), "top_up"),
        c.PostTransfer("seed-usd", (c.Leg(accounts[5], -200, "USD"), c.Leg(accounts[6], 100, "USD"),
                                    c.Leg(accounts[8], 100, "USD")), "top_up"),
    )
    return world, accounts


amount = st.integers(1, 700)
request_id = st.integers(0, 15)  # ids repeat now and then; retries repeat them on purpose
hold_id = st.integers(0, 11)
move = st.tuples(st.sampled_from(["RUB", "RUB", "USD"]), st.integers(0, 6), st.integers(0, 6), amount)
hold_spec = st.tuples(  # mostly in the debit account's currency, and expiring later
    st.just("hold"), hold_id, st.integers(0, 9), st.sampled_from([1, 2, 3, 4, 5, 1, 2, 0, EMPTY, EMPTY]), amount,
    st.sampled_from([2, 1, 3, 4, 6, 2, 1, 0, -1]), st.sampled_from([True] * 5 + [False]))
# Captures, voids and expiries name one of the last holds placed or sent in their batch (by
# position from the end), so that most find their hold; a capture takes a new capture id,
# as one refused (its hold not there yet, or ended) keeps that refusal for good.
recent_hold = st.integers(1, 3)
capture_spec = st.tuples(st.just("capture"), recent_hold, st.integers(1, 400))
command_spec = st.one_of(
    # merged: the moves' legs summed per account (as a client would), else sent leg by leg
    st.tuples(st.just("transfer"), request_id, st.lists(move, min_size=1, max_size=3), st.booleans()),
    st.tuples(st.just("transfer"), request_id, st.lists(move, min_size=1, max_size=3), st.just(True)),
    hold_spec, hold_spec, hold_spec,
    capture_spec, capture_spec, capture_spec,
    st.tuples(st.just("capture_any"), hold_id, st.integers(0, 9), st.integers(1, 400)),
    st.tuples(st.just("void"), recent_hold),
    st.tuples(st.just("void"), recent_hold),
    st.tuples(st.just("expire"), recent_hold),
    st.tuples(st.just("expire"), recent_hold),
    st.tuples(st.just("freeze"), st.integers(0, 9), st.booleans(), st.sampled_from(["customer_request", "court_order"])),
    st.tuples(st.just("close"), st.integers(0, 9)),
    st.tuples(st.just("close"), st.just(EMPTY)),
    st.tuples(st.just("limit"), st.integers(0, 9), st.integers(0, 500)),
    st.tuples(st.just("reverse"), request_id, st.sampled_from(sorted(c.REVERSAL_REASONS))),  # a transfer, by its id
    st.tuples(st.just("tick"), st.integers(0, 4)),  # 0: one microsecond, to land just past a deadline
    st.tuples(st.just("tick"), st.integers(0, 4)),
    # a retry of an earlier command (by its position from the end), with its own body or another
    st.tuples(st.just("retry"), st.integers(1, 12), st.booleans()),
    st.tuples(st.just("retry"), st.integers(1, 12), st.booleans()),
)


def transfer_of(rid: int, moves: list[tuple], merged: bool, accounts: list[UUID]) -> c.PostTransfer:
    legs: list[tuple[int, int, str]] = []
    for currency, payer, payee, value in moves:
        group = BY_CURRENCY[currency]
        legs += [(group[payer % len(group)], -value, currency), (group[payee % len(group)], value, currency)]
    if merged:
        net: dict[tuple[int, str], int] = {}
        for slot, value, currency in legs:
            net[slot, currency] = net.get((slot, currency), 0) + value
        legs = [(slot, value, currency) for (slot, currency), value in net.items() if value]
    return c.PostTransfer(f"t{rid}", tuple(c.Leg(accounts[s], v, cur) for s, v, cur in legs), "p2p")


def other_body(command: Any) -> Any:
    if isinstance(command, c.PostTransfer):
        return c.PostTransfer(command.transfer_id, command.legs, command.code, metadata={"retry": "other"})
    if isinstance(command, c.PlaceHold):
        return c.PlaceHold(command.hold_id, command.debit_account_id, command.credit_account_id,
                           command.amount_minor + 1, command.currency, command.expires_at, command.code)
    if isinstance(command, c.CaptureHold):
        return c.CaptureHold(command.hold_id, command.capture_id, command.amount_minor + 1)
    if isinstance(command, c.ReverseTransfer):
        return c.ReverseTransfer(command.transfer_id, "duplicate" if command.reason != "duplicate" else "fraud_confirmed")
    return command  # account and release commands carry no body besides their target


def to_command(spec: tuple, accounts: list[UUID], now, sent: list[Any], holds: list[str]) -> Any:
    kind = spec[0]
    if kind == "transfer":
        return transfer_of(spec[1], spec[2], spec[3], accounts)
    if kind == "hold":
        _, rid, debit, credit, value, steps, own_currency = spec
        currency = SLOTS[debit][2] if own_currency else ("USD" if SLOTS[debit][2] == "RUB" else "RUB")
        group = BY_CURRENCY[currency]
        # the payee in the hold's currency (the debit may not be), `credit` places on from the debit
        start = group.index(debit) if debit in group else 0
        credit = EMPTY if credit == EMPTY and currency == SLOTS[EMPTY][2] else group[(start + credit) % len(group)]
        return c.PlaceHold(f"h{rid}", accounts[debit], accounts[credit], value, currency, now + steps * STEP,
                           "card_purchase")
    if kind == "capture_any":
        return c.CaptureHold(f"h{spec[1]}", f"cap{spec[2]}", spec[3])
    if kind in ("capture", "void", "expire"):
        if not holds:
            return None
        target = holds[-min(spec[1], len(holds))]
        if kind == "capture":  # a new capture id (retries repeat one), one per command sent at most
            return c.CaptureHold(target, f"cap{len(sent) + 10}", spec[2])
        return (c.VoidHold if kind == "void" else c.ExpireHold)(target)
    if kind == "freeze":
        return (c.FreezeAccount if spec[2] else c.UnfreezeAccount)(accounts[spec[1]], spec[3])  # freezes stack
    if kind == "close":
        return c.CloseAccount(accounts[spec[1]], "customer_request")
    if kind == "limit":
        return c.SetCreditLimit(accounts[spec[1]], spec[2])
    if kind == "reverse":
        return c.ReverseTransfer(f"t{spec[1]}", spec[2])
    if kind == "retry":
        if not sent:
            return None
        earlier = sent[-min(spec[1], len(sent))]
        return other_body(earlier) if spec[2] else earlier
    return None


# ---- the model: which rules forbid a command, judged apart from batch.py ------------------

def key_of(command: Any) -> UUID | None:
    """The id under which a command's first answer is kept."""
    if isinstance(command, c.PostTransfer):
        return Transfer.id_for(command.transfer_id)
    if isinstance(command, c.PlaceHold):
        return Hold.id_for(command.hold_id)
    if isinstance(command, c.CaptureHold):
        return Transfer.id_for(capture_transfer_id(command.hold_id, command.capture_id))
    if isinstance(command, c.ReverseTransfer):  # kept only once posted: a refusal is not
        return Transfer.id_for(reversal_transfer_id(command.transfer_id))
    return None


def malformed(command: Any) -> bool:
    check = {c.PostTransfer: c.check_transfer_shape, c.PlaceHold: c.check_hold_shape,
             c.CaptureHold: c.check_capture_shape, c.ReverseTransfer: c.check_reversal_shape}.get(type(command))
    if check is None:
        return False
    try:
        check(command)
    except LedgerError:
        return True
    return False


def money(world: World, account: Account) -> tuple[int, int, int]:
    balance = world.balance(account.id)
    return balance.posted_minor, balance.held_minor, balance.incoming_held_minor


def forbidden(world: World, command: Any) -> set[str]:
    """The refusal codes the bank's rules give `command` against the world as it stands
    (empty: it is accepted, or answered as a replay). Shape and replays are settled
    before this is asked."""
    accounts = {a.id: a for a in world.store.values() if isinstance(a, Account)}
    reasons: set[str] = set()

    def spendable(account: Account, amount_minor: int, what_debits: bool = True) -> None:
        if account.state == AccountState.FROZEN and what_debits:
            reasons.add("account_frozen")
        posted, held, _ = money(world, account)
        if not account.is_internal and posted - held + account.credit_limit_minor < amount_minor:
            reasons.add("insufficient_funds")

    if isinstance(command, c.PostTransfer):
        for leg in command.legs:
            account = accounts[leg.account_id]
            if account.state == AccountState.CLOSED:
                reasons.add("account_closed")
            if account.currency != leg.currency:
                reasons.add("currency_mismatch")
            if leg.amount_minor < 0:
                spendable(account, -leg.amount_minor)
    elif isinstance(command, c.PlaceHold):
        debit, credit = accounts[command.debit_account_id], accounts[command.credit_account_id]
        for account in (debit, credit):
            if account.state == AccountState.CLOSED:
                reasons.add("account_closed")
            if account.currency != command.currency:
                reasons.add("currency_mismatch")
        if command.expires_at <= world.now:
            reasons.add("invalid_hold")
        spendable(debit, command.amount_minor)
    elif isinstance(command, c.CaptureHold):
        hold = world.store.get(Hold.id_for(command.hold_id))
        if not isinstance(hold, Hold):
            return {"hold_not_found"}
        if hold.state != HoldState.ACTIVE or world.now >= hold.expires_at:
            reasons.add("hold_not_active")
        elif command.amount_minor > hold.remaining_minor or len(hold.captures) >= CAPTURES_PER_HOLD_MAX:
            reasons.add("capture_exceeds_hold")
        if accounts[UUID(hold.credit_account_id)].state == AccountState.CLOSED:
            reasons.add("account_closed")
    elif isinstance(command, c.ReverseTransfer):
        original = world.store.get(Transfer.id_for(command.transfer_id))
        if not isinstance(original, Transfer):
            return {"transfer_not_found"}
        for leg in original.legs:  # each moved back: the payee pays, under a transfer's rules
            account = accounts[UUID(leg["account_id"])]
            if account.state == AccountState.CLOSED:
                reasons.add("account_closed")
            if leg["amount_minor"] > 0:
                spendable(account, leg["amount_minor"])
    elif isinstance(command, (c.VoidHold, c.ExpireHold)):
        hold = world.store.get(Hold.id_for(command.hold_id))
        if not isinstance(hold, Hold):
            return {"hold_not_found"}
        if isinstance(command, c.VoidHold) and hold.state not in (HoldState.ACTIVE, HoldState.VOIDED, HoldState.EXPIRED):
            reasons.add("hold_not_active")
    else:
        account = accounts[command.account_id]
        if account.state == AccountState.CLOSED:
            if not isinstance(command, c.CloseAccount):
                reasons.add("account_closed")
        elif isinstance(command, c.CloseAccount):
            if money(world, account) != (0, 0, 0):
                reasons.add("account_not_empty")
            if set(account.freeze_reasons) - {"customer_request"}:
                reasons.add("account_frozen")
        elif isinstance(command, c.SetCreditLimit):
            posted, held, _ = money(world, account)
            if account.is_internal or not 0 <= command.credit_limit_minor <= CREDIT_LIMIT_MINOR_MAX:
                reasons.add("invalid_account")
            elif posted - held < -command.credit_limit_minor:
                reasons.add("insufficient_funds")
    return reasons


# ---- what the ledger holds, to compare worlds and moments -------------------------------

def snapshot(world: World, accounts: list[UUID]) -> dict:
    """Everything a command could change, money by account and every hold, transfer and kept refusal."""
    state: dict[Any, Any] = {}
    for account_id in accounts:
        account = world.account(account_id)
        state[account_id] = (account.state, account.freeze_reasons, account.credit_limit_minor, account.version,
                             money(world, account))
    for key, aggregate in world.store.items():
        if isinstance(aggregate, Hold):
            state[key] = (aggregate.state, aggregate.captured_minor, aggregate.released_minor, dict(aggregate.captures))
        elif isinstance(aggregate, Transfer):
            state[key] = (aggregate.legs, aggregate.posted_at, aggregate.request_fingerprint)
        elif isinstance(aggregate, Refusal):
            state[key] = (aggregate.code, aggregate.detail, aggregate.request_fingerprint)
    return state


def answer(outcome: Any) -> Any:
    """An outcome as a caller sees it; a replay flag aside."""
    if isinstance(outcome, LedgerError):
        return type(outcome).__name__, outcome.code, str(outcome)
    return outcome.__class__(**{**outcome.__dict__, "replayed": False})


def check_invariants(world: World, accounts: list[UUID]) -> None:
    rows = [world.account(a) for a in accounts]
    currency_of = {str(a.id): a.currency for a in rows}
    holds = [h for h in world.store.values() if isinstance(h, Hold)]
    legs = []
    for event in world.saved_events:
        if type(event).__qualname__ == "Transfer.Posted":
            for currency in {leg["currency"] for leg in event.legs}:
                assert sum(leg["amount_minor"] for leg in event.legs if leg["currency"] == currency) == 0, (
                    "a transfer's legs do not sum to zero in its currency")
            assert all(currency_of[leg["account_id"]] == leg["currency"] for leg in event.legs), (
                "a leg in another currency than its account's")
            legs += event.legs
    for currency in BY_CURRENCY:
        in_currency = [a for a in rows if a.currency == currency]
        assert sum(money(world, a)[0] for a in in_currency) == 0, f"trial balance in {currency} is not zero"
        assert sum(money(world, a)[1] for a in in_currency) == sum(money(world, a)[2] for a in in_currency), (
            f"what is held in {currency} is not what is to be paid in")
    for account in rows:
        posted, held, incoming = money(world, account)
        if not account.is_internal:
            assert posted - held >= -account.credit_limit_minor, "a customer account below minus its credit limit"
        assert posted == sum(leg["amount_minor"] for leg in legs if leg["account_id"] == str(account.id)), (
            "balance differs from the sum of its legs")
        assert held == sum(h.remaining_minor for h in holds
                           if h.state == HoldState.ACTIVE and h.debit_account_id == str(account.id))
        assert incoming == sum(h.remaining_minor for h in holds
                               if h.state == HoldState.ACTIVE and h.credit_account_id == str(account.id))
        if account.state != AccountState.CLOSED:
            assert (account.state == AccountState.FROZEN) == bool(account.freeze_reasons), (
                "an account is frozen exactly while a freeze of some reason is not lifted")
        else:
            assert set(account.freeze_reasons) <= {"customer_request"}, "an account closed under a court's freeze"
    for hold in holds:
        assert currency_of[hold.debit_account_id] == currency_of[hold.credit_account_id] == hold.currency
        assert hold.captured_minor == sum(hold.captures.values())
        assert 0 <= hold.remaining_minor <= hold.amount_minor
        assert (hold.remaining_minor == 0) == (hold.state != HoldState.ACTIVE)
    for aggregate in world.last_saved:
        assert world.app.repository.get(aggregate.id) == aggregate, f"{type(aggregate).__name__} rebuilt differently"


def judge_alone(shadow: World, accounts: list[UUID], command: Any, first: dict[UUID, tuple]) -> Any:
    """Run `command` in a batch of its own and hold its outcome to the rules and the model."""
    before = snapshot(shadow, accounts)
    closed_before = {a for a in accounts if shadow.account(a).state == AccountState.CLOSED}
    reasons = forbidden(shadow, command) if not malformed(command) else None
    key = key_of(command)
    outcome = shadow.run(command)[0]
    if key is not None and not malformed(command) and key in first:
        first_fingerprint, first_answer = first[key]
        if c.fingerprint(command) != first_fingerprint:
            assert isinstance(outcome, IdempotencyConflict), ("a retry with another body was not a conflict", outcome)
        else:
            assert answer(outcome) == first_answer, "a retry did not get the first answer"
            assert isinstance(outcome, LedgerError) or outcome.replayed, outcome
        assert snapshot(shadow, accounts) == before, "a retry had a second effect"
        return outcome
    if reasons is not None:
        if reasons:
            assert isinstance(outcome, LedgerError) and outcome.code in reasons, (command, reasons, outcome)
        else:
            assert not isinstance(outcome, LedgerError), (command, outcome)
    if key is not None and key in shadow.store and key not in first:
        first[key] = (c.fingerprint(command), answer(outcome))
    after = snapshot(shadow, accounts)
    if isinstance(outcome, LedgerError):
        # Nothing changed but, for a transfer, hold or capture, its refusal kept under its id.
        assert {k: v for k, v in after.items() if k != key} == {k: v for k, v in before.items() if k != key}, (
            "a refused command changed the ledger")
    for account_id in closed_before:
        assert after[account_id] == before[account_id], "a closed account moved"
    return outcome


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(command_spec, min_size=20, max_size=60), cuts=st.lists(st.integers(1, 8), min_size=1, max_size=10))
def test_every_command_in_any_batch_follows_the_banks_rules_and_batches_change_no_answer(specs, cuts):
    world, accounts = build_world()
    shadow = World(store=copy.deepcopy(world.store), balances=dict(world.balances), now=world.now)
    first: dict[UUID, tuple] = {}
    sent: list[Any] = []
    position, cut_index = 0, 0
    while position < len(specs):
        cut = cuts[cut_index % len(cuts)]
        cut_index += 1
        chunk, position = specs[position:position + cut], position + cut
        commands = []
        for spec in chunk:
            if spec[0] == "tick":
                step = STEP * spec[1] if spec[1] else timedelta(microseconds=1)
                world.now += step
                shadow.now += step
                continue
            holds = [h.client_hold_id for h in world.store.values() if isinstance(h, Hold)]
            holds += [command.hold_id for command in commands if isinstance(command, c.PlaceHold)]
            command = to_command(spec, accounts, world.now, sent, holds)
            if command is not None:
                commands.append(command)
                sent.append(command)
        outcomes = world.run(*commands)
        check_invariants(world, accounts)
        # The same commands one batch each, judged one by one, answer and end alike.
        alone = [judge_alone(shadow, accounts, command, first) for command in commands]
        assert [answer(o) for o in outcomes] == [answer(o) for o in alone]
        assert [getattr(o, "replayed", None) for o in outcomes] == [getattr(o, "replayed", None) for o in alone]
        assert snapshot(world, accounts) == snapshot(shadow, accounts)
