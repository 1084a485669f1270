"""The seals and the read model's rebuild at their margins: what an auditor's check of the
seals must still see (a seal stripped of its signature, a seal's number or range rewritten,
seals of one history shown for another, a forged event in one seal among many), what a
sealer must refuse to sign, what a receipt may look like; and a rebuild that finds a schema
left by one killed midway, keeps every grant of the old tables, and counts and places the
events committed while it built."""

from __future__ import annotations

import itertools
import json
import uuid

import asyncpg
import pytest

from kabinet_chassis import append_only, history_seals
from kabinet_chassis.ed25519_keys import new_private_pem, public_pem
from kabinet_chassis.eventstore import events_table
from ledger import projections, rebuild
from ledger.domain import commands as c
from ledger.domain.transfer import Transfer
from ledger.rebuild import REBUILD_SCHEMA, rebuild_read_model
from services.ledger.tests.integration.ledger_support import cover_up, failed_checks, forge_history, funded_card

pytestmark = pytest.mark.integration

SEALED = "history matches its seals"


async def spends_each_in_a_seal_of_its_own(ledger, spends: int = 3) -> tuple[uuid.UUID, uuid.UUID]:
    """Alice's card funded, then `spends` purchases of 10, each sealed on its own; settled."""
    writer, table = ledger.parts.writer, events_table(ledger.parts.app.recorder)
    key = history_seals.seal_key_for(ledger.settings)
    settlement, card = await funded_card(writer, 1_000)
    await history_seals.seal_new_events(ledger.parts.pool, table, key)
    for n in range(spends):
        await writer.submit(c.PostTransfer(f"spend-{n}", (c.Leg(card, -10, "RUB"), c.Leg(settlement, 10, "RUB")), "card_purchase"))
        await history_seals.seal_new_events(ledger.parts.pool, table, key)
    await ledger.parts.projection.wait_for(writer.last_position)
    assert await failed_checks(ledger) == {}
    return settlement, card


async def seals(ledger) -> list[asyncpg.Record]:
    return await ledger.parts.pool.fetch(
        f"SELECT * FROM {history_seals.SEALS_TABLE} WHERE events_table = $1 ORDER BY seal_no", events_table(ledger.parts.app.recorder)
    )


async def forge_seals(ledger, statement: str, *args) -> None:
    """Change the seals as only their table's owner can: its append-only guards off and on again."""
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} DISABLE TRIGGER {guard}")
        await connection.execute(statement.format(seals=history_seals.SEALS_TABLE), *args)
        for guard in append_only.GUARDS:
            await connection.execute(f"ALTER TABLE {history_seals.SEALS_TABLE} ENABLE ALWAYS TRIGGER {guard}")


async def seals_checked(connection, table: str, settings) -> history_seals.SealCheck:
    """An auditor's check of `table`'s seals, in one snapshot, with the keys of `settings`."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        return await history_seals.check_seals(connection, table, history_seals.verification_keys_for(settings))


# ---- an auditor's check of the seals ------------------------------------------------------------


async def test_a_seal_stripped_of_its_signature_is_reported_as_unsigned(ledger):
    # A forger who recomputes the chain cannot sign it: leaving no signature at all must not
    # pass either, as if the seal were older than signing.
    await spends_each_in_a_seal_of_its_own(ledger)
    last_no = (await seals(ledger))[-1]["seal_no"]
    await forge_seals(ledger, "ALTER TABLE {seals} ALTER COLUMN signature DROP NOT NULL")  # as before seals were signed
    await forge_seals(ledger, "UPDATE {seals} SET signature = NULL WHERE seal_no = $1", last_no)
    failed = await failed_checks(ledger)
    assert list(failed) == [SEALED]
    assert f"seal {last_no} is not signed" in failed[SEALED]


async def test_a_seals_number_first_position_and_count_are_signed_with_it(ledger):
    await spends_each_in_a_seal_of_its_own(ledger)
    first, *_, last = await seals(ledger)
    await forge_seals(
        ledger,
        "UPDATE {seals} SET first_position = first_position + 1, events_count = events_count + 1 WHERE seal_no = $1",
        first["seal_no"],
    )
    await forge_seals(ledger, "UPDATE {seals} SET seal_no = seal_no + 5 WHERE seal_no = $1", last["seal_no"])
    failed = await failed_checks(ledger)
    assert list(failed) == [SEALED]
    assert f"seal {first['seal_no']}'s signature is not key" in failed[SEALED]
    assert f"seal {last['seal_no'] + 5}'s signature is not key" in failed[SEALED]


async def test_seals_of_one_history_shown_for_another_fail_their_signatures_and_leave_the_first_unmixed(ledger):
    # A copy of the ledger's events under another table's name, with copies of its seals:
    # every link agrees, but each signature names the history it sealed.
    await spends_each_in_a_seal_of_its_own(ledger)
    table, pool = events_table(ledger.parts.app.recorder), ledger.parts.pool
    copy = f'{table.removesuffix(chr(34))}_copy"'
    await pool.execute(f"CREATE TABLE {copy} AS SELECT * FROM {table}")
    sealed = await seals(ledger)
    await pool.execute(
        f"INSERT INTO {history_seals.SEALS_TABLE} SELECT $2, seal_no, first_position, last_position, events_count,"
        f" chain_link, key_id, sealed_at, signature FROM {history_seals.SEALS_TABLE} WHERE events_table = $1",
        table,
        copy,
    )
    async with pool.acquire() as connection:
        copied = await seals_checked(connection, copy, ledger.settings)
        own = await seals_checked(connection, table, ledger.settings)
    assert copied.problems_count == len(sealed), copied.problems
    assert all("signature is not key" in problem for problem in copied.problems)
    assert "are not those sealed" not in " ".join(copied.problems)
    assert (own.problems, own.seals) == ([], len(sealed)), "the other table's seals are not this one's"


async def test_an_event_forged_in_one_seal_shows_in_that_seal_alone(ledger):
    # Each seal's range is judged from the link the seal before it stored: the auditor is
    # told which range changed, not every seal after it.
    await spends_each_in_a_seal_of_its_own(ledger, spends=4)
    state = json.loads(
        await ledger.parts.pool.fetchval(
            f"SELECT state FROM {events_table(ledger.parts.app.recorder)} WHERE originator_id = $1", Transfer.id_for("spend-1")
        )
    )
    for leg in state["legs"]:
        leg["amount_minor"] *= 2
    await forge_history(
        ledger, "UPDATE {table} SET state = $2 WHERE originator_id = $1", Transfer.id_for("spend-1"), json.dumps(state).encode()
    )
    await cover_up(ledger)
    report = await _seals_of(ledger)
    assert report.problems_count == 1, report.problems
    spend_1_at = await ledger.parts.pool.fetchval(
        f"SELECT notification_id FROM {events_table(ledger.parts.app.recorder)} WHERE originator_id = $1", Transfer.id_for("spend-1")
    )
    spend_1_seal = next(seal for seal in await seals(ledger) if seal["last_position"] == spend_1_at)
    assert report.problems[0].startswith(f"seal {spend_1_seal['seal_no']}: the events at positions")


@pytest.mark.parametrize(
    "forgery",
    [
        "originator_id = gen_random_uuid()",  # the payment moved to another stream
        "originator_version = originator_version + 100",
        "topic = topic || '_forged'",
    ],
)
async def test_a_sealed_events_stream_version_and_type_are_sealed_with_its_bytes(ledger, forgery):
    # Only the stored bytes unchanged: the event was still moved, renumbered or retyped.
    await spends_each_in_a_seal_of_its_own(ledger)
    await forge_history(ledger, f"UPDATE {{table}} SET {forgery} WHERE originator_id = $1", Transfer.id_for("spend-1"))
    report = await _seals_of(ledger)
    assert report.problems_count == 1 and "are not those sealed" in report.problems[0], report.problems


async def test_the_check_counts_the_events_sealed_and_those_committed_since_the_last_seal(ledger):
    await spends_each_in_a_seal_of_its_own(ledger)
    writer, pool, table = ledger.parts.writer, ledger.parts.pool, events_table(ledger.parts.app.recorder)
    settlement, card = await funded_card(writer, 10)
    sealers_kept_out = await asyncpg.connect(ledger.settings.service_database_url)
    auditor = await asyncpg.connect(ledger.settings.service_database_url)
    try:
        await sealers_kept_out.execute("BEGIN")
        await sealers_kept_out.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{history_seals.SEALS_TABLE}:{table}")
        sealed_events = await pool.fetchval(f"SELECT sum(events_count) FROM {history_seals.SEALS_TABLE} WHERE events_table = $1", table)
        for n in range(2):
            await writer.submit(c.PostTransfer(f"later-{n}", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p"))
        events = await pool.fetchval(f"SELECT count(*) FROM {table}")
        report = await seals_checked(auditor, table, ledger.settings)
    finally:
        await sealers_kept_out.close()
        await auditor.close()
    assert report.problems == []
    assert (report.events_sealed, report.events_unsealed) == (sealed_events, events - sealed_events)
    assert report.events_unsealed >= 2


async def test_a_database_without_a_seals_table_is_reported_unsealed_not_passed(ledger):
    # An auditor pointed at a history whose seals table is gone (or never made) is told so.
    async with ledger.parts.pool.acquire() as connection, connection.transaction():
        await connection.execute("CREATE SCHEMA auditors_empty_view")
        await connection.execute("SET LOCAL search_path = auditors_empty_view")
        report = await history_seals.check_seals(connection, "events", {})
    assert report.problems_count == 1 and "has no seals table: its history is not sealed" in report.problems[0]


def test_a_receipt_names_a_seal_from_1_and_at_least_8_hex_digits_of_its_link():
    assert history_seals.parse_receipt("12:0A1B2C3D") == (12, "0a1b2c3d")
    for bad in ("0:0a1b2c3d", "12:0a1b2c3", "12:0a1b2c3g", "-1:0a1b2c3d", ":0a1b2c3d"):
        with pytest.raises(ValueError, match="a seal receipt looks like"):
            history_seals.parse_receipt(bad)


async def test_a_receipt_shows_128_bits_of_its_seals_link(ledger):
    await spends_each_in_a_seal_of_its_own(ledger)
    report = await _seals_of(ledger)
    number, link_hex = history_seals.parse_receipt(report.last_seal.receipt)
    assert number == report.last_seal.seal_no and link_hex == report.last_seal.chain_link.hex()[:32]


# ---- keys ---------------------------------------------------------------------------------------


async def test_an_auditor_given_public_keys_trusts_no_development_key_found_on_the_disk(ledger):
    # The ledger's own data dir holds its development key; an auditor who was given the
    # bank's public keys checks with those alone.
    assert history_seals.verification_keys_for(ledger.settings), "the ledger seals with its development key"
    given = history_seals.seal_key_for(ledger.settings.model_copy(update={"history_seal_key": new_private_pem().decode()}))
    auditors = ledger.settings.model_copy(update={"history_seal_key": None, "history_seal_public_keys": public_pem(given)})
    assert list(history_seals.verification_keys_for(auditors)) == [history_seals.key_id(given.public_key())]


# ---- the sealer ---------------------------------------------------------------------------------


async def test_a_sealer_remembers_the_newest_seal_it_found_even_with_nothing_new_to_seal(ledger):
    # A sealer starting on a history sealed to its head: should the newest seal then be
    # deleted and its events rewritten, it must not seal them as new history.
    await spends_each_in_a_seal_of_its_own(ledger)
    pool, table, key = ledger.parts.pool, events_table(ledger.parts.app.recorder), history_seals.seal_key_for(ledger.settings)
    remembered = history_seals.LastSeal()
    await history_seals.seal_new_events(pool, table, key, remembered)
    newest = (await seals(ledger))[-1]
    assert (remembered.seal_no, remembered.chain_link) == (newest["seal_no"], newest["chain_link"])
    await forge_seals(ledger, "DELETE FROM {seals} WHERE events_table = $1 AND seal_no = $2", table, newest["seal_no"])
    with pytest.raises(history_seals.SealsRewritten, match=f"seal {newest['seal_no']} .* is gone"):
        await history_seals.seal_new_events(pool, table, key, remembered)


async def test_a_sealer_whose_newest_seal_was_changed_signs_nothing_more(ledger):
    await spends_each_in_a_seal_of_its_own(ledger)
    pool, table, key = ledger.parts.pool, events_table(ledger.parts.app.recorder), history_seals.seal_key_for(ledger.settings)
    remembered = history_seals.LastSeal()
    await history_seals.seal_new_events(pool, table, key, remembered)
    await forge_seals(
        ledger, "UPDATE {seals} SET chain_link = $3 WHERE events_table = $1 AND seal_no = $2", table, remembered.seal_no, bytes(32)
    )
    seals_before = len(await seals(ledger))
    await funded_card(ledger.parts.writer, 1)
    with pytest.raises(history_seals.SealsRewritten, match=f"seal {remembered.seal_no} .* is changed"):
        await history_seals.seal_new_events(pool, table, key, remembered)
    assert len(await seals(ledger)) == seals_before


async def test_a_clean_stop_on_a_database_that_fails_does_not_fail_the_stop(ledger):
    pool = await asyncpg.create_pool(ledger.settings.service_database_url, min_size=1, max_size=1)
    await pool.close()
    sealer = history_seals.Sealer(pool, events_table(ledger.parts.app.recorder), history_seals.seal_key_for(ledger.settings))
    await sealer.last_pass()  # logged; the next start seals what is left


async def _seals_of(ledger) -> history_seals.SealCheck:
    async with ledger.parts.pool.acquire() as connection:
        return await seals_checked(connection, events_table(ledger.parts.app.recorder), ledger.settings)


# ---- rebuilding the read model ------------------------------------------------------------------


async def test_a_rebuild_finds_the_schema_a_killed_rebuild_left_and_builds_anew(ledger):
    await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    await ledger.parts.pool.execute(f"CREATE SCHEMA {REBUILD_SCHEMA}")
    await ledger.parts.pool.execute(f"CREATE TABLE {REBUILD_SCHEMA}.ledger_entries (half_built int)")
    rebuilt = await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url)
    assert rebuilt.position == ledger.parts.writer.last_position
    assert await failed_checks(ledger) == {}
    assert await ledger.parts.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", REBUILD_SCHEMA) == 0


async def test_the_rebuilt_read_model_keeps_grants_to_everyone_and_grants_that_may_be_passed_on(ledger):
    _, card = await funded_card(ledger.parts.writer, 1_000)
    await ledger.parts.projection.wait_for(ledger.parts.writer.last_position)
    pool, auditor = ledger.parts.pool, f"auditor_{uuid.uuid4().hex[:8]}"
    await pool.execute(f'CREATE ROLE "{auditor}"')
    try:
        await pool.execute("GRANT SELECT ON ledger_accounts TO PUBLIC")
        await pool.execute(f'GRANT SELECT ON ledger_entries TO "{auditor}" WITH GRANT OPTION')
        acl_query = (
            "SELECT relname, relacl::text[] AS acl FROM pg_class WHERE relname = ANY($1)"
            " AND relnamespace = current_schema()::regnamespace ORDER BY relname"
        )
        before = await pool.fetch(acl_query, list(projections.READ_MODEL_TABLES))
        await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url)
        assert await pool.fetch(acl_query, list(projections.READ_MODEL_TABLES)) == before
        assert any("=r/" in entry for entry in next(row["acl"] for row in before if row["relname"] == "ledger_accounts"))
    finally:
        await pool.execute(f'DROP OWNED BY "{auditor}"')
        await pool.execute(f'DROP ROLE "{auditor}"')


async def test_events_committed_while_the_read_model_was_built_are_counted_and_applied_at_the_swap(ledger, monkeypatch):
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    await ledger.parts.projection.wait_for(writer.last_position)
    swap, posted = rebuild._swap, itertools.count()

    async def a_payment_just_before_the_swap(*args):
        if next(posted) == 0:
            await writer.submit(c.PostTransfer("meanwhile", (c.Leg(card, -5, "RUB"), c.Leg(settlement, 5, "RUB")), "p2p"))
        return await swap(*args)

    monkeypatch.setattr(rebuild, "_swap", a_payment_just_before_the_swap)
    rebuilt = await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url)
    events = await ledger.parts.pool.fetchval(f"SELECT count(*) FROM {events_table(ledger.parts.app.recorder)}")
    assert (rebuilt.events_applied, rebuilt.position) == (events, writer.last_position)
    assert (await ledger.get("/transfers/meanwhile")).status_code == 200
    assert await failed_checks(ledger) == {}


async def test_an_operator_is_never_told_the_rebuild_is_past_the_head_it_names(ledger, monkeypatch):
    # Payments committed during a round are in it: the head told moves on with them.
    writer = ledger.parts.writer
    settlement, card = await funded_card(writer, 1_000)
    for n in range(6):
        await writer.submit(c.PostTransfer(f"before-{n}", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p"))
    await ledger.parts.projection.wait_for(writer.last_position)
    monkeypatch.setattr(rebuild, "PAGE_EVENTS", 3)
    apply_page, pages = rebuild.projections.apply_page, itertools.count()

    async def payments_during_the_first_page(connection, page):
        if next(pages) == 0:
            for n in range(4):
                await writer.submit(c.PostTransfer(f"during-{n}", (c.Leg(card, -1, "RUB"), c.Leg(settlement, 1, "RUB")), "p2p"))
        await apply_page(connection, page)

    monkeypatch.setattr(rebuild.projections, "apply_page", payments_during_the_first_page)
    told: list[tuple[int, int]] = []
    await rebuild_read_model(ledger.parts.app, ledger.settings.service_database_url, on_progress=lambda *progress: told.append(progress))
    assert told[-1][0] == writer.last_position
    assert all(position <= head for position, head in told), told


async def test_a_seal_takes_the_event_that_crosses_its_byte_limit_and_the_pass_seals_the_rest(ledger, monkeypatch):
    # On a copy of the history, which the service's own sealer leaves alone: one pass seals
    # it all, each seal ending with the event that took it past SEAL_BYTES_MAX.
    await spends_each_in_a_seal_of_its_own(ledger)
    table, pool = events_table(ledger.parts.app.recorder), ledger.parts.pool
    copy = f'{table.removesuffix(chr(34))}_copy"'
    await pool.execute(f"CREATE TABLE {copy} AS SELECT * FROM {table}")
    sizes = [row["size"] for row in await pool.fetch(f"SELECT octet_length(state) AS size FROM {copy} ORDER BY notification_id")]
    monkeypatch.setattr(history_seals, "SEAL_BYTES_MAX", sizes[0] + 1)
    key = history_seals.seal_key_for(ledger.settings)
    assert await history_seals.seal_new_events(pool, copy, key) == len(sizes)
    copied_seals = await pool.fetch(f"SELECT events_count FROM {history_seals.SEALS_TABLE} WHERE events_table = $1 ORDER BY seal_no", copy)
    assert copied_seals[0]["events_count"] == 2
    assert sum(seal["events_count"] for seal in copied_seals) == len(sizes)
