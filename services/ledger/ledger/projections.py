"""Read side of the ledger (asyncpg), fed from the ledger's own log in order.

Tables: accounts; one row per account entry (a transfer's leg) with the running balance
and running credits after it (so a balance at any past instant is one indexed lookup, a
statement's totals two, and its lines a range scan); transfers; holds. Current balances
are not here: they are saved with the events that change them (`ledger_balances`, see
application.py), and read from there.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from kabinet_chassis.databases import apply_schema
from ledger.domain.account import freezes_after
from ledger.domain.balance import available_minor
from ledger.domain.commands import REVERSAL_SUFFIX
from ledger.domain.stored import stored_later

# The read model's projection (its position in projection_position) and its tables, as
# `kabinet ledger rebuild-read-model` rebuilds them (ledger/rebuild.py).
READ_MODEL_PROJECTION = "ledger_read_model"
READ_MODEL_TABLES = ("ledger_accounts", "ledger_entries", "ledger_transfers", "ledger_holds")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_accounts (
    account_id uuid PRIMARY KEY,
    owner_id text NOT NULL,
    kind text NOT NULL,
    currency char(3) NOT NULL,
    state text NOT NULL,
    credit_limit_minor bigint NOT NULL,
    opened_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_entries (
    account_id uuid NOT NULL,
    position bigint NOT NULL,
    seq integer NOT NULL,
    transfer_id text NOT NULL,
    code text NOT NULL,
    amount_minor bigint NOT NULL,
    balance_after_minor bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, position, seq)
);
CREATE INDEX IF NOT EXISTS ledger_entries_time ON ledger_entries (account_id, occurred_at, position, seq);
-- The account's credits summed up to and including this entry, as balance_after_minor sums
-- its amounts: a period's credits are the difference of two entries', so a statement page
-- reads two rows instead of summing the period again. numeric: a bank account's turnover
-- may pass a bigint though no balance does. Entries from before it are summed once, here.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'ledger_entries'::regclass
                   AND attname = 'credits_after_minor' AND NOT attisdropped) THEN
        ALTER TABLE ledger_entries ADD COLUMN credits_after_minor numeric;
        UPDATE ledger_entries e SET credits_after_minor = summed.credits_minor
        FROM (SELECT account_id, position, seq, sum(greatest(amount_minor, 0))
                  OVER (PARTITION BY account_id ORDER BY position, seq) AS credits_minor
              FROM ledger_entries) AS summed
        WHERE (e.account_id, e.position, e.seq) = (summed.account_id, summed.position, summed.seq);
        ALTER TABLE ledger_entries ALTER COLUMN credits_after_minor SET NOT NULL;
    END IF;
END
$$;
CREATE TABLE IF NOT EXISTS ledger_transfers (
    transfer_id text PRIMARY KEY,
    code text NOT NULL,
    legs jsonb NOT NULL,
    external_ref text,
    customer_ids text[] NOT NULL,
    metadata jsonb NOT NULL,
    posted_at timestamptz NOT NULL
);
-- Who asked for it (an access token's subject); null on transfers posted before the ledger recorded it.
ALTER TABLE ledger_transfers ADD COLUMN IF NOT EXISTS requested_by text;
-- On a reversal: the transfer it reverses, why, and the bank's case that decided it.
ALTER TABLE ledger_transfers ADD COLUMN IF NOT EXISTS reverses text;
ALTER TABLE ledger_transfers ADD COLUMN IF NOT EXISTS reversal_reason text;
ALTER TABLE ledger_transfers ADD COLUMN IF NOT EXISTS reversal_case_ref text;
-- Why an account is frozen (every freeze not lifted yet) or was closed.
ALTER TABLE ledger_accounts ADD COLUMN IF NOT EXISTS freeze_reasons text[] NOT NULL DEFAULT '{}';
ALTER TABLE ledger_accounts ADD COLUMN IF NOT EXISTS close_reason text;
-- An account frozen before freezes had reasons (none else is frozen without one): as its events replay.
UPDATE ledger_accounts SET freeze_reasons = '{not_recorded}' WHERE state = 'frozen' AND freeze_reasons = '{}';
CREATE TABLE IF NOT EXISTS ledger_holds (
    hold_id text PRIMARY KEY,
    debit_account_id uuid NOT NULL,
    credit_account_id uuid NOT NULL,
    amount_minor bigint NOT NULL,
    captured_minor bigint NOT NULL,
    currency char(3) NOT NULL,
    state text NOT NULL,
    expires_at timestamptz NOT NULL,
    code text NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_holds_expiry ON ledger_holds (expires_at) WHERE state = 'active';
-- When each hold was placed: its log position (an account's pending holds are listed in
-- that order) and time. Holds placed before the read model kept them have no such record
-- here, and only their events know it: then the read model is emptied, and its projection
-- replays the log into it when the ledger starts.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'ledger_holds'::regclass
                   AND attname = 'placed_position' AND NOT attisdropped) THEN
        IF EXISTS (SELECT FROM ledger_holds) THEN
            TRUNCATE ledger_accounts, ledger_entries, ledger_transfers, ledger_holds;
            IF to_regclass('projection_position') IS NOT NULL THEN
                UPDATE projection_position SET position = 0 WHERE projection = '""" + READ_MODEL_PROJECTION + """';
            END IF;
        END IF;
        ALTER TABLE ledger_holds ADD COLUMN placed_position bigint NOT NULL, ADD COLUMN placed_at timestamptz NOT NULL;
    END IF;
END
$$;
-- What a hold is for, as its placement gave it (holds placed before holds had references have none).
ALTER TABLE ledger_holds ADD COLUMN IF NOT EXISTS external_ref text;
ALTER TABLE ledger_holds ADD COLUMN IF NOT EXISTS metadata jsonb NOT NULL DEFAULT '{}';
-- An account's pending holds, newest first: those reserving its money, and those to pay into it.
CREATE INDEX IF NOT EXISTS ledger_holds_debit_active ON ledger_holds (debit_account_id, placed_position)
    WHERE state = 'active';
CREATE INDEX IF NOT EXISTS ledger_holds_credit_active ON ledger_holds (credit_account_id, placed_position)
    WHERE state = 'active';
-- The holds placed with a reference, for staff and reconciliation, in the order placed.
CREATE INDEX IF NOT EXISTS ledger_holds_by_reference ON ledger_holds (external_ref, placed_position)
    WHERE external_ref IS NOT NULL;
-- The log position of the event that opened each account and posted each transfer (no two
-- share one): an owner's accounts and a reference's transfers are paged in that order. Not
-- by time and id: batches after a clock step-back share the last batch's time (ADR 0002),
-- so a row added at that time after a page was read, with an id below the page's cursor,
-- was never listed. Rows stored before the read model kept positions have none, and an
-- account's is in its events alone (the events table is the recorder's, which this script
-- does not know): as for holds' placed_position, the read model is emptied and its
-- projection replays the log into it when the ledger starts.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'ledger_accounts'::regclass
                   AND attname = 'opened_position' AND NOT attisdropped)
       OR NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'ledger_transfers'::regclass
                      AND attname = 'posted_position' AND NOT attisdropped) THEN
        IF EXISTS (SELECT FROM ledger_accounts) OR EXISTS (SELECT FROM ledger_transfers) THEN
            TRUNCATE ledger_accounts, ledger_entries, ledger_transfers, ledger_holds;
            IF to_regclass('projection_position') IS NOT NULL THEN
                UPDATE projection_position SET position = 0 WHERE projection = '""" + READ_MODEL_PROJECTION + """';
            END IF;
        END IF;
        ALTER TABLE ledger_accounts ADD COLUMN IF NOT EXISTS opened_position bigint NOT NULL;
        ALTER TABLE ledger_transfers ADD COLUMN IF NOT EXISTS posted_position bigint NOT NULL;
    END IF;
END
$$;
-- They replace indexes on (time, id), which paged by time.
DROP INDEX IF EXISTS ledger_accounts_owner_order;
DROP INDEX IF EXISTS ledger_transfers_external_ref;
-- An owner's accounts in pages, in the order they were opened (ledger_accounts_owner, on owner_id alone, came first).
CREATE INDEX IF NOT EXISTS ledger_accounts_by_owner ON ledger_accounts (owner_id, opened_position);
-- A payment found by its reference (a card network's RRN, a payment system's id), as staff
-- and reconciliation look it up, in posting order.
CREATE INDEX IF NOT EXISTS ledger_transfers_by_reference ON ledger_transfers (external_ref, posted_position)
    WHERE external_ref IS NOT NULL;
"""

PAGE_SIZE_MAX = 200
# The most entries one history page reads to find its lines (see `history`).
HISTORY_SCAN_ROWS_MAX = 20_000
# The bank itself, or a business customer, may own any number of accounts: a list of them comes in pages.
ACCOUNTS_PAGE_SIZE_MAX = 100
TRANSFERS_PAGE_SIZE_MAX = 100
HOLDS_PAGE_SIZE_MAX = 100


class UnknownCursor(ValueError):
    """A page cursor that names nothing the asker may page from."""


async def ensure_schema(pool: asyncpg.Pool) -> None:
    await apply_schema(pool, READ_MODEL_PROJECTION, SCHEMA)


def _kind(event: Any) -> str:
    return f"{type(event).__qualname__}"


# A page's transfers and their entries in one statement: each entry's running balance is
# the account's last entry before the page plus the page's legs up to it, in log order.
# "Before the page", not the account's last entry: a page replayed over the read model
# (rebuilt from the start) may reach past what it holds, and its new entries must not count
# the legs already there twice; those it holds already are kept as they are.
_POST_TRANSFERS = """
WITH transfers AS (
    INSERT INTO ledger_transfers (transfer_id, code, legs, external_ref, customer_ids, metadata, posted_at, requested_by,
                                  reverses, reversal_reason, reversal_case_ref, posted_position)
    SELECT t.transfer_id, t.code, t.legs::jsonb, t.external_ref, array(SELECT jsonb_array_elements_text(t.customer_ids::jsonb)),
           t.metadata::jsonb, t.posted_at, t.requested_by, t.reverses, t.reversal_reason, t.reversal_case_ref,
           t.posted_position
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], $8::text[],
                $9::text[], $10::text[], $11::text[], $12::bigint[])
        AS t(transfer_id, code, legs, external_ref, customer_ids, metadata, posted_at, requested_by, reverses,
             reversal_reason, reversal_case_ref, posted_position)
    ON CONFLICT DO NOTHING
), legs AS (
    SELECT * FROM unnest($13::uuid[], $14::bigint[], $15::integer[], $16::integer[], $17::bigint[])
        AS leg(account_id, position, seq, transfer_index, amount_minor)
), opening AS (
    SELECT first.account_id, coalesce(last.balance_after_minor, 0) AS balance_minor,
           coalesce(last.credits_after_minor, 0) AS credits_minor
    FROM (SELECT account_id, min(position) AS position FROM legs GROUP BY account_id) AS first
    LEFT JOIN LATERAL (SELECT balance_after_minor, credits_after_minor FROM ledger_entries e
                       WHERE e.account_id = first.account_id AND e.position < first.position
                       ORDER BY position DESC, seq DESC LIMIT 1) AS last ON true
)
INSERT INTO ledger_entries (account_id, position, seq, transfer_id, code, amount_minor, balance_after_minor,
                            credits_after_minor, occurred_at)
SELECT leg.account_id, leg.position, leg.seq, ($1::text[])[leg.transfer_index], ($2::text[])[leg.transfer_index],
       leg.amount_minor,
       opening.balance_minor + sum(leg.amount_minor) OVER running,
       opening.credits_minor + sum(greatest(leg.amount_minor, 0)) OVER running,
       ($7::timestamptz[])[leg.transfer_index]
FROM legs AS leg JOIN opening USING (account_id)
WINDOW running AS (PARTITION BY leg.account_id ORDER BY leg.position, leg.seq)
ON CONFLICT DO NOTHING
"""


async def apply_page(connection: asyncpg.Connection, page: Sequence[tuple[int, Any]]) -> None:
    """Apply domain events in log order. Transfers, the bulk of a page, go in one statement."""
    transfer_columns: tuple[list, ...] = ([], [], [], [], [], [], [], [], [], [], [], [])
    leg_columns: tuple[list, ...] = ([], [], [], [], [])
    for position, event in page:
        kind = _kind(event)
        if kind == "Account.Opened":
            await connection.execute(
                "INSERT INTO ledger_accounts (account_id, owner_id, kind, currency, state, credit_limit_minor, opened_at,"
                " updated_at, opened_position) VALUES ($1, $2, $3, $4, 'open', $5, $6, $6, $7) ON CONFLICT DO NOTHING",
                event.originator_id, event.owner_id, str(event.kind), event.currency, event.credit_limit_minor, event.timestamp,
                position,
            )
        elif kind in ("Account.Frozen", "Account.Unfrozen"):
            reasons = await connection.fetchval(
                "SELECT freeze_reasons FROM ledger_accounts WHERE account_id = $1", event.originator_id)
            left, state = freezes_after(event, tuple(reasons or ()))
            await connection.execute(
                "UPDATE ledger_accounts SET state = $2, freeze_reasons = $3, updated_at = $4 WHERE account_id = $1",
                event.originator_id, state, list(left), event.timestamp,
            )
        elif kind == "Account.Closed":
            await connection.execute(
                "UPDATE ledger_accounts SET state = 'closed', close_reason = $2, updated_at = $3 WHERE account_id = $1",
                event.originator_id, stored_later(event, "reason"), event.timestamp,
            )
        elif kind == "Account.CreditLimitSet":
            await connection.execute(
                "UPDATE ledger_accounts SET credit_limit_minor = $2, updated_at = $3 WHERE account_id = $1",
                event.originator_id, event.credit_limit_minor, event.timestamp,
            )
        elif kind == "Transfer.Posted":
            for column, value in zip(transfer_columns, (
                event.client_transfer_id, event.code, json.dumps(event.legs), event.external_ref,
                json.dumps(list(event.customer_ids)), json.dumps(event.metadata), event.posted_at,
                stored_later(event, "requested_by"), stored_later(event, "reverses"),
                stored_later(event, "reversal_reason"), stored_later(event, "reversal_case_ref"), position,
            ), strict=True):
                column.append(value)
            transfer_index = len(transfer_columns[0])  # 1-based, as SQL arrays are
            for seq, leg in enumerate(event.legs):
                for column, value in zip(leg_columns, (leg["account_id"], position, seq, transfer_index, leg["amount_minor"]),
                                         strict=True):
                    column.append(value)
        elif kind == "Hold.Placed":
            # A hold's row starts again from its placement: captures add to it, so a log
            # replayed from the start over the read model would otherwise count them twice.
            await connection.execute(
                "INSERT INTO ledger_holds (hold_id, debit_account_id, credit_account_id, amount_minor, captured_minor,"
                " currency, state, expires_at, code, placed_position, placed_at, external_ref, metadata)"
                " VALUES ($1, $2, $3, $4, 0, $5, 'active', $6, $7, $8, $9, $10, $11::jsonb)"
                " ON CONFLICT (hold_id) DO UPDATE SET captured_minor = 0, state = 'active'",
                event.client_hold_id, event.debit_account_id, event.credit_account_id, event.amount_minor,
                event.currency, event.expires_at, event.code, position, event.timestamp,
                stored_later(event, "external_ref"), json.dumps(stored_later(event, "metadata") or {}),
            )
        elif kind == "Hold.Captured":
            await connection.execute(
                "UPDATE ledger_holds SET captured_minor = captured_minor + $2,"
                " state = CASE WHEN captured_minor + $2 >= amount_minor THEN 'captured' ELSE state END"
                " WHERE hold_id = $1",
                event.client_hold_id, event.amount_minor,
            )
        elif kind in ("Hold.Voided", "Hold.Expired"):
            await connection.execute(
                "UPDATE ledger_holds SET state = $2 WHERE hold_id = $1",
                event.client_hold_id, "voided" if kind == "Hold.Voided" else "expired",
            )
    if transfer_columns[0]:
        await connection.execute(_POST_TRANSFERS, *transfer_columns, *leg_columns)


# ---- queries -------------------------------------------------------------------------------


_ACCOUNTS = ("SELECT a.*, b.posted_minor, b.held_minor FROM ledger_accounts a"
             " JOIN ledger_balances b ON b.account_id = a.account_id")


async def accounts_of(
    pool: asyncpg.Pool, owner_id: str, *, after: UUID | None = None, limit: int = ACCOUNTS_PAGE_SIZE_MAX,
) -> tuple[list[dict], UUID | None]:
    """An owner's accounts in the order they were opened, a page at a time; `after` is the
    last account of the previous page. They are paged by the log position of their opening,
    which never changes and no two share (times do: ADR 0002), and an account opened
    meanwhile comes after every one opened before it, so pages neither skip nor repeat one.
    Returns the page and the next page's `after`."""
    limit = max(1, min(limit, ACCOUNTS_PAGE_SIZE_MAX))
    opened_after = 0  # positions start at 1
    if after is not None:
        # The cursor must be one of this owner's accounts: an unknown one is refused, never
        # answered as "no more accounts", and another owner's answers the same as an unknown.
        opened_after = await pool.fetchval(
            "SELECT opened_position FROM ledger_accounts WHERE account_id = $1 AND owner_id = $2", after, owner_id)
        if opened_after is None:
            raise UnknownCursor("the cursor is not one of this owner's accounts; start again without a cursor")
    rows = await pool.fetch(
        f"{_ACCOUNTS} WHERE a.owner_id = $1 AND a.opened_position > $2 ORDER BY a.opened_position LIMIT $3",
        owner_id, opened_after, limit + 1,
    )
    return [_account(row) for row in rows[:limit]], rows[limit - 1]["account_id"] if len(rows) > limit else None


# A transfer `t`'s reversal `r`, if it has one (at most one: it is stored under the reversal id).
_ITS_REVERSAL = "LEFT JOIN ledger_transfers r ON r.transfer_id = t.transfer_id || '" + REVERSAL_SUFFIX + "'"
# A transfer as GET /transfers shows it: its reversal's id, if it has one, beside it.
_TRANSFER = ("SELECT t.transfer_id, t.code, t.legs, t.external_ref, t.customer_ids, t.metadata, t.posted_at,"
             " t.requested_by, t.reverses, t.reversal_reason, t.reversal_case_ref, r.transfer_id AS reversed_by"
             " FROM ledger_transfers t " + _ITS_REVERSAL)


async def transfer(pool: asyncpg.Pool, transfer_id: str) -> dict | None:
    """A posted transfer as its poster gave it, with who asked for it; and its reversal, or
    the transfer it reverses."""
    row = await pool.fetchrow(f"{_TRANSFER} WHERE t.transfer_id = $1", transfer_id)
    return _transfer(row) if row is not None else None


async def transfers_by_reference(pool: asyncpg.Pool, external_ref: str, *, after: str | None = None,
                                 limit: int = TRANSFERS_PAGE_SIZE_MAX) -> tuple[list[dict], str | None]:
    """The transfers posted with this `external_ref` (a payment, its captures, its reversal),
    in posting order (their log positions: times may tie, ADR 0002), a page at a time; `after`
    is the last transfer of the previous page, which must be one of them. Returns the page
    and the next page's `after`."""
    limit = max(1, min(limit, TRANSFERS_PAGE_SIZE_MAX))
    posted_after = 0  # positions start at 1
    if after is not None:
        posted_after = await pool.fetchval(
            "SELECT posted_position FROM ledger_transfers WHERE transfer_id = $1 AND external_ref = $2",
            after, external_ref)
        if posted_after is None:
            raise UnknownCursor("the cursor is not a transfer with this external_ref; start again without a cursor")
    rows = await pool.fetch(
        f"{_TRANSFER} WHERE t.external_ref = $1 AND t.posted_position > $2 ORDER BY t.posted_position LIMIT $3",
        external_ref, posted_after, limit + 1)
    return [_transfer(row) for row in rows[:limit]], rows[limit - 1]["transfer_id"] if len(rows) > limit else None


def _transfer(row: asyncpg.Record) -> dict:
    return {"transfer_id": row["transfer_id"], "code": row["code"], "legs": json.loads(row["legs"]),
            "external_ref": row["external_ref"], "customer_ids": list(row["customer_ids"]),
            "metadata": json.loads(row["metadata"]), "posted_at": row["posted_at"].isoformat(),
            "requested_by": row["requested_by"], "reverses": row["reverses"], "reversal_reason": row["reversal_reason"],
            "reversal_case_ref": row["reversal_case_ref"], "reversed_by": row["reversed_by"]}


async def hold(pool: asyncpg.Pool, hold_id: str) -> dict | None:
    row = await pool.fetchrow("SELECT * FROM ledger_holds WHERE hold_id = $1", hold_id)
    return _hold(row) if row is not None else None


async def holds_by_reference(pool: asyncpg.Pool, external_ref: str, *, after: int | None = None,
                             limit: int = HOLDS_PAGE_SIZE_MAX) -> tuple[list[dict], int | None]:
    """The holds placed with this `external_ref` (a card authorisation's RRN, say), live or
    finished, in the order they were placed, a page at a time; `after` is the
    `placed_position` of the last hold of the previous page. Returns the page and the next
    page's `after`."""
    limit = max(1, min(limit, HOLDS_PAGE_SIZE_MAX))
    rows = await pool.fetch("SELECT * FROM ledger_holds WHERE external_ref = $1 AND placed_position > $2"
                            " ORDER BY placed_position LIMIT $3", external_ref, after or 0, limit + 1)
    return [_hold(row) for row in rows[:limit]], rows[limit - 1]["placed_position"] if len(rows) > limit else None


def _hold(row: asyncpg.Record) -> dict:
    return {
        "hold_id": row["hold_id"],
        "state": row["state"],
        "debit_account_id": str(row["debit_account_id"]),
        "credit_account_id": str(row["credit_account_id"]),
        "currency": row["currency"],
        "amount_minor": row["amount_minor"],
        "captured_minor": row["captured_minor"],
        # A voided or expired hold released the rest; a captured one has none left.
        "remaining_minor": row["amount_minor"] - row["captured_minor"] if row["state"] == "active" else 0,
        "code": row["code"],
        "external_ref": row["external_ref"],
        "metadata": json.loads(row["metadata"]),
        "placed_at": row["placed_at"].isoformat(),
        "expires_at": row["expires_at"].isoformat(),
    }


# An account's pending holds, newest first: each side read along its own index in order,
# so a page reads at most `limit` rows of each however many holds the account has.
_PENDING_HOLDS = """
(SELECT *, credit_account_id AS counterparty_account_id, -1 AS sign FROM ledger_holds
 WHERE debit_account_id = $1 AND state = 'active' AND placed_position < $2 ORDER BY placed_position DESC LIMIT $3)
UNION ALL
(SELECT *, debit_account_id AS counterparty_account_id, 1 AS sign FROM ledger_holds
 WHERE credit_account_id = $1 AND state = 'active' AND placed_position < $2 ORDER BY placed_position DESC LIMIT $3)
ORDER BY placed_position DESC LIMIT $3
"""


async def pending_holds(pool: asyncpg.Pool, account_id, *, before: int | None = None, limit: int = PAGE_SIZE_MAX
                        ) -> tuple[list[dict], int | None]:
    """The account's live holds, newest first, a page at a time: what they still reserve of
    its money (negative) or will pay into it (positive). `before` is the `placed_position`
    of the last hold of the previous page; returns the next page's."""
    limit = max(1, min(limit, PAGE_SIZE_MAX))
    rows = await pool.fetch(_PENDING_HOLDS, account_id, before if before is not None else _EVERY_POSITION, limit + 1)
    holds = [{
        "hold_id": row["hold_id"],
        "code": row["code"],
        "external_ref": row["external_ref"],
        "metadata": json.loads(row["metadata"]),
        "amount_minor": row["sign"] * (row["amount_minor"] - row["captured_minor"]),
        "captured_minor": row["captured_minor"],
        "counterparty_account_id": str(row["counterparty_account_id"]),
        "placed_at": row["placed_at"].isoformat(),
        "expires_at": row["expires_at"].isoformat(),
    } for row in rows[:limit]]
    return holds, rows[limit - 1]["placed_position"] if len(rows) > limit else None


async def account(pool: asyncpg.Pool, account_id) -> dict | None:
    row = await pool.fetchrow(f"{_ACCOUNTS} WHERE a.account_id = $1", account_id)
    return _account(row) if row else None


def _account(row: asyncpg.Record) -> dict:
    posted, held, limit = row["posted_minor"], row["held_minor"], row["credit_limit_minor"]
    return {
        "account_id": str(row["account_id"]),
        "owner_id": row["owner_id"],
        "kind": row["kind"],
        "currency": row["currency"],
        "state": row["state"],
        "freeze_reasons": list(row["freeze_reasons"]),
        "close_reason": row["close_reason"],
        "credit_limit_minor": limit,
        "balances": {
            "posted": {"amount_minor": posted, "currency": row["currency"]},
            "pending": {"amount_minor": held, "currency": row["currency"]},
            # What may be spent now: a frozen account may not be debited (until unfrozen), a
            # closed one ever again, so their money and credit limit are no money to spend.
            "available": {"amount_minor": 0 if row["state"] in ("frozen", "closed") else available_minor(posted, held, limit),
                          "currency": row["currency"]},
        },
        "opened_at": row["opened_at"].isoformat(),
    }


# The balance at an instant is what stood just before it: entries posted at that very
# instant belong to the period it opens. So a statement for [since, until) opens at the
# balance at `since` and closes at the balance at `until`, and consecutive ones chain.
# Its credits so far come with it (a statement's totals are two of these apart).
_BALANCE_AT = ("SELECT balance_after_minor, credits_after_minor FROM ledger_entries WHERE account_id = $1"
               " AND occurred_at < $2 AND position <= $3 ORDER BY occurred_at DESC, position DESC, seq DESC LIMIT 1")
# Counting every entry: no log position is past bigint. (A statement counts entries up to its `as_of`.)
_EVERY_POSITION = 2**63 - 1


async def balance_at(pool: asyncpg.Pool, account_id, instant: datetime) -> int:
    return await pool.fetchval(_BALANCE_AT, account_id, instant, _EVERY_POSITION) or 0


# An account's entries read along its time index (account, time, position, seq): posting
# times never go back along the log (ADR-0002), so this is log order, and a period's entries
# are one range of that index however old the period; in log order by position alone, the
# server would sort the whole period, or read every newer entry, for each page.
_NEWEST_FIRST = "e.occurred_at DESC, e.position DESC, e.seq DESC"
# The time of a page cursor's entry (`position`, `seq`: parameters), where the next page's
# range starts; a cursor that names no entry of the account bounds nothing (`missing`).
_CURSOR_TIME = ("coalesce((SELECT c.occurred_at FROM ledger_entries c WHERE c.account_id = $1"
                " AND c.position = {position} AND c.seq = {seq}), '{missing}')")
# A history or statement line: the entry `e`, what its transfer says, and the reversal either way.
_LINE_COLUMNS = "e.*, t.legs, t.external_ref, t.metadata, t.reverses, r.transfer_id AS reversed_by"
_LINE_TRANSFER = "LEFT JOIN ledger_transfers t USING (transfer_id) " + _ITS_REVERSAL


async def history(
    pool: asyncpg.Pool,
    account_id,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    amount_min_minor: int | None = None,
    amount_max_minor: int | None = None,
    counterparty_account_id: str | None = None,
    code: str | None = None,
    after: tuple[int, int] | None = None,
    limit: int = 50,
) -> tuple[list[dict], tuple[int, int] | None]:
    """Newest first; `after` is the (position, seq) cursor of the last line of the previous page.

    A page reads at most HISTORY_SCAN_ROWS_MAX of the account's entries: a filter that
    matches rarely (a counterparty, an amount) on a bank account with millions of entries
    must not read them all for one page. So a page may hold fewer lines than asked, even
    none, with a `next_cursor` to go on from where it stopped; no cursor means the end."""
    limit = max(1, min(limit, PAGE_SIZE_MAX))
    scanned = ["e.account_id = $1"]  # which entries a page reads: the account's, in the period, past the cursor
    matched: list[str] = []  # which of those it shows
    args: list[Any] = [account_id]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if since is not None:
        scanned.append(f"e.occurred_at >= {arg(since)}")
    if until is not None:
        scanned.append(f"e.occurred_at < {arg(until)}")
    if after is not None:
        position, seq = arg(after[0]), arg(after[1])
        scanned.append(f"(e.position, e.seq) < ({position}, {seq})")
        scanned.append(f"e.occurred_at <= {_CURSOR_TIME.format(position=position, seq=seq, missing='infinity')}")
    if amount_min_minor is not None:
        matched.append(f"abs(e.amount_minor) >= {arg(amount_min_minor)}")
    if amount_max_minor is not None:
        matched.append(f"abs(e.amount_minor) <= {arg(amount_max_minor)}")
    if code is not None:
        matched.append(f"e.code = {arg(code)}")
    if counterparty_account_id is not None:
        matched.append(
            "EXISTS (SELECT 1 FROM jsonb_array_elements(t.legs) leg"
            f" WHERE leg->>'account_id' = {arg(counterparty_account_id)}"
            "  AND sign((leg->>'amount_minor')::bigint) <> sign(e.amount_minor))"  # the other side only, as _counterparties
        )
    if not matched:  # every entry read is shown: the page reads limit + 1 of them, no more
        rows = await pool.fetch(_page_rows("ledger_entries", " AND ".join(scanned), _NEWEST_FIRST, limit + 1), *args)
        return _page(rows, limit)
    # One statement, so that the window read, the lines found in it and where it stopped
    # agree (a second would see newer entries and shift the window).
    rows = await pool.fetch(
        f"WITH window_read AS (SELECT e.* FROM ledger_entries e WHERE {' AND '.join(scanned)}"
        f"  ORDER BY {_NEWEST_FIRST} LIMIT {arg(HISTORY_SCAN_ROWS_MAX)}),"
        " edge AS (SELECT count(*) AS read_count, min(position) AS position FROM window_read),"
        " edge_seq AS (SELECT min(w.seq) AS seq FROM window_read w, edge WHERE w.position = edge.position)"
        " SELECT edge.read_count, edge.position AS edge_position, edge_seq.seq AS edge_seq, page.*"
        " FROM edge CROSS JOIN edge_seq LEFT JOIN LATERAL ("
        f"  {_page_rows('window_read', ' AND '.join(matched), 'e.position DESC, e.seq DESC', limit + 1)}"
        " ) page ON true",
        *args,
    )
    found = [row for row in rows if row["position"] is not None]
    lines, cursor = _page(found, limit)
    if cursor is None and rows and rows[0]["read_count"] == HISTORY_SCAN_ROWS_MAX:
        cursor = (rows[0]["edge_position"], rows[0]["edge_seq"])  # the page stopped reading here: go on from it
    return lines, cursor


# A line carries its transfer's metadata and counterparties: up to about 100 KB a line, at
# the most the ledger takes (32 keys and values of 256 characters, up to 6 bytes each in
# JSON). So a page also ends once its lines pass this many bytes, with a cursor to go on
# from: any page can then be passed on whole (the gateway takes answers of up to 16 MiB
# from the ledger), whatever its line count.
PAGE_LINES_BYTES_MAX = 4 * 2**20
_LINE_FIXED_BYTES = 512  # its ids, amounts and times


def _page(rows: Sequence[asyncpg.Record], limit: int) -> tuple[list[dict], tuple[int, int] | None]:
    """The lines of a page, from the rows of `_page_rows` (fetched one past `limit`): up to
    `limit` of them, fewer once they pass PAGE_LINES_BYTES_MAX; and the next page's cursor,
    the last line shown, when a row follows it."""
    lines = [_line(row) for row in itertools.takewhile(
        lambda row: row["bytes_before"] < PAGE_LINES_BYTES_MAX, rows[:limit])]
    last = rows[len(lines) - 1] if len(rows) > len(lines) else None
    return lines, (last["position"], last["seq"]) if last is not None else None


# A line's bytes: counted as stored, for a line shows no more of its transfer than its legs
# and metadata (jsonb's text, UTF-8, which is what asyncpg hands over), and the fixed part.
_LINE_BYTES = (f"{_LINE_FIXED_BYTES} + coalesce(octet_length(t.legs::text), 0)"
               " + coalesce(octet_length(t.metadata::text), 0)")


def _page_rows(entries: str, where: str, order: str, limit: int | str) -> str:
    """The query of a page's rows for _page: the lines of `entries` (as `e`) where `where`,
    in `order`, up to `limit` of them, and of those only what _page reads, each with the
    bytes of the lines before it (`bytes_before`).

    A page ends once its lines pass PAGE_LINES_BYTES_MAX, and a line may carry 100 KB: a
    statement page of 5,000 such would be 500 MB in the ledger's memory (the bank's only
    writer) to show some 40 of them. So PostgreSQL sums the lines' bytes in the page's
    order, and sends a row only while the one before it is still within the budget: the
    lines _page shows, and the one row after them that tells it another page follows."""
    return (
        f"SELECT * FROM (SELECT {_LINE_COLUMNS},"
        f"  coalesce(sum({_LINE_BYTES}) OVER (ORDER BY {order} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)"
        "   AS bytes_before,"
        f"  coalesce(sum({_LINE_BYTES}) OVER (ORDER BY {order} ROWS BETWEEN UNBOUNDED PRECEDING AND 2 PRECEDING), 0)"
        "   AS bytes_before_previous"
        f"  FROM {entries} e {_LINE_TRANSFER} WHERE {where or 'true'} ORDER BY {order} LIMIT {limit}) e"
        f" WHERE bytes_before_previous < {PAGE_LINES_BYTES_MAX} ORDER BY {order}"
    )


def _counterparties(legs: list[dict], amount_minor: int) -> list[str]:
    """Who was on the other side of a line: the accounts its money came from (a credit) or
    went to (a debit). Not every other leg: one payroll would show each employee the others'."""
    return sorted({leg["account_id"] for leg in legs if (leg["amount_minor"] > 0) != (amount_minor > 0)})


def _line(row: asyncpg.Record) -> dict:
    legs = json.loads(row["legs"]) if row["legs"] else []
    return {
        "transfer_id": row["transfer_id"],
        "code": row["code"],
        "amount_minor": row["amount_minor"],
        "balance_after_minor": row["balance_after_minor"],
        "occurred_at": row["occurred_at"].isoformat(),
        "counterparty_account_ids": _counterparties(legs, row["amount_minor"]),
        "external_ref": row["external_ref"],
        "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
        "reverses": row["reverses"],
        "reversed_by": row["reversed_by"],
    }


STATEMENT_PAGE_LINES_MAX = 5_000


async def statement(
    pool: asyncpg.Pool, account_id, since: datetime, until: datetime, *,
    after: tuple[int, int] | None = None, as_of: int | None = None, limit: int = STATEMENT_PAGE_LINES_MAX,
) -> tuple[dict, tuple[int, int, int] | None]:
    """A statement for [since, until): opening and closing balances and the period's credit
    and debit totals, with its lines in posting order, a page at a time (a business or
    internal account may post millions of lines in a month). `after` is the (position, seq)
    of the last line of the previous page. Returns the statement and the next page's cursor,
    (position, seq, as_of).

    A period still open (this month) gains lines while its pages are being fetched. So one
    statement is read as of its first page: `as_of` is the account's last log position then,
    and every later page counts only entries up to it, giving the same totals and the lines
    that add up to them. A line posted meanwhile is on the next statement asked for."""
    limit = max(1, min(limit, STATEMENT_PAGE_LINES_MAX))
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        if as_of is None:
            as_of = await connection.fetchval(
                "SELECT coalesce(max(position), 0) FROM ledger_entries WHERE account_id = $1", account_id,
            )
        # Posting times never go back along the log, so the period's entries (up to as_of)
        # are those after the opening's entry up to the closing's: their credits are the
        # difference of the two running sums (numeric, exact, made an int: never a float).
        opening, opening_credits = await connection.fetchrow(_BALANCE_AT, account_id, since, as_of) or (0, 0)
        closing, closing_credits = await connection.fetchrow(_BALANCE_AT, account_id, until, as_of) or (0, 0)
        credits = int(closing_credits - opening_credits)
        debits = credits - (closing - opening)
        rows = await connection.fetch(
            _page_rows(
                "ledger_entries",
                "e.account_id = $1 AND e.occurred_at >= $2 AND e.occurred_at < $3 AND (e.position, e.seq) > ($4, $5)"
                f" AND e.occurred_at >= {_CURSOR_TIME.format(position='$4', seq='$5', missing='-infinity')}"
                " AND e.position <= $6",
                "e.occurred_at, e.position, e.seq", "$7",
            ),
            account_id, since, until, *(after or (0, -1)), as_of, limit + 1,
        )
    lines, next_after = _page(rows, limit)
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "opening_balance_minor": opening,
        "closing_balance_minor": closing,
        "credits_minor": credits,
        "debits_minor": debits,
        "lines": lines,
    }, (*next_after, as_of) if next_after else None
