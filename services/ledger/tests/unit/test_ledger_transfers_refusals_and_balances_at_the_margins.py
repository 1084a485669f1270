"""Rules of transfers, refusals, answers, balances and the ledger's clock at their margins:
whom a transfer concerns (payers first, each once, never the bank), a transfer's id the
same in every release, a reversal carrying its transfer's references as given, every kept
refusal answered again as itself (and one this release does not know as a plain 409), a
refused payment's id reused with another body a conflict, answers that tell a first time
from a repeat and give their times in ISO 8601, balance versions that count their saves,
and a clock in UTC. Mutation testing (a rule broken on purpose) found no test holding them
(or only a property test that took minutes to find it); each test here fails with its rule
broken."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from ledger.clock import system_clock
from ledger.domain import commands as c
from ledger.domain.errors import IdempotencyConflict, InsufficientFunds, LedgerError, refusal_for
from ledger.domain.refusal import Refusal
from ledger.domain.transfer import Transfer, customers_of
from services.ledger.tests.unit.ledger_world import T0, funded, transfer

DAY = timedelta(days=1)


def leg(amount_minor: int) -> dict:
    return {"account_id": str(uuid4()), "amount_minor": amount_minor, "currency": "RUB"}


def test_a_transfer_concerns_each_of_its_customers_once_payers_first_and_never_the_bank():
    # Alice moves 100 from her card to her savings, 3 of it a fee to the bank: she alone is
    # told, once; a second entry would be a second "you paid" to her, or a stranger's.
    assert customers_of([leg(-103), leg(100), leg(3)], ["alice", "alice", None]) == ["alice"]
    # A split bill: Bob and Alice pay, the restaurant is paid; listed payers first, in leg order.
    legs = [leg(500), leg(-300), leg(-300), leg(100)]
    assert customers_of(legs, ["restaurant", "bob", "alice", None]) == ["bob", "alice", "restaurant"]


def test_a_transfers_id_is_derived_from_its_client_id_alike_in_every_release():
    # The id is how a retry finds the transfer it repeats: derived otherwise after an upgrade,
    # a payment retried across it would be posted twice.
    assert Transfer.id_for("pay-2026-000001") == UUID("7cb19185-aa14-5ffe-8dfe-4c3eddeee1b8")


def test_a_reversal_carries_the_customer_references_of_its_transfer_as_given(world):
    # customer_ids is the client's free-form reference, kept in its order: the reversal's
    # line in history names the same references as the payment it undoes.
    _, alice = funded(world, 1_000)
    bob = world.open(owner="bob")
    given = ("zoe-ref", "alice-ref", "bob-ref")
    world.one(c.PostTransfer("p2p-1", (c.Leg(alice, -300, "RUB"), c.Leg(bob, 300, "RUB")), "p2p", customer_ids=given))
    world.one(c.ReverseTransfer("p2p-1", "posted_in_error"))
    posted = [e for e in world.saved_events if type(e).__qualname__ == "Transfer.Posted"]
    assert [(e.client_transfer_id, tuple(e.customer_ids)) for e in posted[-2:]] == [
        ("p2p-1", given), ("p2p-1:reversal", given)]


# Every refusal of the ledger, its code and HTTP status: the public contract (errors.py; also
# read by test_ledger_more_rules).
REFUSALS = {
    "ledger_error": ("LedgerError", 409), "account_not_found": ("AccountNotFound", 404),
    "insufficient_funds": ("InsufficientFunds", 409), "account_frozen": ("AccountFrozen", 409),
    "account_closed": ("AccountClosed", 409), "account_not_empty": ("AccountNotEmpty", 409),
    "currency_mismatch": ("LegCurrencyMismatch", 422), "unbalanced_transfer": ("UnbalancedTransfer", 422),
    "invalid_transfer": ("InvalidTransfer", 422), "invalid_hold": ("InvalidHold", 422),
    "invalid_account": ("InvalidAccount", 422), "idempotency_conflict": ("IdempotencyConflict", 409),
    "transfer_not_found": ("TransferNotFound", 404), "hold_not_found": ("HoldNotFound", 404),
    "hold_not_active": ("HoldNotActive", 409), "capture_exceeds_hold": ("CaptureExceedsHold", 409),
}


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_a_kept_refusal_is_answered_again_as_itself_with_its_code_status_and_first_message(code):
    # A repeat of a refused payment gets its first answer: the same kind, code, status and
    # words, whatever the ledger's state has become since.
    name, status = REFUSALS[code]
    kept = Refusal(refused_id=uuid4(), client_id="pay-1", request_fingerprint="f", code=code,
                   detail=f"first answer to pay-1 ({code})", timestamp=T0)
    again = kept.error()
    assert (type(again).__name__, again.code, again.status, str(again)) == (
        name, code, status, f"first answer to pay-1 ({code})")


def test_a_refusal_kept_under_a_code_this_release_does_not_know_is_a_plain_409_with_its_first_message():
    # Kept by a later release, then rolled back: the repeat is still refused with its words,
    # not told it was short of funds, and not a 5xx (which would release the caller's key).
    again = refusal_for("a_code_of_a_later_release", "refused by a later release")
    assert (type(again), again.code, again.status, str(again)) == (
        LedgerError, "ledger_error", 409, "refused by a later release")


def test_a_refused_payments_id_reused_with_another_body_is_a_conflict_not_its_refusal(world):
    # Refused for want of funds, "rent" cannot become a smaller payment under the same id:
    # the caller learns the id is taken, and nothing is posted.
    settlement, card = funded(world, 100)
    with pytest.raises(InsufficientFunds):
        world.one(transfer("rent", (card, -300), (settlement, 300)))
    with pytest.raises(IdempotencyConflict):
        world.one(transfer("rent", (card, -50), (settlement, 50)))
    assert world.last_saved == [] and world.balance(card).posted_minor == 100
    with pytest.raises(InsufficientFunds):
        world.one(transfer("rent", (card, -300), (settlement, 300)))


def test_opening_an_account_answers_a_first_time_and_its_repeat_as_a_replay(world):
    account_id = uuid4()
    opening = c.OpenAccount(account_id, "alice", "card", "RUB", 0)
    assert world.one(opening).replayed is False
    assert world.one(opening).replayed is True and world.last_saved == []


def test_answers_give_their_times_in_iso_8601_as_events_and_statements_do(world):
    settlement, card = funded(world, 1_000)
    paid = world.one(transfer("pay-1", (card, -100), (settlement, 100))).to_dict()
    held = world.one(c.PlaceHold("auth", card, settlement, 100, "RUB", T0 + DAY, "card_purchase")).to_dict()
    assert (paid["posted_at"], held["expires_at"]) == ("2026-11-25T09:00:00+00:00", "2026-11-26T09:00:00+00:00")
    assert json.loads(json.dumps(paid))["legs"] == paid["legs"]


def test_an_accounts_balance_is_first_saved_at_version_1_and_moves_one_version_per_save(world):
    # The version counts the balance row's saves (0: never saved): a second writer holding
    # an older one is refused, and an auditor reads it as that count.
    settlement = world.open("settlement")
    card = world.open()
    assert (world.balance(settlement).version, world.balance(card).version) == (1, 1)
    world.one(transfer("fund", (settlement, -500), (card, 500), code="top_up"))
    assert (world.balance(settlement).version, world.balance(card).version) == (2, 2)


def test_the_ledgers_clock_tells_utc():
    # Posting times, deadlines and answers read "+00:00": a clock in local time would date
    # a payment in one zone and its statement in another.
    before = datetime.now(UTC)
    now = system_clock()
    assert now.utcoffset() == timedelta(0) and now.tzname() == "UTC"
    assert before <= now <= datetime.now(UTC)
