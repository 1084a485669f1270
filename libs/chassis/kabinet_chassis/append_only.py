"""Event tables are append-only in the database (ARCHITECTURE.md §6).

A service's events are its history: what an auditor reads and what every balance is
rebuilt from. Triggers refuse any UPDATE, DELETE or TRUNCATE of an event table, whoever
sends it: the service's own code (a bug, a hand-written fix-up through its connection), a
migration, staff at a psql prompt. Privileges could not do this on their own: a table's
owner, and a superuser, may change any row. The triggers fire for them too, always (also
under `session_replication_role = replica`, which switches ordinary triggers off): only a
role that may alter the table can switch them off, and `kabinet ledger verify` reports a
table whose guard is off or missing.

Inserting costs nothing: no trigger fires on INSERT.
"""

from __future__ import annotations

import asyncpg

from kabinet_chassis.databases import SCHEMA_CHANGE_TIMEOUT_S

# asyncpg raises it as InsufficientPrivilegeError: changing history is not allowed to anyone.
REFUSED_SQLSTATE = "42501"
ROW_GUARD = "history_is_append_only"
TRUNCATE_GUARD = "history_is_never_truncated"
GUARDS = (ROW_GUARD, TRUNCATE_GUARD)

REFUSE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION kabinet_refuse_changing_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% of %.% refused: the event history is append-only', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = '{REFUSED_SQLSTATE}',
              HINT = 'a correction is a new event (a reversing transfer), never a changed one';
END $$"""


async def guard(pool: asyncpg.Pool, table: str) -> None:
    """Make `table` (schema-qualified and quoted) append-only; safe to repeat and to race: one
    guard at a time in a database, since CREATE OR REPLACE fails against the same statement in
    another transaction (a unique violation while the function is new, "tuple concurrently
    updated" once it exists)."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext('kabinet_append_only_guard'))",
                                 timeout=SCHEMA_CHANGE_TIMEOUT_S)
        await connection.execute(REFUSE_FUNCTION, timeout=SCHEMA_CHANGE_TIMEOUT_S)
        for name, fires in ((ROW_GUARD, "BEFORE UPDATE OR DELETE ON {table} FOR EACH ROW"),
                            (TRUNCATE_GUARD, "BEFORE TRUNCATE ON {table} FOR EACH STATEMENT")):
            await connection.execute(
                f"CREATE OR REPLACE TRIGGER {name} {fires.format(table=table)}"
                " EXECUTE FUNCTION kabinet_refuse_changing_history()", timeout=SCHEMA_CHANGE_TIMEOUT_S)
            await connection.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name}", timeout=SCHEMA_CHANGE_TIMEOUT_S)


async def missing_guards(connection: asyncpg.Connection, table: str) -> list[str]:
    """The guards `table` lacks, or that do not always fire (ALTER TABLE … DISABLE TRIGGER, or
    ENABLE TRIGGER, which lets `session_replication_role = replica` skip them): for audits."""
    enabled = await connection.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = ANY($2::text[]) AND tgenabled = 'A'",
        table, list(GUARDS))
    present = {row["tgname"] for row in enabled}
    return [name for name in GUARDS if name not in present]
