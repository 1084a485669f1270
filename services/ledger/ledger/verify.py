"""`kabinet ledger verify`: what an auditor checks before trusting the books.

Everything is recomputed from the event store and compared with what the ledger serves:
1. every transfer's legs sum to zero per currency;
2. the trial balance is zero per currency;
3. every saved balance equals the sum of its account's legs, and its held amount the
   sum of its live holds;
4. every account rebuilt from its events has the state and credit limit its events say;
5. the read model equals the event store at the read model's own position (account
   states, entry counts, last running balances; every hold's accounts, amounts, state and
   deadline, which the expiry sweep acts on; the number of transfers), and reached the
   log's head as verify began;
6. no customer account is below its credit limit.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import asyncpg

from kabinet_chassis.eventstore import events_table
from kabinet_contracts.ledger import BANK_OWNER_ID
from ledger.application import LedgerApplication

PAGE_SIZE = 5000
PAGES_MAX = 1_000_000  # 5 billion events: a limit, not an expectation
CATCH_UP_WAIT_S = 30.0  # how long the read model may take to reach the head verify began at
CATCH_UP_POLL_S = 0.05


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    events_read: int = 0

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, name: str, problems: list[str], passed: str) -> None:
        shown = "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        self.checks.append(Check(name, not problems, shown if problems else passed))


@dataclass
class _Account:
    currency: str = "?"
    owner_id: str = "?"
    credit_limit_minor: int = 0
    state: str = "open"
    legs_minor: int = 0
    legs_count: int = 0
    held_minor: int = 0
    version: int = 0  # of the account's own stream, at the snapshot

    def as_read_model_shows_it(self) -> tuple[str, int, int, int]:
        return self.state, self.credit_limit_minor, self.legs_count, self.legs_minor


@dataclass
class _Hold:
    debit_account_id: UUID
    credit_account_id: UUID
    amount_minor: int
    currency: str
    expires_at: datetime
    captured_minor: int = 0
    state: str = "active"

    def as_read_model_shows_it(self) -> tuple:
        """In the order of _HOLD_COLUMNS (after the id)."""
        return (self.debit_account_id, self.credit_account_id, self.amount_minor, self.captured_minor, self.currency,
                self.state, self.expires_at)


@dataclass
class _ReadModelView:
    """What the read model should show at a position."""

    accounts: dict[UUID, tuple]  # as _Account.as_read_model_shows_it
    holds: dict[str, tuple]  # client hold id: as _Hold.as_read_model_shows_it
    transfers: int


_HOLD_COLUMNS = "hold_id, debit_account_id, credit_account_id, amount_minor, captured_minor, currency, state, expires_at"


def read_event_store(
    app: LedgerApplication, up_to: int, read_model_at: int
) -> tuple[dict[UUID, _Account], _ReadModelView, list[str], int]:
    """Every account as its events up to `up_to` say, and what the read model should show
    at position `read_model_at`; unbalanced transfers; events read."""
    accounts: dict[UUID, _Account] = defaultdict(_Account)
    holds: dict[str, _Hold] = {}  # by client hold id
    transfers = 0
    at_read_model: _ReadModelView | None = None

    def view() -> _ReadModelView:
        return _ReadModelView({aid: account.as_read_model_shows_it() for aid, account in accounts.items()},
                              {hold_id: hold.as_read_model_shows_it() for hold_id, hold in holds.items()}, transfers)

    unbalanced: list[str] = []
    last_position = 0
    events_read = 0
    for _ in range(PAGES_MAX):
        page = app.recorder.select_notifications(start=last_position, stop=up_to, limit=PAGE_SIZE, inclusive_of_start=False)
        if not page:
            break
        for notification in page:
            if at_read_model is None and notification.id > read_model_at:
                at_read_model = view()
            event = app.mapper.to_domain_event(notification)
            kind = type(event).__qualname__
            if kind.startswith("Account."):
                accounts[event.originator_id].version = event.originator_version
            if kind == "Account.Opened":
                account = accounts[event.originator_id]
                account.currency, account.owner_id = event.currency, event.owner_id
                account.credit_limit_minor = event.credit_limit_minor
            elif kind == "Account.CreditLimitSet":
                accounts[event.originator_id].credit_limit_minor = event.credit_limit_minor
            elif kind in ("Account.Frozen", "Account.Unfrozen", "Account.Closed"):
                accounts[event.originator_id].state = {"Account.Frozen": "frozen", "Account.Unfrozen": "open",
                                                       "Account.Closed": "closed"}[kind]
            elif kind == "Transfer.Posted":
                transfers += 1
                sums: dict[str, int] = defaultdict(int)
                for leg in event.legs:
                    sums[leg["currency"]] += leg["amount_minor"]
                    account = accounts[UUID(leg["account_id"])]
                    account.legs_minor += leg["amount_minor"]
                    account.legs_count += 1
                if any(sums.values()):
                    unbalanced.append(f"transfer {event.client_transfer_id} is off by {dict(sums)}")
            elif kind == "Hold.Placed":
                accounts[UUID(event.debit_account_id)].held_minor += event.amount_minor
                holds[event.client_hold_id] = _Hold(UUID(event.debit_account_id), UUID(event.credit_account_id),
                                                    event.amount_minor, event.currency, event.expires_at)
            elif kind == "Hold.Captured":
                hold = holds[event.client_hold_id]
                accounts[hold.debit_account_id].held_minor -= event.amount_minor
                hold.captured_minor += event.amount_minor
                if hold.captured_minor >= hold.amount_minor:
                    hold.state = "captured"
            elif kind in ("Hold.Voided", "Hold.Expired"):
                hold = holds[event.client_hold_id]
                accounts[hold.debit_account_id].held_minor -= event.released_minor
                hold.state = "voided" if kind == "Hold.Voided" else "expired"
        last_position = page[-1].id
        events_read += len(page)
    if at_read_model is None:
        at_read_model = view()
    return accounts, at_read_model, unbalanced, events_read


async def _wait_for_read_model(connection: asyncpg.Connection, position: int) -> None:
    """Give the read model a bounded time to reach `position` (a live ledger keeps writing)."""
    for _ in range(int(CATCH_UP_WAIT_S / CATCH_UP_POLL_S)):
        reached = await connection.fetchval(
            "SELECT position FROM projection_position WHERE projection = 'ledger_read_model'"
        ) or 0
        if reached >= position:
            return
        await asyncio.sleep(CATCH_UP_POLL_S)


async def verify(app: LedgerApplication, database_url: str) -> Report:
    import anyio

    report = Report()
    # One snapshot of what the ledger serves, then the events up to that snapshot: balances
    # commit with their events, and the read model is compared at its own position, so a
    # ledger that keeps writing still verifies.
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        head_at_start = await connection.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {events_table(app.recorder)}")
        await _wait_for_read_model(connection, head_at_start)
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            up_to = await connection.fetchval(
                f"SELECT coalesce(max(notification_id), 0) FROM {events_table(app.recorder)}"
            )
            balances = {row["account_id"]: (row["posted_minor"], row["held_minor"]) for row in
                        await connection.fetch("SELECT account_id, posted_minor, held_minor FROM ledger_balances")}
            position = await connection.fetchval(
                "SELECT position FROM projection_position WHERE projection = 'ledger_read_model'"
            ) or 0
            rows = await connection.fetch(
                "SELECT a.account_id, a.state, a.credit_limit_minor, count(e.account_id) AS entries,"
                " (SELECT balance_after_minor FROM ledger_entries last WHERE last.account_id = a.account_id"
                "  ORDER BY position DESC, seq DESC LIMIT 1) AS balance_after_minor"
                " FROM ledger_accounts a LEFT JOIN ledger_entries e ON e.account_id = a.account_id GROUP BY a.account_id"
            )
            hold_rows = await connection.fetch(f"SELECT {_HOLD_COLUMNS} FROM ledger_holds")
            transfers_shown = await connection.fetchval("SELECT count(*) FROM ledger_transfers")
    finally:
        await connection.close()
    accounts, at_read_model, unbalanced, report.events_read = await anyio.to_thread.run_sync(
        read_event_store, app, up_to, position
    )
    report.add("transfers balance", unbalanced, "every transfer's legs sum to zero per currency")

    totals: dict[str, int] = defaultdict(int)
    for account in accounts.values():
        totals[account.currency] += account.legs_minor
    report.add("trial balance", [f"{cur} off by {total}" for cur, total in totals.items() if total],
               "zero in " + (", ".join(sorted(totals)) or "no currency"))

    problems = [f"account {aid} has no saved balance" for aid in accounts.keys() - balances.keys()]
    problems += [f"a balance is saved for {aid}, which the event store has no account for"
                 for aid in balances.keys() - accounts.keys()]
    problems += [
        f"account {aid}: saved balance {balances[aid][0]}/{balances[aid][1]} held, legs and holds say {a.legs_minor}/{a.held_minor}"
        for aid, a in accounts.items() if aid in balances and balances[aid] != (a.legs_minor, a.held_minor)
    ]
    report.add("balances equal legs and holds", problems, f"{len(balances)} accounts")

    def stored_states() -> list[str]:
        problems = []
        for account_id, expected in accounts.items():
            stored = app.repository.get(account_id, version=expected.version)  # as of the snapshot
            if (stored.state, stored.credit_limit_minor) != (expected.state, expected.credit_limit_minor):
                problems.append(f"account {account_id}: rebuilt {stored.state}/{stored.credit_limit_minor},"
                                f" events say {expected.state}/{expected.credit_limit_minor}")
        return problems

    report.add("aggregates rebuild", await anyio.to_thread.run_sync(stored_states), "accounts and their events agree")

    report.add("no forbidden overdraft", [
        f"account {aid}: {a.legs_minor - a.held_minor} below limit {a.credit_limit_minor}"
        for aid, a in accounts.items()
        if a.owner_id != BANK_OWNER_ID and a.legs_minor - a.held_minor < -a.credit_limit_minor
    ], "customer accounts within their limits")

    problems = [] if position >= head_at_start else [
        f"read model at position {position} did not reach {head_at_start}, the head when verify began,"
        f" within {CATCH_UP_WAIT_S:.0f} s"]
    seen = set()
    for row in rows:
        seen.add(row["account_id"])
        want = at_read_model.accounts.get(row["account_id"])
        if want is None:
            problems.append(f"read model has account {row['account_id']} the event store does not (at {position})")
            continue
        got = (row["state"], row["credit_limit_minor"], row["entries"], row["balance_after_minor"] or 0)
        if got != want:
            problems.append(f"account {row['account_id']}: read model {got}, event store {want}")
    problems += [f"account {aid} missing from the read model" for aid in at_read_model.accounts.keys() - seen]
    shown_holds = {row["hold_id"]: tuple(row)[1:] for row in hold_rows}
    problems += [f"hold {hold_id}: read model {shown_holds.get(hold_id)}, event store {want}"
                 for hold_id, want in at_read_model.holds.items() if shown_holds.get(hold_id) != want]
    problems += [f"read model has hold {hold_id} the event store does not (at {position})"
                 for hold_id in shown_holds.keys() - at_read_model.holds.keys()]
    if transfers_shown != at_read_model.transfers:
        problems.append(f"read model has {transfers_shown} transfers, event store {at_read_model.transfers} (at {position})")
    report.add("read model equals event store", problems,
               f"{len(rows)} accounts, {len(hold_rows)} holds, {transfers_shown} transfers at position {position}"
               f" (event store at {up_to})")
    return report
