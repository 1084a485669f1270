"""Every change to the books records who asked for it: the subject of the access token
that sent the command (a service, a member of staff), or `ledger` for what the ledger
does by itself. Auditors find it on the events, and the bank's services and staff on a
transfer (`GET /transfers/{id}`); asking again with the same body is the same request,
whoever asks."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from kabinet_contracts.roles import LEDGER_POST, LEDGER_READ
from ledger.domain.commands import REQUESTED_BY_LEDGER
from ledger.domain.hold import Hold
from ledger.domain.transfer import Transfer
from ledger.verify import verify
from services.ledger.tests.integration.ledger_support import forge_history, open_account, run_cli, transfer_body
from tests.support.tokens import bearer

pytestmark = pytest.mark.integration

EXPIRY_WAIT_S = 15.0


def keyed() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def events_of(ledger, aggregate_id: uuid.UUID) -> list:
    """The stored events of one aggregate, as an auditor replays them."""
    app = ledger.parts.app
    return [app.mapper.to_domain_event(stored) for stored in app.recorder.select_events(aggregate_id)]


async def test_every_event_of_an_account_and_a_hold_names_the_service_or_staff_that_asked(ledger):
    staff = bearer(ledger.settings.data_dir, "staff-olga", (LEDGER_POST,))
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    assert (await ledger.put(f"/accounts/{card}/credit-limit", json={"credit_limit_minor": 500},
                             headers={**keyed(), **staff})).status_code == 200
    for action in ("freeze", "unfreeze"):
        assert (await ledger.post(f"/accounts/{card}/{action}", json={"reason": "compliance_review"},
                                  headers={**keyed(), **staff})).status_code == 200
    placed = await ledger.post("/holds", json={
        "hold_id": "auth-1", "debit_account_id": card, "credit_account_id": settlement, "amount_minor": 300,
        "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(), "code": "card_purchase"})
    assert placed.status_code == 201, placed.text
    assert (await ledger.post("/holds/auth-1/captures", json={"capture_id": "c1", "amount_minor": 100})).status_code == 201
    assert (await ledger.post("/holds/auth-1/void", headers=staff)).status_code == 200

    account_events = events_of(ledger, uuid.UUID(card))
    assert [(type(e).__qualname__, e.requested_by) for e in account_events] == [
        ("Account.Opened", "payments"), ("Account.CreditLimitSet", "staff-olga"),
        ("Account.Frozen", "staff-olga"), ("Account.Unfrozen", "staff-olga")]
    hold_events = events_of(ledger, Hold.id_for("auth-1"))
    assert [(type(e).__qualname__, e.requested_by) for e in hold_events] == [
        ("Hold.Placed", "payments"), ("Hold.Captured", "payments"), ("Hold.Voided", "staff-olga")]
    capture = (events_of(ledger, Transfer.id_for("auth-1:capture:c1")))[0]
    assert capture.requested_by == "payments"


async def test_a_transfer_shows_who_posted_it_to_the_banks_services_and_staff_and_verify_checks_it(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    posted = await ledger.post("/transfers", json=transfer_body("salary-1", (settlement, -10_000), (card, 10_000),
                                                                code="top_up"))
    assert posted.status_code == 201, posted.text
    auditor = bearer(ledger.settings.data_dir, "auditor-ivan", (LEDGER_READ,))
    shown = await ledger.get("/transfers/salary-1", headers=auditor)
    assert shown.status_code == 200, shown.text
    assert shown.json()["requested_by"] == "payments" and shown.json()["code"] == "top_up"
    assert [leg["amount_minor"] for leg in shown.json()["legs"]] == [-10_000, 10_000]

    # Posted again by another service with the same body: the same request, still "payments".
    again = await ledger.post("/transfers", headers=bearer(ledger.settings.data_dir, "cards", (LEDGER_POST,)),
                              json=transfer_body("salary-1", (settlement, -10_000), (card, 10_000), code="top_up"))
    assert again.status_code == 201 and again.json()["replayed"] is True
    assert (await ledger.get("/transfers/salary-1", headers=auditor)).json()["requested_by"] == "payments"

    missing = await ledger.get("/transfers/salary-2", headers=auditor)
    assert missing.status_code == 404 and missing.json()["code"] == "transfer_not_found"
    alice = await ledger.get("/transfers/salary-1", headers=bearer(ledger.settings.data_dir, "alice"))
    assert alice.status_code == 403 and "ledger:read" in alice.json()["detail"]
    assert (await verify(ledger.parts.app, ledger.settings)).ok


async def test_a_refusal_kept_for_retries_names_who_asked_too(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    refused = await ledger.post("/transfers", json=transfer_body("too-much", (card, -1), (settlement, 1)))
    assert refused.status_code == 409
    (refusal,) = events_of(ledger, Transfer.id_for("too-much"))
    assert type(refusal).__qualname__ == "Refusal.Recorded" and refusal.requested_by == "payments"


async def test_a_hold_the_ledger_expires_names_the_ledger(ledger):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    await ledger.post("/transfers", json=transfer_body("fund", (settlement, -1_000), (card, 1_000), code="top_up"))
    placed = await ledger.post("/holds", json={
        "hold_id": "auth-2", "debit_account_id": card, "credit_account_id": settlement, "amount_minor": 300,
        "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(seconds=1)).isoformat(), "code": "card_purchase"})
    assert placed.status_code == 201, placed.text
    for _ in range(int(EXPIRY_WAIT_S / 0.2)):
        events = events_of(ledger, Hold.id_for("auth-2"))
        if len(events) == 2:
            break
        await asyncio.sleep(0.2)
    assert [(type(e).__qualname__, e.requested_by) for e in events] == [
        ("Hold.Placed", "payments"), ("Hold.Expired", REQUESTED_BY_LEDGER)]


async def test_an_auditor_reads_the_history_as_stored_a_page_at_a_time_with_who_asked(ledger, monkeypatch):
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    await ledger.post("/transfers", json=transfer_body("salary-1", (settlement, -700), (card, 700), code="top_up"))

    first = await run_cli(ledger, monkeypatch, "events", "--limit", "2")
    assert first.exit_code == 0, first.output
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [(line["type"], line["stream_id"], line["requested_by"]) for line in lines] == [
        ("Account.Opened", settlement, "payments"), ("Account.Opened", card, "payments")]
    assert lines[1]["data"]["owner_id"] == "alice" and lines[0]["version"] == 1

    rest = await run_cli(ledger, monkeypatch, "events", "--after", str(lines[-1]["position"]))
    (transfer,) = [json.loads(line) for line in rest.stdout.splitlines()]
    assert transfer["type"] == "Transfer.Posted" and transfer["position"] > lines[-1]["position"]
    assert transfer["data"]["client_transfer_id"] == "salary-1" and transfer["requested_by"] == "payments"
    assert [leg["amount_minor"] for leg in transfer["data"]["legs"]] == [-700, 700]

    too_many = await run_cli(ledger, monkeypatch, "events", "--limit", "10001")
    assert too_many.exit_code == 2 and "--limit" in too_many.output


async def test_an_export_whose_reader_stops_early_ends_quietly_without_blaming_the_database(ledger, monkeypatch):
    # `kabinet ledger events | head`: the pipe breaks under the export. That is the reader's
    # choice, not a database that cannot be reached (a broken pipe is an OSError too).
    await open_account(ledger)

    def reader_gone(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr("ledger.cli.typer.echo", reader_gone)
    printed = await run_cli(ledger, monkeypatch, "events")
    assert "database" not in printed.output
    assert printed.exit_code == 1 and not isinstance(printed.exception, BrokenPipeError), printed.output


@pytest.mark.parametrize(("column", "forged"), [
    ("state", b"{not json"), ("state", b"[]"), ("state", b'{"legs": []}'),
    ("topic", "ledger.domain.transfer:Transfer.Renamed"),
], ids=["not-json", "not-an-object", "fields-missing", "unknown-type"])
async def test_an_event_stored_in_a_form_the_ledger_cannot_read_is_exported_as_stored_and_the_export_goes_on(
        ledger, monkeypatch, column, forged):
    # Changed by hand, say: the auditor must see it as it is and the events after it, not a
    # traceback with no position to page on from.
    settlement = await open_account(ledger, "settlement")
    card = await open_account(ledger)
    for transfer_id in ("salary-1", "salary-2"):
        await ledger.post("/transfers", json=transfer_body(transfer_id, (settlement, -700), (card, 700), code="top_up"))
    await forge_history(ledger, f"UPDATE {{table}} SET {column} = $2 WHERE originator_id = $1",
                        Transfer.id_for("salary-1"), forged)
    printed = await run_cli(ledger, monkeypatch, "events")
    assert printed.exit_code == 0, (printed.output, printed.exception)
    lines = [json.loads(line) for line in printed.stdout.splitlines()]
    unreadable = next(line for line in lines if line["stream_id"] == str(Transfer.id_for("salary-1")))
    assert "unreadable" in unreadable, unreadable
    if column == "topic":
        assert unreadable["type"] == forged
    else:
        assert unreadable["type"] == "ledger.domain.transfer:Transfer.Posted"
        assert base64.b64decode(unreadable["stored_state_base64"]) == forged
    assert lines[-1]["data"]["client_transfer_id"] == "salary-2", "the export went on past it"
