"""The ledger's history is sealed (ARCHITECTURE.md §6): a hash chain over its events,
checkpointed every few seconds in seals signed with the seal key, which a forger without
that key cannot make agree again. An auditor checks them with its public key.

The forger here has the database's owner's hand (`forge_history` switches the append-only
guards off and on again) and covers his tracks in everything derived from the events
(`cover_up`). The rules verify holds events to cannot see a change that keeps them; the
seals can."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from kabinet_chassis import append_only, history_seals
from kabinet_chassis.ed25519_keys import load_private_key, new_private_pem, public_pem
from kabinet_chassis.eventstore import events_table
from kabinet_chassis.settings import ServiceSettings
from ledger.domain import commands as c
from ledger.domain.transfer import Transfer
from ledger.service import build
from ledger.verify import verify
from services.ledger.tests.integration.ledger_support import cover_up, failed_checks, forge_history, funded_card, run_cli

pytestmark = pytest.mark.integration

SEALED = "history matches its seals"
GUARD_CHECK = "event history is append-only"
SEALING_WAIT_S = 10 * history_seals.SEAL_INTERVAL_S


async def passed_detail(ledger, name: str, settings: ServiceSettings | None = None) -> str:
    report = await verify(ledger.parts.app, settings or ledger.settings)
    assert report.ok, [check for check in report.checks if not check.ok]
    return next(check.detail for check in report.checks if check.name == name)


async def card_spending_twice(ledger):
    """Alice's card funded with 1,000, then 'spend-a' 100 and 'spend-b' 50; settled, verified."""
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    for transfer_id, amount_minor in (("spend-a", 100), ("spend-b", 50)):
        await writer.submit(c.PostTransfer(transfer_id, (c.Leg(card, -amount_minor, "RUB"),
                                                         c.Leg(settlement, amount_minor, "RUB")), "card_purchase"))
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}
    return settlement, card


async def seals(ledger) -> list[asyncpg.Record]:
    return await ledger.parts.pool.fetch(
        f"SELECT seal_no, first_position, last_position, events_count FROM {history_seals.SEALS_TABLE}"
        " WHERE events_table = $1 ORDER BY seal_no", events_table(ledger.parts.app.recorder))


async def test_every_event_is_sealed_within_seconds_and_verify_names_the_last_seal(ledger):
    await card_spending_twice(ledger)
    head = ledger.parts.writer.last_position
    for _ in range(int(SEALING_WAIT_S / 0.1)):  # the service's own sealer, not a test's call
        sealed = await seals(ledger)
        if sealed and sealed[-1]["last_position"] >= head:
            break
        await asyncio.sleep(0.1)
    assert sealed and sealed[-1]["last_position"] >= head, f"not sealed within {SEALING_WAIT_S} s: {sealed}"
    detail = await passed_detail(ledger, SEALED)
    assert f"the last, seal {sealed[-1]['seal_no']}:" in detail and f"at position {sealed[-1]['last_position']}" in detail
    assert "0 newer events not sealed yet" in detail


async def test_a_seal_takes_no_more_bytes_of_events_than_its_limit_and_the_next_seal_goes_on(ledger, monkeypatch):
    # After a backlog, 10,000 events of a transfer's most metadata would be ~700 MB read at
    # once into the writer's process: a seal also ends at SEAL_BYTES_MAX (one event at least).
    monkeypatch.setattr(history_seals, "SEAL_BYTES_MAX", 1)  # every event passes it: one a seal
    await card_spending_twice(ledger)
    table = events_table(ledger.parts.app.recorder)
    await history_seals.seal_new_events(ledger.parts.pool, table, history_seals.seal_key_for(ledger.settings))
    sealed = await seals(ledger)
    count, head = await ledger.parts.pool.fetchrow(f"SELECT count(*), max(notification_id) FROM {table}")
    assert [seal["events_count"] for seal in sealed] == [1] * count, sealed
    assert sealed[-1]["last_position"] == head
    assert await failed_checks(ledger) == {}


async def test_a_ledger_stopped_cleanly_leaves_its_whole_history_sealed(stack, unique_name):
    settings = stack.service_settings(f"ledger_{unique_name}")
    service, parts = build(settings)
    async with service.running():
        await funded_card(parts.writer, 1_000)  # stopped before the first pass is due
        head = parts.writer.last_position
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        assert await connection.fetchval(f"SELECT max(last_position) FROM {history_seals.SEALS_TABLE}") == head
    finally:
        await connection.close()


@pytest.mark.parametrize("seal_key", ["development", "given"])
async def test_a_ledger_sealing_with_the_development_key_says_so_in_its_log(stack, unique_name, caplog, seal_key):
    # A deployment that forgot KABINET_HISTORY_SEAL_KEY seals with a key generated on its own
    # disk, which an auditor's public keys do not check.
    overrides = {"history_seal_key": new_private_pem().decode()} if seal_key == "given" else {}
    service, _ = build(stack.service_settings(f"ledger_{unique_name}", **overrides))
    with caplog.at_level(logging.WARNING, logger="ledger.service"):
        async with service.running():
            pass
    said = [record.getMessage() for record in caplog.records if "DEVELOPMENT seal key" in record.getMessage()]
    assert len(said) == (1 if seal_key == "development" else 0), said
    assert all("KABINET_HISTORY_SEAL_KEY" in line for line in said)


async def test_a_sealer_that_cannot_seal_is_down_in_readiness_until_it_seals_again(ledger):
    ready = await ledger.get("http://ledger/health/ready")
    assert ready.json()["watched"]["history_sealer"]["status"] == "up", ready.text
    await card_spending_twice(ledger)
    sealer = history_seals.Sealer(ledger.parts.pool, events_table(ledger.parts.app.recorder),
                                  history_seals.seal_key_for(ledger.settings), stall_max_s=1.0)
    running = asyncio.create_task(sealer.run())
    try:
        async with ledger.parts.pool.acquire() as blocker, blocker.transaction():
            await blocker.execute(f"LOCK TABLE {history_seals.SEALS_TABLE} IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(history_seals.SEAL_INTERVAL_S + 1.0)  # its pass is due, and hangs on the lock
            with pytest.raises(history_seals.SealingStuck, match="has not been sealed for .* none \\(hung\\?\\)"):
                await sealer.check()
        for _ in range(int(SEALING_WAIT_S / 0.1)):
            if await _up(sealer):  # the lock gone, its pass finishes
                break
            await asyncio.sleep(0.1)
        assert "events since this process started" in await sealer.check()
    finally:
        running.cancel()


async def test_a_sealer_whose_newest_seal_was_deleted_signs_no_history_after_it_and_is_down(ledger):
    # The forger deletes the newest seal and rewrites the events it covered: without the
    # seal key he cannot sign them again, but the ledger's own sealer, every 2 s, would have
    # sealed them as new history. It remembers its newest seal and stops instead.
    await card_spending_twice(ledger)
    sealer, pool, table = ledger.parts.sealer, ledger.parts.pool, events_table(ledger.parts.app.recorder)
    head = ledger.parts.writer.last_position
    for _ in range(int(SEALING_WAIT_S / 0.1)):
        newest = (await seals(ledger) or [None])[-1]
        if newest is not None and newest["last_position"] >= head and sealer.last_seal.seal_no == newest["seal_no"]:
            break
        await asyncio.sleep(0.1)
    assert newest is not None and sealer.last_seal.seal_no == newest["seal_no"], "the service's sealer sealed the head"
    state = json.loads(await pool.fetchval(f"SELECT state FROM {table} WHERE originator_id = $1",
                                           Transfer.id_for("spend-a")))
    for leg in state["legs"]:
        leg["amount_minor"] *= 3
    async with pool.acquire() as connection, connection.transaction():  # the sealer kept out while he works
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{history_seals.SEALS_TABLE}:{table}")
        for guarded in (history_seals.SEALS_TABLE, table):
            for guard in append_only.GUARDS:
                await connection.execute(f"ALTER TABLE {guarded} DISABLE TRIGGER {guard}")
        await connection.execute(f"DELETE FROM {history_seals.SEALS_TABLE} WHERE events_table = $1 AND seal_no = $2",
                                 table, newest["seal_no"])
        await connection.execute(f"UPDATE {table} SET state = $2 WHERE originator_id = $1", Transfer.id_for("spend-a"),
                                 json.dumps(state).encode())
        for guarded in (history_seals.SEALS_TABLE, table):
            for guard in append_only.GUARDS:
                await connection.execute(f"ALTER TABLE {guarded} ENABLE ALWAYS TRIGGER {guard}")
    await cover_up(ledger)
    await asyncio.sleep(3 * history_seals.SEAL_INTERVAL_S)  # passes were due
    assert newest["seal_no"] not in [seal["seal_no"] for seal in await seals(ledger)], "the forgery was not sealed"
    with pytest.raises(history_seals.SealsRewritten, match=f"seal {newest['seal_no']} .* is gone: the seals were"):
        await sealer.check()
    ready = await ledger.get("http://ledger/health/ready")
    assert ready.json()["watched"]["history_sealer"]["status"] == "down", ready.text


async def _up(sealer) -> bool:
    try:
        await sealer.check()
    except history_seals.SealingStuck:
        return False
    return True


async def spend_a_inflated_and_covered_up(ledger) -> None:
    """Alice's card spending twice, then 'spend-a' forged from 100 to 300 on both legs, and
    everything derived made to agree with it."""
    await card_spending_twice(ledger)

    def inflated(state):
        for leg in state["legs"]:
            leg["amount_minor"] = 300 if leg["amount_minor"] > 0 else -300
    await rewrite(ledger, Transfer.id_for("spend-a"), inflated)
    await cover_up(ledger)


async def test_a_transfers_amounts_changed_on_both_legs_break_no_rule_but_its_seal(ledger):
    # 300 instead of 100 on both sides: legs still sum to zero, and the cover-up makes every
    # balance, entry and statement agree with the forged event.
    await spend_a_inflated_and_covered_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == [SEALED]
    assert "are not those sealed" in failed[SEALED] and "one was changed, deleted or slipped in" in failed[SEALED]
    report = await verify(ledger.parts.app, ledger.settings)
    assert report.last_seal is None, "no receipt to note from seals that did not hold"


async def test_a_whole_transfer_deleted_from_the_middle_shows_in_its_seal(ledger):
    await card_spending_twice(ledger)
    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = $1", Transfer.id_for("spend-a"))
    await cover_up(ledger)
    failed = await failed_checks(ledger)
    assert list(failed) == [SEALED]


async def test_the_newest_event_deleted_with_the_clock_and_positions_put_back_shows_in_the_last_seal(ledger):
    await card_spending_twice(ledger)
    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = $1", Transfer.id_for("spend-b"))
    await cover_up(ledger)
    async with ledger.parts.pool.acquire() as connection:
        head = await connection.fetchval(f"SELECT max(notification_id) FROM {events_table(ledger.parts.app.recorder)}")
        await connection.execute("UPDATE ledger_posting_clock SET posted_at = (SELECT max(posted_at) FROM ledger_transfers)")
        await connection.execute("UPDATE outbox_relay_position SET position = least(position, $1)", head)
    failed = await failed_checks(ledger)
    assert list(failed) == [SEALED]
    last = (await seals(ledger))[-1]
    assert f"seal {last['seal_no']}: the events at positions" in failed[SEALED]
    assert f"..{last['last_position']} are not those sealed" in failed[SEALED]


async def test_seals_are_judged_with_the_key_that_signed_them_and_another_key_checks_no_signature(ledger):
    await card_spending_twice(ledger)
    await history_seals.seal_new_events(ledger.parts.pool, events_table(ledger.parts.app.recorder),
                                        history_seals.seal_key_for(ledger.settings))
    other_key = new_private_pem().decode()
    failed = await failed_checks(ledger, ledger.settings.model_copy(update={"history_seal_key": other_key}))
    assert list(failed) == [SEALED]
    assert "was signed with key" in failed[SEALED] and "its signature is not checked" in failed[SEALED]


async def test_an_auditor_checks_the_seals_with_the_public_key_the_bank_gave_alone(ledger, monkeypatch, tmp_path):
    await card_spending_twice(ledger)
    signing_key = history_seals.seal_key_for(ledger.settings)
    await history_seals.seal_new_events(ledger.parts.pool, events_table(ledger.parts.app.recorder), signing_key)
    given = await run_cli(ledger, monkeypatch, "seal-public-key")
    assert given.exit_code == 0 and given.stdout.startswith("-----BEGIN PUBLIC KEY-----"), given.output
    assert "PRIVATE" not in given.stdout
    # The auditor's own settings: no seal key at all, the public key given, a directory of their own.
    auditors = ledger.settings.model_copy(update={"history_seal_key": None, "history_seal_public_keys": given.stdout,
                                                  "data_dir": tmp_path / "auditor"})
    assert history_seals.key_id(signing_key.public_key()) in await passed_detail(ledger, SEALED, auditors)
    assert not (tmp_path / "auditor").exists(), "a check writes nothing: no development key made for the auditor"


async def test_an_auditor_given_no_key_at_all_gets_no_key_made_and_no_seal_passed_unchecked(ledger, tmp_path):
    await card_spending_twice(ledger)
    await history_seals.seal_new_events(ledger.parts.pool, events_table(ledger.parts.app.recorder),
                                        history_seals.seal_key_for(ledger.settings))
    auditors = ledger.settings.model_copy(update={"history_seal_key": None, "history_seal_public_keys": None,
                                                  "data_dir": tmp_path / "auditor"})
    failed = await failed_checks(ledger, auditors)
    assert "which this check does not hold (it holds none: set KABINET_HISTORY_SEAL_PUBLIC_KEYS)" in failed[SEALED]
    assert not (tmp_path / "auditor").exists(), "a check writes nothing: no private key made on the auditor's disk"


async def test_a_forger_who_recomputes_the_chain_after_his_change_is_caught_by_the_signatures(ledger):
    # The chain is plain SHA-256: anyone can recompute it over forged events and write the
    # new links into the seals. Only the seal key could sign them.
    await spend_a_inflated_and_covered_up(ledger)
    table = events_table(ledger.parts.app.recorder)
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} DISABLE TRIGGER {guard}")
        link = history_seals.GENESIS_LINK
        for seal in await seals(ledger):
            events = await connection.fetch(
                f"SELECT notification_id, originator_id, originator_version, topic, state FROM {table}"
                " WHERE notification_id BETWEEN $1 AND $2 ORDER BY notification_id",
                seal["first_position"], seal["last_position"])
            link = history_seals.extend_chain(link, events)
            await connection.execute(f"UPDATE {history_seals.SEALS_TABLE} SET chain_link = $2 WHERE seal_no = $1",
                                     seal["seal_no"], link)
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} ENABLE ALWAYS TRIGGER {guard}")
    failed = await failed_checks(ledger)
    assert list(failed) == [SEALED]
    assert "are not those sealed" not in failed[SEALED], "the recomputed chain itself agrees with the forged events"
    assert "signature is not key" in failed[SEALED] and "without the seal key" in failed[SEALED]


async def test_a_seal_dated_back_is_caught_by_its_signature(ledger):
    # A seal is the bank's signed word that the history up to it was this by then: dating it
    # back a day would claim a transfer was known earlier than it was.
    await card_spending_twice(ledger)
    await history_seals.seal_new_events(ledger.parts.pool, events_table(ledger.parts.app.recorder),
                                        history_seals.seal_key_for(ledger.settings))
    last_no = (await seals(ledger))[-1]["seal_no"]
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} DISABLE TRIGGER {guard}")
        await connection.execute(f"UPDATE {history_seals.SEALS_TABLE} SET sealed_at = sealed_at - interval '1 day'"
                                 " WHERE seal_no = $1", last_no)
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} ENABLE ALWAYS TRIGGER {guard}")
    failed = await failed_checks(ledger)
    assert list(failed) == [SEALED]
    assert f"seal {last_no}'s signature is not key" in failed[SEALED]


async def test_after_a_key_rotation_seals_of_the_old_key_are_checked_with_it_and_new_ones_with_the_new(ledger):
    writer, table = ledger.parts.writer, events_table(ledger.parts.app.recorder)
    old_key = history_seals.seal_key_for(ledger.settings)
    settlement, card = await card_spending_twice(ledger)
    await history_seals.seal_new_events(ledger.parts.pool, table, old_key)
    new_pem = new_private_pem().decode()
    new_key = load_private_key(new_pem, "a new seal key")
    rotated = ledger.settings.model_copy(update={"history_seal_key": new_pem,
                                                 "history_seal_public_keys": public_pem(old_key)})
    await writer.submit(c.PostTransfer("spend-c", (c.Leg(card, -10, "RUB"), c.Leg(settlement, 10, "RUB")), "card_purchase"))
    await history_seals.seal_new_events(ledger.parts.pool, table, new_key)
    await ledger.parts.projection.wait_for(writer.last_position)

    assert await failed_checks(ledger, rotated) == {}
    without_old = rotated.model_copy(update={"history_seal_public_keys": None})
    failed = await failed_checks(ledger, without_old)
    assert list(failed) == [SEALED]
    assert f"was signed with key {history_seals.key_id(old_key.public_key())}, which this check does not hold" in failed[
        SEALED]


async def test_sealers_racing_seal_each_event_once_in_consecutive_seals(ledger):
    await card_spending_twice(ledger)
    table, key = events_table(ledger.parts.app.recorder), history_seals.seal_key_for(ledger.settings)
    await asyncio.gather(*(history_seals.seal_new_events(ledger.parts.pool, table, key) for _ in range(4)))
    sealed = await seals(ledger)
    assert [seal["seal_no"] for seal in sealed] == list(range(1, len(sealed) + 1))
    assert all(before["last_position"] < after["first_position"] for before, after in itertools.pairwise(sealed))
    events = await ledger.parts.pool.fetchval(f"SELECT count(*) FROM {table}")
    assert sum(seal["events_count"] for seal in sealed) == events
    assert await failed_checks(ledger) == {}


async def test_no_one_changes_a_seal_and_a_seal_deleted_with_the_guard_off_is_reported(ledger):
    writer, table = ledger.parts.writer, events_table(ledger.parts.app.recorder)
    key = history_seals.seal_key_for(ledger.settings)
    settlement, card = await funded_card(writer, 1_000)
    for n in range(3):  # three seals of one transfer each
        await writer.submit(c.PostTransfer(f"spend-{n}", (c.Leg(card, -10, "RUB"), c.Leg(settlement, 10, "RUB")),
                                           "card_purchase"))
        await history_seals.seal_new_events(ledger.parts.pool, table, key)
    await ledger.parts.projection.wait_for(writer.last_position)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await ledger.parts.pool.execute(f"DELETE FROM {history_seals.SEALS_TABLE}")
    last_no = (await seals(ledger))[-1]["seal_no"]
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} DISABLE TRIGGER {guard}")
        await connection.execute(f"DELETE FROM {history_seals.SEALS_TABLE} WHERE seal_no = $1", last_no - 1)
    failed = await failed_checks(ledger)
    assert list(failed) == [GUARD_CHECK, SEALED]
    assert f"of {history_seals.SEALS_TABLE} is missing or does not always fire" in failed[GUARD_CHECK]
    assert f"seals {last_no - 1}..{last_no - 1} are missing" in failed[SEALED]


async def test_a_seal_an_auditor_noted_catches_seals_cut_from_the_end_with_their_events(ledger, monkeypatch):
    # What no seal can show on its own: the newest transfer and its seal both gone, the
    # clock and positions put back. The receipt the auditor noted last time does.
    writer, table = ledger.parts.writer, events_table(ledger.parts.app.recorder)
    key = history_seals.seal_key_for(ledger.settings)
    settlement, card = await card_spending_twice(ledger)
    await history_seals.seal_new_events(ledger.parts.pool, table, key)
    await writer.submit(c.PostTransfer("spend-c", (c.Leg(card, -10, "RUB"), c.Leg(settlement, 10, "RUB")), "card_purchase"))
    await history_seals.seal_new_events(ledger.parts.pool, table, key)
    await ledger.parts.projection.wait_for(writer.last_position)
    result = await run_cli(ledger, monkeypatch, "verify", "--json")
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    receipt = verdict["last_seal"]  # an auditor's tool notes it down as it is, and the table shows it too
    assert f"`--seal {receipt}`" in next(check["detail"] for check in verdict["checks"] if check["name"] == SEALED)
    assert (await run_cli(ledger, monkeypatch, "verify", "--seal", receipt)).exit_code == 0

    await forge_history(ledger, "DELETE FROM {table} WHERE originator_id = $1", Transfer.id_for("spend-c"))
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} DISABLE TRIGGER {guard}")
        await connection.execute(f"DELETE FROM {history_seals.SEALS_TABLE} WHERE seal_no = $1",
                                 int(receipt.split(":")[0]))
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} ENABLE ALWAYS TRIGGER {guard}")
    await cover_up(ledger)
    async with ledger.parts.pool.acquire() as connection:
        head = await connection.fetchval(f"SELECT max(notification_id) FROM {table}")
        await connection.execute("UPDATE ledger_posting_clock SET posted_at = (SELECT max(posted_at) FROM ledger_transfers)")
        await connection.execute("UPDATE outbox_relay_position SET position = least(position, $1)", head)
    assert await failed_checks(ledger) == {}, "a history cut from the end looks younger, not forged"
    cut = await run_cli(ledger, monkeypatch, "verify", "--json", "--seal", receipt)
    assert cut.exit_code == 1
    failed = [check for check in json.loads(cut.stdout)["checks"] if not check["ok"]]
    assert [check["name"] for check in failed] == [SEALED]
    assert f"seal {receipt.split(':')[0]}, noted by an earlier check, is gone" in failed[0]["problems"][0]


async def test_a_noted_seal_whose_link_differs_means_the_seals_were_rewritten(ledger):
    await card_spending_twice(ledger)
    await history_seals.seal_new_events(ledger.parts.pool, events_table(ledger.parts.app.recorder),
                                        history_seals.seal_key_for(ledger.settings))
    last_no = (await seals(ledger))[-1]["seal_no"]
    report = await verify(ledger.parts.app, ledger.settings, (last_no, "00000000"))
    failed = [check for check in report.checks if not check.ok]
    assert [check.name for check in failed] == [SEALED]
    assert f"seal {last_no} is not the one noted ({last_no}:00000000)" in failed[0].detail


async def test_a_receipt_that_is_no_seals_is_a_usage_error_exit_2(ledger, monkeypatch):
    result = await run_cli(ledger, monkeypatch, "verify", "--seal", "twelve")
    assert result.exit_code == 2 and "--seal" in result.output and "a seal receipt looks like" in result.output


def test_a_seal_key_that_is_no_ed25519_key_is_refused_by_name_at_start():
    private_pem = new_private_pem().decode()
    public = public_pem(load_private_key(private_pem, "a seal key"))
    ec_public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for field, bad, says in (
            ("history_seal_key", "not a key", "history seal key must be the PEM of an Ed25519 private key"),
            ("history_seal_key", public, "history seal key must be the PEM of an Ed25519 private key"),
            ("history_seal_public_keys", private_pem, "give 1 to 8 PEM public keys to check the history's seals"),
            ("history_seal_public_keys", ec_public, "must be Ed25519 public keys")):
        with pytest.raises(ValidationError, match=f"{field}[\\s\\S]*{says}"):
            ServiceSettings(service_name="ledger", database_url="postgresql://u@h/db", kafka_bootstrap_servers="k:9092",
                            **{field: bad})


async def rewrite(ledger, originator_id, change) -> None:
    """Rewrite a stream's first event's JSON state in place: `change(state)` edits the dict."""
    table = events_table(ledger.parts.app.recorder)
    state = json.loads(await ledger.parts.pool.fetchval(
        f"SELECT state FROM {table} WHERE originator_id = $1 AND originator_version = 1", originator_id))
    change(state)
    await forge_history(ledger, "UPDATE {table} SET state = $2 WHERE originator_id = $1 AND originator_version = 1",
                        originator_id, json.dumps(state).encode())
