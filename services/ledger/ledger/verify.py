"""`kabinet ledger verify`: what an auditor checks before trusting the books.

Everything is recomputed from the event store and compared with what the ledger serves:
1. every event replays: each leg and hold names an opened account in its currency, each
   capture, void or expiry a placed hold, each transfer the customers owning its legs'
   accounts, whom it is published for (an event store missing one is reported, not
   crashed on);
2. every transfer's legs sum to zero per currency;
3. the trial balance is zero per currency;
4. every saved balance equals the sum of its account's legs, its held amount the sum of
   its live holds, and what live holds will pay into it the sum of what they have left;
5. every account and hold rebuilt from its events, as the writer rebuilds it (its stream in
   version order, each event's own mutator), stands as its events say in log order: an
   account's state and credit limit, a hold's state and what it has captured and released;
6. the read model equals the event store at the read model's own position, row by row
   and column by column: every account (owner, kind, currency, state, credit limit,
   opening and last change times), every entry (account, position, seq, transfer, code,
   amount, running balance and credits, time), every transfer (code, legs, references, customers,
   metadata, posting time, who asked, what it reverses, why and on which case) and every hold
   (accounts, amounts, state, deadline, which the expiry sweep acts on, code, references,
   when it was placed);
   and it reached the log's head as verify began;
7. no customer account is below its credit limit;
8. the events keep the order the writer writes them in: each stream's versions one by one
   along the log, posting times never going back, transfers and holds under the ids their
   client ids make (a copied or reordered event shows);
9. holds add up: a hold reserves and a capture takes a positive amount, no capture takes
   more than is left, a void or expiry releases exactly what
   is left, nothing follows a finished hold, each capture's transfer moves what its hold says
   and carries its references; and each reversal moves back exactly the legs of the transfer
   it names, once, after it in the log, for a reason the bank has;
10. the log ends where the ledger last wrote: the posting clock is the newest event's time,
   and no read model or relay position is past it (the newest event deleted shows);
11. the events table and its seals are append-only: their guards refuse every UPDATE,
   DELETE and TRUNCATE, always (kabinet_chassis.append_only);
12. the history matches its seals: each seal's range of events, hashed again, gives the
   link the seal stored, and the seal's signature is the seal key's, checked with its
   public key (kabinet_chassis.history_seals). This one sees what
   the rules above cannot: an event changed or deleted together with everything derived
   from it, when it breaks none of them (a plain transfer's amounts on both legs, a whole
   transfer from the middle of the log, the newest sealed with the posting clock and
   positions put back too). Events of the last seconds, not sealed yet, are counted. The
   last seal is shown as a receipt: given to a later verify (`noted_seal`), it must still
   be there, which catches seals cut from the end together with their events.

Memory stays bounded by the number of accounts and holds (about 1 KB an account and 450
bytes a hold, bench/verify.py), not of entries or transfers: the events are replayed a page
at a time, and each page's entries and transfers are compared with the read model's as the
replay goes (entries stream from a cursor in log order, transfers are looked up by id); the
read model's accounts and holds, and the saved balances, stream from a cursor after the
replay, each row looked up among the replayed ones. All in one repeatable-read snapshot of
the read model, from which the events are read too.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from sys import intern
from typing import Any
from uuid import UUID

import asyncpg
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import Notification

from kabinet_chassis import append_only, history_seals
from kabinet_chassis.eventstore import events_table, notifications_after
from kabinet_chassis.settings import ServiceSettings
from kabinet_contracts.ledger import BANK_OWNER_ID
from ledger import projections
from ledger.application import LedgerApplication
from ledger.domain.account import freezes_after
from ledger.domain.batch import reversal_transfer_id
from ledger.domain.commands import REVERSAL_REASONS
from ledger.domain.hold import Hold
from ledger.domain.stored import stored_later
from ledger.domain.transfer import Transfer, customers_of
from ledger.integration import SOURCE

PAGE_SIZE = 5000
PAGES_MAX = 1_000_000  # 5 billion events: a limit, not an expectation
CATCH_UP_WAIT_S = 30.0  # how long the read model may take to reach the head verify began at
CATCH_UP_POLL_S = 0.05
# The most one statement may take: far above the largest (counting every transfer), so
# that only a database that hangs runs into it; verify then ends as "could not read"
# instead of waiting for ever.
VERIFY_STATEMENT_TIMEOUT_S = 600.0
PROBLEMS_SHOWN = 10
# What verify is doing as it tells its progress: two passes over the history.
REPLAYING = "events replayed"
CHECKING_SEALS = "seals checked"
VALUE_SHOWN_MAX = 200  # characters of one value in a problem line


@dataclass
class Check:
    name: str
    ok: bool
    detail: str  # what passed, or the problems shown one a line and how many more
    problems: list[str] = field(default_factory=list)  # the first PROBLEMS_SHOWN
    problems_count: int = 0


class Problems:
    """What a check found wrong: every problem counted, the first few kept to show (a
    read model wrong in every row must not fill memory with millions of lines)."""

    def __init__(self, problems: Iterable[str] = ()) -> None:
        self.shown: list[str] = []
        self.count = 0
        self.extend(problems)

    def append(self, problem: str) -> None:
        self.count += 1
        if len(self.shown) < PROBLEMS_SHOWN:
            self.shown.append(problem)

    def extend(self, problems: Iterable[str]) -> None:
        for problem in problems:
            self.append(problem)

    def __len__(self) -> int:
        return self.count

    @classmethod
    def counted(cls, shown: Iterable[str], count: int) -> Problems:
        """Problems another module found: the first few it kept, and how many there were."""
        problems = cls(shown)
        problems.shown = problems.shown[:PROBLEMS_SHOWN]
        problems.count = count
        return problems

    @classmethod
    def joined(cls, *parts: Problems) -> Problems:
        joined = cls()
        for part in parts:
            joined.shown.extend(part.shown[:PROBLEMS_SHOWN - len(joined.shown)])
            joined.count += part.count
        return joined


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    events_read: int = 0
    last_seal: str | None = None  # the newest seal's receipt, for the next verify's `noted_seal` (None: no seal, or seals that failed)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, name: str, problems: Iterable[str] | Problems, passed: str) -> None:
        if not isinstance(problems, Problems):
            problems = Problems(problems)
        more = problems.count - len(problems.shown)
        shown = "\n".join(problems.shown) + (f" (+{more} more)" if more else "")
        self.checks.append(Check(name, not problems.count, shown if problems.count else passed, problems.shown,
                                 problems.count))

    def as_json(self) -> dict[str, Any]:
        """For auditors' tools: the verdict, the receipt to note for the next run, and each
        check with its problems (the first PROBLEMS_SHOWN of them, and how many there are)."""
        return {"ok": self.ok, "events_read": self.events_read, "last_seal": self.last_seal, "checks": [
            {"name": check.name, "ok": check.ok, "detail": None if check.problems_count else check.detail,
             "problems_count": check.problems_count, "problems": check.problems} for check in self.checks]}


def _shown(value: Any) -> str:
    text = repr(value.isoformat() if isinstance(value, datetime) else str(value) if isinstance(value, UUID) else value)
    return text if len(text) <= VALUE_SHOWN_MAX else text[:VALUE_SHOWN_MAX] + "…"


def _differences(names: Sequence[str], shown: Sequence[Any], want: Sequence[Any]) -> str:
    return ", ".join(f"{name} {_shown(got)} (events say {_shown(wanted)})"
                     for name, got, wanted in zip(names, shown, want, strict=True) if got != wanted)


# The read model's columns verify compares, as the projection fills them (projections.py).
_ACCOUNT_COLUMNS = ("owner_id", "kind", "currency", "state", "freeze_reasons", "close_reason", "credit_limit_minor",
                    "opened_at", "updated_at", "opened_position")
_ENTRY_COLUMNS = ("transfer_id", "code", "amount_minor", "balance_after_minor", "credits_after_minor",
                  "occurred_at")  # after the key
_TRANSFER_COLUMNS = ("code", "legs", "external_ref", "customer_ids", "metadata", "posted_at", "posted_position",
                     "requested_by", "reverses", "reversal_reason", "reversal_case_ref")  # after the id
_TRANSFER_JSON_COLUMNS = ("legs", "metadata")  # stored as JSON text
_HOLD_COLUMNS = ("debit_account_id", "credit_account_id", "amount_minor", "captured_minor", "currency", "state",
                 "expires_at", "code", "placed_position", "placed_at", "external_ref", "metadata")  # after the id


@dataclass(slots=True)  # one per account and hold in the ledger: no __dict__ each
class _Account:
    account_id: UUID
    opened: bool = False
    owner_id: str = "?"
    kind: str = "?"
    currency: str = "?"
    credit_limit_minor: int = 0
    state: str = "open"
    freeze_reasons: tuple[str, ...] = ()
    close_reason: str | None = None
    opened_at: datetime | None = None
    updated_at: datetime | None = None
    opened_position: int | None = None
    legs_minor: int = 0
    credits_minor: int = 0  # its legs' credits alone, as the read model's entries run them
    held_minor: int = 0
    incoming_held_minor: int = 0  # what live holds on other accounts will pay into this one
    version: int = 0  # of the account's own stream, at the snapshot

    def as_read_model_shows_it(self) -> tuple:
        """In the order of _ACCOUNT_COLUMNS."""
        return (self.owner_id, self.kind, self.currency, self.state, list(self.freeze_reasons), self.close_reason,
                self.credit_limit_minor, self.opened_at, self.updated_at, self.opened_position)


def _through_json(values: Sequence[Any], columns: Sequence[str], json_columns: Sequence[str]) -> tuple:
    """A row's values as they come back from being stored: those of `json_columns` through JSON."""
    return tuple(json.loads(json.dumps(value)) if column in json_columns else value
                 for column, value in zip(columns, values, strict=True))


def _balance_off(currency: str, saved: tuple, said: tuple) -> str:
    """How a saved balance (posted, held, incoming held) differs from what legs and holds say."""
    return (f"saved balance {'/'.join(map(str, saved))} (posted/held/incoming held), legs and holds say"
            f" {'/'.join(map(str, said))} ({currency} minor units; " + ", ".join(
                f"{what} off by {saved_minor - said_minor}" for what, saved_minor, said_minor in zip(
                    ("posted", "held", "incoming held"), saved, said, strict=True) if saved_minor != said_minor) + ")")


def _standing(account: Any) -> str:
    """An account's state, why, and credit limit, as verify names them: `frozen/0 (for court_order)`."""
    why = account.freeze_reasons or ((account.close_reason,) if account.close_reason else ())
    return f"{account.state}/{account.credit_limit_minor}" + (f" (for {', '.join(why)})" if why else "")


def _hold_standing(hold: Any) -> str:
    """A hold's state and what it has taken and let go, as verify names them: `voided (captured 100, released 200)`."""
    return f"{hold.state} (captured {hold.captured_minor}, released {hold.released_minor})"


class _Rebuilt:
    """Aggregates rebuilt as the writer's repository rebuilds them: each stream's events in
    version order, each through its own mutator. Rebuilt as the replay reads the log, so
    memory holds one aggregate per stream, not its events (and the replay lets a finished
    hold's go once compared); only an event that comes before an earlier version of its own
    stream (a reordered log) waits for that version."""

    def __init__(self) -> None:
        self.aggregates: dict[UUID, Any] = {}
        self.failed: dict[UUID, tuple[str, str]] = {}  # streams that cannot be rebuilt: their name, and why
        # Events ahead of their stream's next version, by version, and the stream's name.
        self._waiting: dict[UUID, tuple[str, dict[int, Any]]] = {}

    def add(self, event: Any, named: str) -> None:
        """The next event of the stream `named` (`hold h-1`), in log order."""
        stream_id = event.originator_id
        if stream_id in self.failed:
            return
        waiting = self._waiting.setdefault(stream_id, (named, {}))[1]
        waiting[event.originator_version] = event
        aggregate = self.aggregates.get(stream_id)
        try:
            while (next_event := waiting.pop(1 if aggregate is None else aggregate.version + 1, None)) is not None:
                aggregate = self.aggregates[stream_id] = next_event.mutate(aggregate)
        except Exception as error:
            self.failed[stream_id] = (named, repr(error))
        if not waiting:
            del self._waiting[stream_id]

    def settled(self, stream_id: UUID) -> Any | None:
        """The stream's aggregate, if it holds every event of its stream read so far."""
        return None if stream_id in self._waiting or stream_id in self.failed else self.aggregates.get(stream_id)

    def finish(self) -> None:
        """After the last page: a stream with a version missing cannot be rebuilt, and the
        writer cannot load it either (eventsourcing refuses an event that is not the next version)."""
        for stream_id, (named, waiting) in self._waiting.items():
            aggregate = self.aggregates.get(stream_id)
            missing = 1 if aggregate is None else aggregate.version + 1
            following = sorted(waiting)
            self.failed[stream_id] = (named, f"version {missing} is missing (version{'s' if len(following) > 1 else ''}"
                                             f" {', '.join(map(str, following))} follow"
                                             f"{'' if len(following) > 1 else 's'}), so the writer cannot load it")
        self._waiting.clear()


@dataclass(slots=True)  # one per account and hold in the ledger: no __dict__ each
class _Hold:
    debit: _Account  # the account's own (holds name it, not a copy of its id each)
    credit: _Account
    amount_minor: int
    currency: str
    expires_at: datetime
    code: str
    placed_position: int
    placed_at: datetime
    external_ref: str | None
    metadata: dict[str, str]
    captured_minor: int = 0
    released_minor: int = 0
    state: str = "active"
    version: int = 1  # of the hold's own stream, as far as the replay has read it
    # Finished, and compared with the hold rebuilt as the writer rebuilds it, which is then let
    # go: rebuilt holds take memory while they are live, not for every hold ever placed.
    rebuilt_compared: bool = False

    @property
    def left_minor(self) -> int:
        return self.amount_minor - self.captured_minor - self.released_minor

    def as_read_model_shows_it(self) -> tuple:
        """In the order of _HOLD_COLUMNS."""
        return (self.debit.account_id, self.credit.account_id, self.amount_minor, self.captured_minor, self.currency,
                self.state, self.expires_at, self.code, self.placed_position, self.placed_at, self.external_ref,
                self.metadata)


EntryKey = tuple[int, int, UUID]  # position, seq, account


@dataclass
class _Page:
    """One page of the log, replayed: the entries and transfers the read model should show
    for its events up to the read model's position."""

    last_position: int
    entries: dict[EntryKey, tuple] = field(default_factory=dict)  # as _ENTRY_COLUMNS
    transfers: dict[str, tuple] = field(default_factory=dict)  # client transfer id: as _TRANSFER_COLUMNS


class _Replay:
    """The event store replayed in log order, a page of notifications at a time (`replay`, in
    a worker thread: decoding and checking is CPU work that the page's comparison with the
    read model, in the database, runs beside)."""

    def __init__(self, app: LedgerApplication, read_model_at: int) -> None:
        self.app, self.read_model_at = app, read_model_at
        self.accounts: dict[UUID, _Account] = {}
        self.rebuilt = _Rebuilt()  # accounts and holds, as the writer rebuilds them
        self.rebuilt_off = Problems()  # rebuilt otherwise than their events say, or not at all
        self.holds: dict[str, _Hold] = {}  # by client hold id
        self.transfers = 0
        self.transfers_at_read_model = 0  # posted at the read model's position or before
        # How the read model, behind the replay, should still show the accounts and holds that
        # events past its position changed (None: not yet opened or placed). Kept for those
        # alone, before the first such event: a copy of every account and hold at the read
        # model's position would double the memory verify needs.
        self._accounts_at_read_model: dict[UUID, tuple | None] = {}
        self._holds_at_read_model: dict[str, tuple | None] = {}
        self.unbalanced = Problems()
        self.broken = Problems()  # events that name what does not exist, or cannot be read
        self.out_of_order = Problems()  # versions, times and ids that break the order the writer keeps
        self.holds_off = Problems()  # hold events that contradict each other or their captures' transfers
        self.states_off = Problems()  # money moved that the accounts' states, as the log stood then, forbade
        self.reversals = 0
        self.reversals_off = Problems()  # reversals that do not move back exactly what they name
        # The writer reverses only a transfer already stored, so no transfer comes after its
        # reversal in the log: each reversal's position waits here for a transfer that does.
        self._reversed_at: dict[str, int] = {}  # reversed transfer id: its reversal's position
        self.events_read = 0
        self.newest: tuple[int, datetime] | None = None  # position and time of the last event replayed
        # A capture is two events of one batch (the hold's and its transfer's), in either
        # order: each waits here for the other, so a few at a time, not one per capture.
        self._captures_waiting: dict[str, tuple[int, tuple]] = {}  # transfer id: position, the move the hold says
        self._capture_transfers_waiting: dict[str, tuple[int, tuple]] = {}  # transfer id: position, what it moves

    def account_at_read_model(self, account_id: UUID) -> tuple | None:
        """The account as the read model should show it at its position (None: not opened by then)."""
        if account_id in self._accounts_at_read_model:
            return self._accounts_at_read_model[account_id]
        account = self.accounts.get(account_id)
        return account.as_read_model_shows_it() if account is not None and account.opened else None

    def balance_of(self, account_id: UUID) -> tuple[int, int, int] | None:
        """What the account's legs and holds say its saved balance is (posted, held,
        incoming held), at the events' head (None: no event names the account)."""
        account = self.accounts.get(account_id)
        return None if account is None else (account.legs_minor, account.held_minor, account.incoming_held_minor)

    def hold_at_read_model(self, client_hold_id: str) -> tuple | None:
        """The hold as the read model should show it at its position (None: not placed by then)."""
        if client_hold_id in self._holds_at_read_model:
            return self._holds_at_read_model[client_hold_id]
        hold = self.holds.get(client_hold_id)
        return hold.as_read_model_shows_it() if hold is not None else None

    def accounts_at_read_model(self) -> Iterator[UUID]:
        return (account_id for account_id in self.accounts if self.account_at_read_model(account_id) is not None)

    def holds_at_read_model(self) -> Iterator[str]:
        return (hold_id for hold_id in self.holds if self.hold_at_read_model(hold_id) is not None)

    def _keep_as_read_model_shows(self, event: Any) -> None:
        """Before an event past the read model's position changes an account or a hold."""
        kind = type(event).__qualname__
        if kind.startswith("Account.") and event.originator_id not in self._accounts_at_read_model:
            self._accounts_at_read_model[event.originator_id] = self.account_at_read_model(event.originator_id)
        elif kind.startswith("Hold.") and event.client_hold_id not in self._holds_at_read_model:
            self._holds_at_read_model[event.client_hold_id] = self.hold_at_read_model(event.client_hold_id)

    def replay(self, notifications: Sequence[Notification]) -> _Page | None:
        """The page of these notifications, the next in the log (None for none: the end)."""
        if not notifications:
            return None
        page = _Page(notifications[-1].id)
        for notification in notifications:
            try:
                event = self.app.mapper.to_domain_event(notification)
                if notification.id > self.read_model_at:
                    self._keep_as_read_model_shows(event)
                self._apply(notification.id, event, page if notification.id <= self.read_model_at else None)
            except Exception as error:  # an auditor's tool reports what it cannot read, and reads on
                self.broken.append(f"position {notification.id}: {notification.topic} cannot be replayed: {error!r}")
        self.events_read += len(notifications)
        return page

    def _account_stream(self, account_id: UUID) -> _Account:
        """The account as replayed so far: unopened, the first time it is named."""
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = _Account(account_id)
        return account

    def _account(self, account_id: UUID, position: int, what: str) -> _Account:
        account = self._account_stream(account_id)
        if not account.opened:
            self.broken.append(f"position {position}: {what} names account {account_id}, which no Account.Opened"
                               " opens before it")
        return account

    def _hold(self, client_hold_id: str, position: int, what: str) -> _Hold | None:
        hold = self.holds.get(client_hold_id)
        if hold is None:
            self.broken.append(f"position {position}: {what} names hold {client_hold_id}, which no Hold.Placed"
                               " places before it")
        return hold

    def finish(self) -> None:
        """After the last page: the aggregates rebuilt and not compared yet, and a capture and
        its transfer that never met."""
        self._compare_rebuilt_left()
        self.holds_off.extend(
            f"position {position}: hold {hold_id}'s capture {capture_id} names transfer {transfer_id},"
            " which the event store does not hold"
            for transfer_id, (position, (hold_id, capture_id, *_)) in self._captures_waiting.items())
        self.holds_off.extend(
            f"position {position}: transfer {transfer_id} says it captures hold {hold_id} (capture {capture_id}),"
            " which no Hold.Captured records"
            for transfer_id, (position, (hold_id, capture_id, *_)) in self._capture_transfers_waiting.items())

    def _check_order(self, position: int, kind: str, event: Any) -> None:
        """The order the writer keeps: ids made from client ids, each stream's versions one
        by one along the log, batch times that never go back along it."""
        version = event.originator_version
        if kind == "Transfer.Posted" or kind.startswith("Hold."):
            client_id = event.client_transfer_id if kind == "Transfer.Posted" else event.client_hold_id
            made = Transfer.id_for(client_id) if kind == "Transfer.Posted" else Hold.id_for(client_id)
            if event.originator_id != made:
                self.out_of_order.append(f"position {position}: {kind} {client_id} is stored as {event.originator_id},"
                                         f" not as {made}, the id its client id makes")
        if kind.startswith("Account.") or (kind.startswith("Hold.") and kind != "Hold.Placed"):
            stream: _Account | _Hold | None
            if kind.startswith("Account."):
                stream = self._account_stream(event.originator_id)  # unopened: "events replay" says so
                named = f"account {event.originator_id}"
            else:
                stream = self.holds.get(event.client_hold_id)  # None: unplaced, "events replay" says so
                named = f"hold {event.client_hold_id} ({event.originator_id})"
            last = stream.version if stream is not None else 0
            if version != last + 1:
                self.out_of_order.append(f"position {position}: {kind} is version {version} of {named},"
                                         f" after version {last}")
            if stream is not None:
                stream.version = max(last, version)  # the stream's head: what the writer rebuilds it at
        elif version != 1:  # a transfer, a hold's placing or a refusal: the first event of its stream
            self.out_of_order.append(f"position {position}: {kind} is version {version} of {event.originator_id},"
                                     " which only a stream's first event may be")
        if kind == "Transfer.Posted" and event.posted_at != event.timestamp:
            self.out_of_order.append(f"position {position}: Transfer.Posted {event.client_transfer_id} says it was"
                                     f" posted at {_shown(event.posted_at)} but is stamped {_shown(event.timestamp)}")
        if self.newest is not None and event.timestamp < self.newest[1]:
            what = f"Transfer.Posted {event.client_transfer_id}" if kind == "Transfer.Posted" else kind
            self.out_of_order.append(
                f"position {position}: {what} was posted at {_shown(event.timestamp)}, before the event before it"
                f" (position {self.newest[0]}, {_shown(self.newest[1])})")
        self.newest = (position, event.timestamp)

    def _capture_met(self, transfer_id: str, position: int, said: tuple, moved: tuple) -> None:
        """A capture's transfer (at `position`) against its hold's event: the same hold and
        capture, two legs moving what the hold says from its debit to its credit account, and
        the hold's references (what the purchase was, on the customer's history line)."""
        hold_id, capture_id, amount_minor, currency, debit, credit, references = said
        if moved[:2] == (hold_id, capture_id) and moved[3] != references:
            self.holds_off.append(
                f"position {position}: transfer {transfer_id} (capture {capture_id} of hold {hold_id}) says it is"
                f" {_shown(moved[3])}, but the hold was placed for {_shown(references)}")
        legs = [{"account_id": str(debit), "amount_minor": -amount_minor, "currency": currency},
                {"account_id": str(credit), "amount_minor": amount_minor, "currency": currency}]
        if moved[:3] == (hold_id, capture_id, legs):
            return
        got = moved[2]
        shown = (f"{got[1]['amount_minor']} {got[1]['currency']} from {got[0]['account_id']} to {got[1]['account_id']}"
                 if len(got) == 2 else f"legs {_shown(got)}")
        self.holds_off.append(
            f"position {position}: transfer {transfer_id} moves {shown} (for hold {moved[0]}, capture {moved[1]}),"
            f" but hold {hold_id}'s capture {capture_id} took {amount_minor} {currency} from {debit} to {credit}")

    def _capture_transfer(self, position: int, event: Any) -> None:
        moved = (event.hold_id, event.capture_id, event.legs, (event.external_ref, event.metadata))
        said = self._captures_waiting.pop(event.client_transfer_id, None)
        if said is None:
            self._capture_transfers_waiting[event.client_transfer_id] = (position, moved)
        else:
            self._capture_met(event.client_transfer_id, position, said[1], moved)

    def _check_reversal(self, position: int, event: Any, reverses: str) -> None:
        """A reversal moves back exactly the legs of the transfer it names, under that
        transfer's reversal id (so there is one at most), for a reason the bank has. The
        reversed transfer is read from the store: reversals are few."""
        self.reversals += 1
        self._reversed_at[reverses] = position
        what = f"position {position}: transfer {event.client_transfer_id} reverses {reverses}"
        if event.client_transfer_id != reversal_transfer_id(reverses):
            self.reversals_off.append(f"{what}, but is not stored under its reversal id {reversal_transfer_id(reverses)}")
        if stored_later(event, "reversal_reason") not in REVERSAL_REASONS:
            self.reversals_off.append(f"{what} for {stored_later(event, 'reversal_reason')!r}, not a reason the bank has")
        try:
            original = self.app.repository.get(Transfer.id_for(reverses))
        except AggregateNotFoundError:
            original = None
        if not isinstance(original, Transfer) or original.reverses is not None:
            self.reversals_off.append(f"{what}, which is no transfer posted to be reversed")
            return
        moved_back = [{**leg, "amount_minor": -leg["amount_minor"]} for leg in original.legs]
        if list(event.legs) != moved_back:
            self.reversals_off.append(f"{what}, but moves {_shown(event.legs)} where that transfer moved"
                                      f" {_shown(original.legs)}")

    def _apply(self, position: int, event: Any, page: _Page | None) -> None:
        kind = type(event).__qualname__
        self._check_order(position, kind, event)
        if kind.startswith("Account."):
            self.rebuilt.add(event, f"account {event.originator_id}")
        elif kind.startswith("Hold."):
            placed = self.holds.get(event.client_hold_id)
            if placed is None or not placed.rebuilt_compared:  # (an event after that: "holds add up" names it)
                self.rebuilt.add(event, f"hold {event.client_hold_id}")
        if kind == "Account.Opened":
            account = self._account_stream(event.originator_id)
            account.opened = True
            account.owner_id = event.owner_id
            # A few kinds, codes and currencies: each name kept once, not once per account and hold.
            account.kind, account.currency = intern(str(event.kind)), intern(event.currency)
            account.credit_limit_minor = event.credit_limit_minor
            account.opened_at = account.updated_at = event.timestamp
            account.opened_position = position
        elif kind.startswith("Account."):
            account = self._account(event.originator_id, position, kind)
            if kind == "Account.CreditLimitSet":
                account.credit_limit_minor = event.credit_limit_minor
            elif kind in ("Account.Frozen", "Account.Unfrozen"):
                account.freeze_reasons, account.state = freezes_after(event, account.freeze_reasons)
            elif kind == "Account.Closed":
                if account.legs_minor or account.held_minor or account.incoming_held_minor:
                    self.states_off.append(f"position {position}: account {account.account_id} closed holding"
                                           f" {account.legs_minor}/{account.held_minor}/{account.incoming_held_minor}"
                                           f" {account.currency} (posted/held/incoming held)")
                account.state, account.close_reason = "closed", stored_later(event, "reason")
            account.updated_at = event.timestamp
        elif kind == "Transfer.Posted":
            self._post(position, event, page)
        elif kind == "Hold.Placed":
            what = f"Hold.Placed {event.client_hold_id}"
            debit = self._account(UUID(event.debit_account_id), position, what)
            credit = self._account(UUID(event.credit_account_id), position, what)
            if debit.opened and debit.currency != event.currency:
                self.broken.append(f"position {position}: {what} holds {event.currency} on a {debit.currency} account")
            self._check_state(position, what, debit, -event.amount_minor, settles_a_hold=False)
            self._check_state(position, what, credit, 0, settles_a_hold=False)
            if event.amount_minor <= 0:
                self.holds_off.append(f"hold {event.client_hold_id} placed at position {position} reserves"
                                      f" {event.amount_minor} {event.currency}: a hold reserves a positive amount")
            debit.held_minor += event.amount_minor
            credit.incoming_held_minor += event.amount_minor
            self.holds[event.client_hold_id] = _Hold(debit, credit, event.amount_minor, intern(event.currency),
                                                     event.expires_at, intern(event.code), position, event.timestamp,
                                                     stored_later(event, "external_ref"),
                                                     stored_later(event, "metadata") or {})
        elif kind in ("Hold.Captured", "Hold.Voided", "Hold.Expired"):
            hold = self._hold(event.client_hold_id, position, kind)
            if hold is not None:
                self._finish_hold(position, kind, event, hold)
                rebuilt = self.rebuilt.settled(event.originator_id)
                if (hold.state != "active" and rebuilt is not None and rebuilt.state != "active"
                        and event.originator_id == Hold.id_for(event.client_hold_id)):  # else: "event order"
                    self._compare_rebuilt(f"hold {event.client_hold_id}", rebuilt, hold, _hold_standing)
                    del self.rebuilt.aggregates[event.originator_id]
                    hold.rebuilt_compared = True

    def _compare_rebuilt(self, named: str, rebuilt: Any, expected: Any, standing: Callable[[Any], str]) -> None:
        if standing(rebuilt) != standing(expected):
            self.rebuilt_off.append(f"{named}: rebuilt {standing(rebuilt)}, events say {standing(expected)}")

    def _compare_rebuilt_left(self) -> None:
        """After the last page: the accounts and the holds not finished yet, and the streams
        that cannot be rebuilt."""
        self.rebuilt.finish()
        self.rebuilt_off.extend(f"{named} cannot be rebuilt from its events: {why}"
                                for named, why in self.rebuilt.failed.values())
        for stream_id, rebuilt in self.rebuilt.aggregates.items():
            if stream_id in self.rebuilt.failed:
                continue
            if isinstance(rebuilt, Hold):
                expected_hold = self.holds.get(rebuilt.client_hold_id)
                if expected_hold is not None and stream_id == Hold.id_for(rebuilt.client_hold_id):  # else: "event order"
                    self._compare_rebuilt(f"hold {rebuilt.client_hold_id}", rebuilt, expected_hold, _hold_standing)
            else:
                self._compare_rebuilt(f"account {stream_id}", rebuilt, self.accounts[stream_id], _standing)

    def _finish_hold(self, position: int, kind: str, event: Any, hold: _Hold) -> None:
        """A capture takes at most what is left, a void or an expiry releases exactly that,
        and nothing follows once a hold is finished: what the writer checks before it posts."""
        hold_id, currency = event.client_hold_id, hold.currency
        capture = kind == "Hold.Captured"
        minor = event.amount_minor if capture else event.released_minor
        what = f"capture {event.capture_id}" if capture else {"Hold.Voided": "voided", "Hold.Expired": "expired"}[kind]
        if hold.state != "active":
            self.holds_off.append(f"hold {hold_id}: {what} at position {position} after the hold was {hold.state}")
        elif capture and minor <= 0:  # turned round with its transfer, it would pay the payee's money back
            self.holds_off.append(f"hold {hold_id}: {what} at position {position} takes {minor} {currency}:"
                                  " a capture takes a positive amount")
        elif capture and minor > hold.left_minor:
            self.holds_off.append(f"hold {hold_id}: {what} at position {position} takes {minor} {currency}"
                                  f" where {hold.left_minor} {currency} was left")
        elif not capture and minor != hold.left_minor:
            self.holds_off.append(f"hold {hold_id}: {what} at position {position} releasing {minor} {currency}"
                                  f" where {hold.left_minor} {currency} was left")
        hold.debit.held_minor -= minor
        hold.credit.incoming_held_minor -= minor
        if capture:
            hold.captured_minor += minor
            if hold.captured_minor >= hold.amount_minor:
                hold.state = "captured"
            said = (hold_id, event.capture_id, minor, currency, hold.debit.account_id, hold.credit.account_id,
                    (hold.external_ref, hold.metadata))
            waiting = self._capture_transfers_waiting.pop(event.transfer_id, None)
            if waiting is None:
                self._captures_waiting[event.transfer_id] = (position, said)
            else:
                self._capture_met(event.transfer_id, waiting[0], said, waiting[1])
        else:
            hold.released_minor += minor
            hold.state = "voided" if kind == "Hold.Voided" else "expired"

    def _check_state(self, position: int, what: str, account: _Account, amount_minor: int, *,
                     settles_a_hold: bool) -> None:
        """Nothing is posted to or held on a closed account, and nothing taken from a frozen
        one (a debit, a new hold) but the capture of a hold placed before: the writer's rules,
        against the account as the log stood at the event."""
        if account.state == "closed":
            self.states_off.append(f"position {position}: {what} moves money on account {account.account_id},"
                                   " closed by then")
        elif account.state == "frozen" and amount_minor < 0 and not settles_a_hold:
            self.states_off.append(f"position {position}: {what} takes {-amount_minor} {account.currency} from account"
                                   f" {account.account_id}, frozen by then (for {', '.join(account.freeze_reasons)})")

    def _post(self, position: int, event: Any, page: _Page | None) -> None:
        self.transfers += 1
        what = f"Transfer.Posted {event.client_transfer_id}"
        if event.client_transfer_id in self._reversed_at:
            self.reversals_off.append(f"position {position}: transfer {event.client_transfer_id} is posted after its"
                                      f" reversal at position {self._reversed_at[event.client_transfer_id]}")
        sums: dict[str, int] = defaultdict(int)
        leg_accounts = []
        for seq, leg in enumerate(event.legs):
            account_id = UUID(leg["account_id"])
            account = self._account(account_id, position, what)
            leg_accounts.append(account)
            if account.opened and account.currency != leg["currency"]:
                self.broken.append(f"position {position}: {what} posts {leg['currency']} to {account.currency}"
                                   f" account {account_id}")
            self._check_state(position, what, account, leg["amount_minor"], settles_a_hold=event.hold_id is not None)
            sums[leg["currency"]] += leg["amount_minor"]
            account.legs_minor += leg["amount_minor"]
            account.credits_minor += max(leg["amount_minor"], 0)
            if page is not None:
                page.entries[(position, seq, account_id)] = (
                    event.client_transfer_id, event.code, leg["amount_minor"], account.legs_minor, account.credits_minor,
                    event.posted_at)
        if any(sums.values()):
            self.unbalanced.append(f"transfer {event.client_transfer_id} is off by {dict(sums)}")
        # Whom the event is published for: each leg's account's customer, the bank never.
        owners = [None if account.owner_id == BANK_OWNER_ID else account.owner_id for account in leg_accounts]
        named_per_leg = stored_later(event, "leg_owner_ids")  # None on transfers stored before it
        named = stored_later(event, "leg_customer_ids")  # on some of those: customers_of, no legs told apart
        if named_per_leg is not None and list(named_per_leg) != owners:
            self.broken.append(f"position {position}: {what} names its legs' customers {named_per_leg}, but its legs'"
                               f" accounts belong to {owners}")
        elif named_per_leg is None and named is not None and list(named) != customers_of(event.legs, owners):
            self.broken.append(f"position {position}: {what} is published for customers {named}, but its legs'"
                               f" accounts belong to {customers_of(event.legs, owners)}")
        if event.hold_id is not None:
            self._capture_transfer(position, event)
        reverses = stored_later(event, "reverses")
        if reverses is not None:
            self._check_reversal(position, event, reverses)
        if page is not None:
            self.transfers_at_read_model += 1
            page.transfers[event.client_transfer_id] = (  # customers as the projection stores them: a list
                event.code, event.legs, event.external_ref, list(event.customer_ids),
                event.metadata, event.posted_at, position, stored_later(event, "requested_by"),
                stored_later(event, "reverses"), stored_later(event, "reversal_reason"),
                stored_later(event, "reversal_case_ref"))


class _ShownEntries:
    """The read model's entries in log order, streamed from a cursor of the snapshot."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self._buffer: Sequence[asyncpg.Record] = []
        self._at = 0
        self._exhausted = False

    async def up_to(self, position: int | None) -> AsyncIterator[asyncpg.Record]:
        """The next entries at `position` or before (all that are left if None)."""
        while True:
            while self._at < len(self._buffer):
                row = self._buffer[self._at]
                if position is not None and row["position"] > position:
                    return
                self._at += 1
                yield row
            if self._exhausted:
                return
            self._buffer, self._at = await self._cursor.fetch(PAGE_SIZE), 0
            self._exhausted = len(self._buffer) < PAGE_SIZE


class _ReadModelComparison:
    """The read model's entries and transfers against each replayed page, as the replay goes."""

    def __init__(self, connection: asyncpg.Connection, read_model_at: int) -> None:
        self.connection, self.read_model_at = connection, read_model_at
        self.entries = Problems()
        self.transfers = Problems()
        self.entries_compared = 0
        self._shown: _ShownEntries | None = None

    async def start(self) -> None:
        self._shown = _ShownEntries(await self.connection.cursor(
            f"SELECT account_id, position, seq, {', '.join(_ENTRY_COLUMNS)}"
            " FROM ledger_entries ORDER BY position, seq, account_id"))

    async def page(self, page: _Page) -> None:
        assert self._shown is not None
        expected = page.entries
        async for row in self._shown.up_to(min(page.last_position, self.read_model_at)):
            self.entries_compared += 1
            key = (row["position"], row["seq"], row["account_id"])
            want = expected.pop(key, None)
            if want is None:
                self.entries.append(f"read model has an entry of account {key[2]} at position {key[0]} seq {key[1]}"
                                    " that no transfer leg makes")
                continue
            got = tuple(row[column] for column in _ENTRY_COLUMNS)
            if got != want:
                self.entries.append(f"entry of account {key[2]} at position {key[0]} seq {key[1]}: "
                                    + _differences(_ENTRY_COLUMNS, got, want))
        self.entries.extend(f"entry of account {account_id} at position {position} seq {seq}"
                            f" (transfer {want[0]}) missing from the read model"
                            for (position, seq, account_id), want in expected.items())
        if page.transfers:
            rows = await self.connection.fetch(
                f"SELECT transfer_id, {', '.join(_TRANSFER_COLUMNS)} FROM ledger_transfers"
                " WHERE transfer_id = ANY($1::text[])", list(page.transfers))
            shown = {row["transfer_id"]: row for row in rows}
            for transfer_id, want in page.transfers.items():
                row = shown.get(transfer_id)
                if row is None:
                    self.transfers.append(f"transfer {transfer_id} missing from the read model")
                    continue
                got = (row["code"], json.loads(row["legs"]), row["external_ref"], list(row["customer_ids"]),
                       json.loads(row["metadata"]), row["posted_at"], row["posted_position"], row["requested_by"],
                       row["reverses"], row["reversal_reason"], row["reversal_case_ref"])
                if got != want:
                    # As the projection stores legs and metadata: through JSON, which may change their
                    # types. Only here: taking every transfer's through JSON was a fifth of the replay.
                    want = _through_json(want, _TRANSFER_COLUMNS, _TRANSFER_JSON_COLUMNS)
                    if got != want:
                        self.transfers.append(f"transfer {transfer_id}: "
                                              + _differences(_TRANSFER_COLUMNS, got, want))

    async def finish(self) -> None:
        """Entries left once every event is replayed are entries no event made."""
        assert self._shown is not None
        async for row in self._shown.up_to(None):
            self.entries_compared += 1
            self.entries.append(f"read model has an entry of account {row['account_id']} at position {row['position']}"
                                f" seq {row['seq']} that no transfer leg up to position {self.read_model_at} makes")


@dataclass(frozen=True)
class _ComparedTable:
    """A table of what the ledger serves, compared row by row with what the replay says it
    should hold, and how its problems read (each formatted with `key` and `position`)."""

    name: str
    key: str
    key_type: str  # PostgreSQL's name for the key's type
    columns: tuple[str, ...]  # after the key, in the order the replay gives a row's values
    missing: str  # a row it should hold and does not
    unexpected: str  # a row it should not hold
    differs: str  # a row that differs, followed by how (`_compare_rows`'s `how_it_differs`)
    json_columns: tuple[str, ...] = ()  # stored as JSON text


def _read_model_table(name: str, key: str, key_type: str, columns: tuple[str, ...], row_named: str,
                      json_columns: tuple[str, ...] = ()) -> _ComparedTable:
    return _ComparedTable(name, key, key_type, columns, f"{row_named} {{key}} missing from the read model",
                          f"read model has {row_named} {{key}} the event store does not (at {{position}})",
                          f"{row_named} {{key}}: ", json_columns)


_ACCOUNTS_SHOWN = _read_model_table("ledger_accounts", "account_id", "uuid", _ACCOUNT_COLUMNS, "account")
_HOLDS_SHOWN = _read_model_table("ledger_holds", "hold_id", "text", _HOLD_COLUMNS, "hold", ("metadata",))
# Saved by the writer with their events: compared at the events' head, not the read model's position.
_BALANCES_SAVED = _ComparedTable("ledger_balances", "account_id", "uuid",
                                 ("posted_minor", "held_minor", "incoming_held_minor"),
                                 "account {key} has no saved balance",
                                 "a balance is saved for {key}, which the event store has no account for",
                                 "account {key}: ")


async def _compare_rows(connection: asyncpg.Connection, table: _ComparedTable,
                        expected: Callable[[Any], tuple | None], expected_keys: Callable[[], Iterator[Any]],
                        position: int, how_it_differs: Callable[[Any, tuple, tuple], str] | None = None,
                        ) -> tuple[Problems, int]:
    """A table's rows against what the replay says it should hold at `position` (`expected`
    of a key: None for a row it should not hold), streamed a page at a time from the snapshot:
    memory for a page, not for every hold a ledger ever placed. The rows it should hold but
    does not are looked up by key, and only when fewer rows matched than `expected_keys`
    names. `how_it_differs(key, values, expected values)` words a difference (by default,
    column by column). Returns the problems and the rows read."""
    if how_it_differs is None:
        def how_it_differs(_: Any, got: tuple, want: tuple) -> str:
            return _differences(table.columns, got, want)
    problems = Problems()
    rows_read = rows_expected = 0
    cursor = await connection.cursor(f"SELECT {table.key}, {', '.join(table.columns)} FROM {table.name}")
    for _ in range(PAGES_MAX):
        rows = await cursor.fetch(PAGE_SIZE)
        for row in rows:
            key, want = row[table.key], expected(row[table.key])
            if want is None:
                problems.append(table.unexpected.format(key=key, position=position))
                continue
            rows_expected += 1
            got = tuple(json.loads(row[column]) if column in table.json_columns else row[column]
                        for column in table.columns)
            if got != want:
                problems.append(table.differs.format(key=key) + how_it_differs(key, got, want))
        rows_read += len(rows)
        if len(rows) < PAGE_SIZE:
            break
    if rows_expected == sum(1 for _ in expected_keys()):
        return problems, rows_read
    keys = expected_keys()
    for _ in range(PAGES_MAX):
        page = list(islice(keys, PAGE_SIZE))
        if not page:
            break
        held = {row[table.key] for row in await connection.fetch(
            f"SELECT {table.key} FROM {table.name} WHERE {table.key} = ANY($1::{table.key_type}[])", page)}
        problems.extend(table.missing.format(key=key) for key in page if key not in held)
    return problems, rows_read


async def _wait_for_read_model(connection: asyncpg.Connection, position: int) -> None:
    """Give the read model a bounded time to reach `position` (a live ledger keeps writing)."""
    for _ in range(int(CATCH_UP_WAIT_S / CATCH_UP_POLL_S)):
        reached = await connection.fetchval(
            "SELECT position FROM projection_position WHERE projection = $1", projections.READ_MODEL_PROJECTION,
        ) or 0
        if reached >= position:
            return
        await asyncio.sleep(CATCH_UP_POLL_S)


def _log_head_problems(newest: tuple[int, datetime] | None, posting_clock: datetime | None, read_model_at: int,
                       relayed: int | None) -> Problems:
    """What still remembers the newest event after it is deleted: the time the writer saved
    with it (every batch stamps its events with the time it saves as the posting clock), and
    the positions that read models and the relay recorded once they had passed it."""
    problems = Problems()
    head = newest[0] if newest is not None else 0
    if posting_clock is None and newest is not None:
        problems.append(f"no posting clock is saved, though the log holds events up to position {head}")
    elif posting_clock is not None and newest is None:
        problems.append(f"the posting clock says the last batch was posted at {_shown(posting_clock)}, but the log"
                        " holds no event: its events were removed")
    elif posting_clock is not None and newest is not None and posting_clock != newest[1]:
        why = ("events after it are missing, or the clock was set ahead" if posting_clock > newest[1]
               else "the clock was set back, and the next batch may post before the newest event")
        problems.append(f"the posting clock says the last batch was posted at {_shown(posting_clock)}, but the"
                        f" newest event (position {head}) was posted at {_shown(newest[1])}: {why}")
    for who, at in (("the read model has", read_model_at), ("the outbox relay has", relayed)):
        if at is not None and at > head:
            problems.append(f"{who} applied events up to position {at}, past the newest event {head}:"
                            " events were removed from the end of the log")
    return problems


def _public_keys_named(seal_keys: dict) -> str:
    if not seal_keys:
        return "no public key (none given: set KABINET_HISTORY_SEAL_PUBLIC_KEYS)"
    return f"public key{'s' if len(seal_keys) > 1 else ''} {', '.join(seal_keys)}"


async def verify(app: LedgerApplication, settings: ServiceSettings, noted_seal: tuple[int, str] | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> Report:
    """The ledger of `settings` (its database, and the seal key its history was sealed with);
    `noted_seal`, the receipt of the last seal an earlier verify showed, must still be there.
    `on_progress(stage, position, head)` is told how far verify has read the history, for a
    long history's auditor to see: after each page of the replay (stage REPLAYING), then after
    each seal checked (stage CHECKING_SEALS), which reads the events again."""
    import anyio

    report = Report()
    database_url, seal_keys = settings.service_database_url, history_seals.verification_keys_for(settings)
    log_table = events_table(app.recorder)  # the events, in log order
    # One snapshot of what the ledger serves, then the events up to that snapshot: balances
    # commit with their events, and the read model is compared at its own position, so a
    # ledger that keeps writing still verifies. The snapshot stays open while the events
    # are replayed: entries and transfers are compared page by page against it; accounts,
    # holds and balances after the replay, streamed from it.
    connection = await asyncpg.connect(database_url, timeout=10, command_timeout=VERIFY_STATEMENT_TIMEOUT_S)
    try:
        head_at_start = await connection.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {log_table}")
        guards_off = {table: await append_only.missing_guards(connection, table) for table in (
            log_table, history_seals.SEALS_TABLE)
            if await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", table)}
        await _wait_for_read_model(connection, head_at_start)
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            up_to = await connection.fetchval(
                f"SELECT coalesce(max(notification_id), 0) FROM {log_table}"
            )
            position = await connection.fetchval(
                "SELECT position FROM projection_position WHERE projection = $1", projections.READ_MODEL_PROJECTION,
            ) or 0
            transfers_shown = await connection.fetchval("SELECT count(*) FROM ledger_transfers")
            posting_clock = await connection.fetchval("SELECT posted_at FROM ledger_posting_clock")
            relayed = await connection.fetchval(  # a ledger that never ran its relay has no table for it
                "SELECT max(position) FROM outbox_relay_position WHERE source = $1", SOURCE
            ) if await connection.fetchval("SELECT to_regclass('outbox_relay_position') IS NOT NULL") else None

            replay = _Replay(app, position)
            compared = _ReadModelComparison(connection, position)
            await compared.start()

            async def replaying_after(after: int) -> asyncio.Future:
                # The events of this snapshot too: read here, replayed in a thread.
                notifications = await notifications_after(connection, log_table, after, PAGE_SIZE, up_to)
                return asyncio.ensure_future(anyio.to_thread.run_sync(replay.replay, notifications))

            # The next page is replayed (in a thread) while this one is compared (in the database).
            replaying = await replaying_after(0)
            try:
                for _ in range(PAGES_MAX):
                    page = await replaying
                    if page is None:
                        break
                    replaying = await replaying_after(page.last_position)
                    await compared.page(page)
                    if on_progress is not None:
                        on_progress(REPLAYING, page.last_position, up_to)
            finally:
                replaying.cancel()
            await compared.finish()
            replay.finish()
            account_problems, accounts_shown = await _compare_rows(
                connection, _ACCOUNTS_SHOWN, replay.account_at_read_model, replay.accounts_at_read_model, position)
            hold_problems, holds_shown = await _compare_rows(
                connection, _HOLDS_SHOWN, replay.hold_at_read_model, replay.holds_at_read_model, position)
            balance_problems, balances_saved = await _compare_rows(
                connection, _BALANCES_SAVED, replay.balance_of, lambda: iter(replay.accounts), up_to,
                lambda account_id, saved, said: _balance_off(replay.accounts[account_id].currency, saved, said))
            seals = await history_seals.check_seals(
                connection, log_table, seal_keys, noted_seal,
                on_progress=None if on_progress is None else lambda sealed_to: on_progress(CHECKING_SEALS, sealed_to, up_to))
    except BaseException:
        # A server that hangs would hold a polite close too (asyncpg cancels the timed-out
        # statement first): drop the connection instead.
        connection.terminate()
        raise
    await connection.close()
    report.events_read = replay.events_read
    # A receipt for the next check only from seals that held: a forged seal's would have the
    # next check vouch for the forgery.
    report.last_seal = seals.last_seal.receipt if seals.last_seal is not None and not seals.problems_count else None
    accounts = replay.accounts

    report.add("events replay", replay.broken,
               "every leg and hold names an opened account in its currency, every hold event a placed hold, every"
               " transfer the customers owning its legs' accounts")
    report.add("transfers balance", replay.unbalanced, "every transfer's legs sum to zero per currency")
    report.add("event order", replay.out_of_order,
               "each stream's versions follow the log one by one, posting times never go back, transfers and holds"
               " stored under the ids their client ids make")
    report.add("holds add up", replay.holds_off,
               f"{len(replay.holds)} holds: no capture takes more than is left, every void and expiry releases what"
               " is left, every capture's transfer moves what its hold says, with its references")
    report.add("account states", replay.states_off,
               "no money taken from a frozen account but a hold's capture, none moved on a closed one, and every"
               " account empty when it closed, as the log stood at each event")
    report.add("reversals", replay.reversals_off,
               f"{replay.reversals} reversals: each moves back exactly the legs of the transfer it names, once,"
               " after it, for a reason the bank has")
    report.add("log head", _log_head_problems(replay.newest, posting_clock, position, relayed),
               f"the posting clock is the newest event's time (position {up_to}), and no position recorded is past it")

    totals: dict[str, int] = defaultdict(int)
    for account in accounts.values():
        totals[account.currency] += account.legs_minor
    report.add("event history is append-only", [
        f"guard {guard} of {table} is missing or does not always fire: its rows can be changed or deleted"
        " (a ledger process recreates it when it starts)" for table, missing in guards_off.items() for guard in missing],
        "UPDATE, DELETE and TRUNCATE of the events and their seals are refused by triggers that always fire")
    last_seal = (f"; the last, seal {seals.last_seal.receipt} at position {seals.last_seal.last_position}"
                 f" (note it down: `--seal {seals.last_seal.receipt}` finds it again)" if seals.last_seal else "")
    report.add("history matches its seals", Problems.counted(seals.problems, seals.problems_count),
               f"{seals.events_sealed} events under {seals.seals} seals, each range hashed again and each signature"
               f" checked with {_public_keys_named(seal_keys)}{last_seal};"
               f" {seals.events_unsealed} newer events not sealed yet")

    report.add("trial balance", [f"{cur} off by {total}" for cur, total in totals.items() if total],
               "zero in " + (", ".join(sorted(totals)) or "no currency"))

    report.add("balances equal legs and holds", balance_problems, f"{balances_saved} accounts")

    # Rebuilt from the events the replay read (up to the snapshot), not read again one
    # stream at a time: a query per stream made this check most of verify's time.
    report.add("aggregates rebuild", replay.rebuilt_off,
               f"{sum(a.opened for a in accounts.values())} accounts and {len(replay.holds)} holds rebuilt as the"
               " writer rebuilds them (each stream in version order) stand as their events say in log order")

    report.add("no forbidden overdraft", [
        f"account {aid}: {a.legs_minor - a.held_minor} below limit {a.credit_limit_minor}"
        for aid, a in accounts.items()
        if a.owner_id != BANK_OWNER_ID and a.legs_minor - a.held_minor < -a.credit_limit_minor
    ], "customer accounts within their limits")

    caught_up = Problems([] if position >= head_at_start else [
        f"read model at position {position} did not reach {head_at_start}, the head when verify began,"
        f" within {CATCH_UP_WAIT_S:.0f} s"])
    if transfers_shown != replay.transfers_at_read_model:
        compared.transfers.append(
            f"read model has {transfers_shown} transfers, event store {replay.transfers_at_read_model} (at {position})")
    report.add("read model equals event store",
               Problems.joined(caught_up, account_problems, compared.transfers, compared.entries, hold_problems),
               f"{accounts_shown} accounts, {compared.entries_compared} entries, {transfers_shown} transfers,"
               f" {holds_shown} holds at position {position} (event store at {up_to})")
    return report
