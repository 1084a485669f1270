"""`kabinet ledger verify`: what an auditor checks before trusting the books.

1. every transfer's legs sum to zero per currency;
2. the trial balance is zero per currency;
3. every account's balance equals the sum of its legs in transfers;
4. every account's stored state (as the event store rebuilds it) equals what its events say;
5. the read model equals the event store (balances, holds, states, entry counts), and is caught up;
6. no customer account is below its credit limit.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from ledger.application import LedgerApplication

PAGE_SIZE = 5000
PAGES_MAX = 1_000_000  # 5 billion events: a limit, not an expectation
INTERNAL_OWNER = "bank"


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
    entries_minor: int = 0
    entries_count: int = 0
    held_minor: int = 0
    legs_minor: int = 0


def read_event_store(app: LedgerApplication) -> tuple[dict[UUID, _Account], list[str], int, int]:
    accounts: dict[UUID, _Account] = defaultdict(_Account)
    unbalanced: list[str] = []
    last_position = 0
    events_read = 0
    for _ in range(PAGES_MAX):
        page = app.recorder.select_notifications(start=last_position, limit=PAGE_SIZE, inclusive_of_start=False)
        if not page:
            break
        for notification in page:
            event = app.mapper.to_domain_event(notification)
            kind = type(event).__qualname__
            if kind == "Account.Opened":
                account = accounts[event.originator_id]
                account.currency, account.owner_id = event.currency, event.owner_id
                account.credit_limit_minor = event.credit_limit_minor
            elif kind == "Account.CreditLimitSet":
                accounts[event.originator_id].credit_limit_minor = event.credit_limit_minor
            elif kind in ("Account.Frozen", "Account.Unfrozen", "Account.Closed"):
                accounts[event.originator_id].state = {"Account.Frozen": "frozen", "Account.Unfrozen": "open",
                                                       "Account.Closed": "closed"}[kind]
            elif kind == "Account.Posted":
                account = accounts[event.originator_id]
                account.entries_minor += sum(e["amount_minor"] for e in event.entries)
                account.entries_count += len(event.entries)
            elif kind == "Account.HoldsChanged":
                accounts[event.originator_id].held_minor += sum(ch["held_delta_minor"] for ch in event.changes)
            elif kind == "Transfer.Posted":
                sums: dict[str, int] = defaultdict(int)
                for leg in event.legs:
                    sums[leg["currency"]] += leg["amount_minor"]
                    accounts[UUID(leg["account_id"])].legs_minor += leg["amount_minor"]
                if any(sums.values()):
                    unbalanced.append(f"transfer {event.client_transfer_id} is off by {dict(sums)}")
        last_position = page[-1].id
        events_read += len(page)
    return accounts, unbalanced, last_position, events_read


async def verify(app: LedgerApplication, database_url: str) -> Report:
    import anyio

    report = Report()
    accounts, unbalanced, last_position, report.events_read = await anyio.to_thread.run_sync(read_event_store, app)
    report.add("transfers balance", unbalanced, "every transfer's legs sum to zero per currency")

    totals: dict[str, int] = defaultdict(int)
    for account in accounts.values():
        totals[account.currency] += account.entries_minor
    report.add("trial balance", [f"{cur} off by {total}" for cur, total in totals.items() if total],
               "zero in " + (", ".join(sorted(totals)) or "no currency"))

    report.add("balances equal legs", [
        f"account {aid}: balance {a.entries_minor} but legs {a.legs_minor}" for aid, a in accounts.items()
        if a.entries_minor != a.legs_minor
    ], f"{len(accounts)} accounts")

    def stored_states() -> list[str]:
        problems = []
        for account_id, expected in accounts.items():
            stored = app.repository.get(account_id)
            if (stored.posted_minor, stored.held_minor, stored.state) != (expected.entries_minor, expected.held_minor, expected.state):
                problems.append(f"account {account_id}: rebuilt {stored.posted_minor}/{stored.held_minor}/{stored.state},"
                                f" events say {expected.entries_minor}/{expected.held_minor}/{expected.state}")
        return problems

    report.add("aggregates rebuild", await anyio.to_thread.run_sync(stored_states), "snapshots and events agree")

    report.add("no forbidden overdraft", [
        f"account {aid}: {a.entries_minor - a.held_minor} below limit {a.credit_limit_minor}"
        for aid, a in accounts.items()
        if a.owner_id != INTERNAL_OWNER and a.entries_minor - a.held_minor < -a.credit_limit_minor
    ], "customer accounts within their limits")

    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        position = await connection.fetchval(
            "SELECT position FROM projection_position WHERE projection = 'ledger_read_model'"
        ) or 0
        rows = await connection.fetch(
            "SELECT a.account_id, a.posted_minor, a.held_minor, a.state,"
            " (SELECT count(*) FROM ledger_entries e WHERE e.account_id = a.account_id) AS entries"
            " FROM ledger_accounts a"
        )
    finally:
        await connection.close()
    problems = [] if position >= last_position else [f"read model at position {position}, event store at {last_position}"]
    seen = set()
    for row in rows:
        seen.add(row["account_id"])
        expected = accounts.get(row["account_id"])
        if expected is None:
            problems.append(f"read model has account {row['account_id']} the event store does not")
            continue
        got = (row["posted_minor"], row["held_minor"], row["state"], row["entries"])
        want = (expected.entries_minor, expected.held_minor, expected.state, expected.entries_count)
        if got != want:
            problems.append(f"account {row['account_id']}: read model {got}, event store {want}")
    problems += [f"account {aid} missing from the read model" for aid in accounts.keys() - seen]
    report.add("read model equals event store", problems, f"{len(rows)} accounts, up to position {position}")
    return report
