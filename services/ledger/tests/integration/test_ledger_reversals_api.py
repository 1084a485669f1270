"""Reversals (storno) through the ledger's API: the bank's staff move a posted transfer's money
back; the original stays in the history, its reversal stands beside it, and verify agrees."""

from __future__ import annotations

import uuid

import pytest

from services.ledger.tests.integration.ledger_support import failed_checks, open_account, transfer_body
from tests.support.tokens import bearer

pytestmark = pytest.mark.integration


async def paid(ledger) -> tuple[str, str, str]:
    """Alice paid Bob 300 by mistake (transfer `mistake-…`); returns her card, his card and that id."""
    settlement = await open_account(ledger, "settlement")
    alice, bob = await open_account(ledger), await open_account(ledger, owner="bob")
    tag = uuid.uuid4().hex[:8]
    for body in (transfer_body(f"fund-{tag}", (settlement, -1_000), (alice, 1_000), code="top_up"),
                 {**transfer_body(f"mistake-{tag}", (alice, -300), (bob, 300)), "metadata": {"message": "rent"}}):
        response = await ledger.post("/transfers", json=body)
        assert response.status_code == 201, response.text
    return alice, bob, f"mistake-{tag}"


async def test_staff_reverse_a_payment_made_in_error_and_both_stand_in_the_history(ledger):
    alice, bob, mistake = await paid(ledger)
    reversed_ = await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "posted_in_error"})
    assert reversed_.status_code == 201, reversed_.text
    assert (reversed_.json()["transfer_id"], reversed_.json()["code"]) == (f"{mistake}:reversal", "reversal")
    for account, expected in ((alice, 1_000), (bob, 0)):
        assert (await ledger.get(f"/accounts/{account}/balance")).json()["posted"]["amount_minor"] == expected
    lines = (await ledger.get(f"/accounts/{bob}/history")).json()["lines"]
    assert [(line["transfer_id"], line["amount_minor"], line["metadata"]) for line in lines] == [
        (f"{mistake}:reversal", -300, {"message": "rent"}), (mistake, 300, {"message": "rent"})]
    original = (await ledger.get(f"/transfers/{mistake}")).json()
    reversal = (await ledger.get(f"/transfers/{mistake}:reversal")).json()
    assert (original["reversed_by"], original["reverses"]) == (f"{mistake}:reversal", None)
    assert (reversal["reverses"], reversal["reversal_reason"], reversal["reversed_by"]) == (
        mistake, "posted_in_error", None)
    assert await failed_checks(ledger) == {}


async def test_the_history_and_statement_show_a_reversed_line_and_its_reversal_linked_both_ways(ledger):
    # Alice's app shows the payment as corrected and the correction as the payment's, on
    # every page that shows either of them (a history page, a statement).
    alice, bob, mistake = await paid(ledger)
    assert (await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "posted_in_error"})).status_code == 201
    statement = (await ledger.get(f"/accounts/{alice}/statement", params={
        "since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"})).json()
    history = (await ledger.get(f"/accounts/{alice}/history")).json()
    by_code = (await ledger.get(f"/accounts/{alice}/history", params={"code": "reversal"})).json()
    links = {(line["transfer_id"], line["amount_minor"], line["reverses"], line["reversed_by"])
             for line in history["lines"] + statement["lines"] + by_code["lines"]}
    assert links == {(f"fund-{mistake.removeprefix('mistake-')}", 1_000, None, None),
                     (mistake, -300, None, f"{mistake}:reversal"), (f"{mistake}:reversal", 300, mistake, None)}
    assert [line["transfer_id"] for line in by_code["lines"]] == [f"{mistake}:reversal"]


async def test_asked_twice_a_reversal_answers_as_the_first_time_and_moves_nothing_again(ledger):
    alice, bob, mistake = await paid(ledger)
    first = await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "duplicate"})
    again = await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "duplicate"})
    assert (first.status_code, again.status_code) == (201, 201) and again.json()["replayed"] is True
    other = await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "fraud_confirmed"})
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_conflict")
    assert (await ledger.get(f"/accounts/{alice}/balance")).json()["posted"]["amount_minor"] == 1_000


async def test_a_reversal_keeps_the_case_that_decided_it_for_staff_and_auditors_not_for_customers(ledger):
    alice, bob, mistake = await paid(ledger)
    case = {"reason": "dispute_upheld", "case_ref": "DSP-2026-0042"}
    first = await ledger.post(f"/transfers/{mistake}/reversal", json=case)
    assert first.status_code == 201, first.text
    again = await ledger.post(f"/transfers/{mistake}/reversal", json=case)
    assert (again.status_code, again.json()["replayed"]) == (201, True)
    for other_case in ({**case, "case_ref": "DSP-2026-0043"}, {"reason": "dispute_upheld"}):
        other = await ledger.post(f"/transfers/{mistake}/reversal", json=other_case)
        assert (other.status_code, other.json()["code"]) == (409, "idempotency_conflict"), other_case
    shown = (await ledger.get(f"/transfers/{mistake}:reversal")).json()
    assert (shown["reversal_reason"], shown["reversal_case_ref"]) == ("dispute_upheld", "DSP-2026-0042")
    assert (await ledger.get(f"/transfers/{mistake}")).json()["reversal_case_ref"] is None
    lines = (await ledger.get(f"/accounts/{alice}/history")).json()["lines"]
    assert "DSP-2026-0042" not in str(lines), "a customer's history shows no case file"
    assert await failed_checks(ledger) == {}


async def test_a_reversals_case_is_a_reference_or_nothing(ledger):
    alice, bob, mistake = await paid(ledger)
    for case_ref in ("", "x" * 129, "DSP\x00"):
        refused = await ledger.post(f"/transfers/{mistake}/reversal",
                                    json={"reason": "posted_in_error", "case_ref": case_ref})
        assert refused.status_code == 422, (case_ref, refused.text)
        assert "case_ref" in str(refused.json()), refused.json()
    assert (await ledger.get(f"/accounts/{bob}/balance")).json()["posted"]["amount_minor"] == 300


async def test_a_reversal_is_refused_by_name_when_it_cannot_be_made_and_changes_nothing(ledger):
    alice, bob, mistake = await paid(ledger)
    spent = await ledger.post("/transfers", json=transfer_body(f"spent-{mistake}", (bob, -200), (alice, 200)))
    assert spent.status_code == 201
    refused = await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "posted_in_error"})
    assert (refused.status_code, refused.json()["code"]) == (409, "insufficient_funds")
    assert (await ledger.get(f"/accounts/{bob}/balance")).json()["posted"]["amount_minor"] == 100
    missing = await ledger.post("/transfers/never-posted/reversal", json={"reason": "posted_in_error"})
    assert (missing.status_code, missing.json()["code"]) == (404, "transfer_not_found")
    bad = await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "changed_my_mind"})
    assert bad.status_code == 422 and [error["field"] for error in bad.json()["errors"]] == ["reason"]
    as_alice = await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "posted_in_error"},
                                 headers=bearer(ledger.settings.data_dir, "alice"))
    assert (as_alice.status_code, as_alice.json()["code"]) == (403, "forbidden"), "a customer reverses nothing"
    # Once Bob has the money again, the bank asks again and the reversal is made.
    assert (await ledger.post("/transfers", json=transfer_body(f"back-{mistake}", (alice, -200), (bob, 200)))
            ).status_code == 201
    assert (await ledger.post(f"/transfers/{mistake}/reversal", json={"reason": "posted_in_error"})).status_code == 201
    assert await failed_checks(ledger) == {}


async def test_a_cleared_card_purchase_with_the_longest_ids_is_reversed_and_read_by_its_ids(ledger):
    # A capture's transfer id is its hold's id, ":capture:" and its capture id: up to 265 characters.
    alice, shop, _ = await paid(ledger)
    hold_id, capture_id = "h" * 120 + uuid.uuid4().hex[:8], "c" * 128
    placed = await ledger.post("/holds", json={
        "hold_id": hold_id, "debit_account_id": alice, "credit_account_id": shop, "amount_minor": 50,
        "currency": "RUB", "expires_at": "2099-01-01T00:00:00Z", "code": "card_purchase"})
    assert placed.status_code == 201, placed.text
    captured = await ledger.post(f"/holds/{hold_id}/captures", json={"capture_id": capture_id, "amount_minor": 50})
    cleared = captured.json()["transfer_id"]
    assert len(cleared) == 265
    reversed_ = await ledger.post(f"/transfers/{cleared}/reversal", json={"reason": "dispute_upheld"})
    assert reversed_.status_code == 201, reversed_.text
    assert (await ledger.get(f"/transfers/{cleared}")).json()["reversed_by"] == f"{cleared}:reversal"
    assert (await ledger.get(f"/transfers/{cleared}:reversal")).json()["reverses"] == cleared
    too_long = await ledger.get(f"/transfers/{cleared}:reversal:x")
    assert too_long.status_code == 422
