"""One writer batch: commands validated and applied in memory, saved together.

`execute` applies one command against the state left by the earlier commands of the
same batch, or raises a LedgerError having changed nothing but, for a transfer, hold or
capture refused for the ledger's state, keeping that refusal under its id (refusal.py):
everything is checked before anything is mutated, so a refused command never affects
its neighbours.
Balance changes are summed per account; `finish` returns every aggregate to save and
the new `Balance` of every account whose money moved, to be saved in the same
transaction. A transfer is one `Transfer.Posted` event whatever accounts it touches.

Decisions the writer and callers rely on:
- ids: Account id = the caller's UUID; Transfer id = uuid5(namespace, transfer_id);
  Hold id = uuid5(other namespace, hold_id); a capture posts a transfer with client id
  `capture_transfer_id(hold_id, capture_id)` = "<hold_id>:capture:<capture_id>" (the
  infix is refused in client transfer and hold ids).
- a capture needs no funds check and ignores a freeze of the debit account: the money
  was reserved when the hold was placed. A hold takes at most CAPTURES_PER_HOLD_MAX
  captures (hold.py); a capture past them is refused like one past the held amount. A closed account refuses it (cannot happen to
  the debit account, which cannot close while holding).
- `ExpireHold` uses the batch's `now`; before `expires_at` it changes nothing and
  answers `replayed=True`. A capture at or after `expires_at` is refused even before
  the expiry sweep ran; a void then expires the hold (the ledger's doing) and answers
  with it expired, as it does for a hold the sweep expired.
- replays answer `replayed=True` with their first result: a transfer's, or a hold as it
  stood just placed or just after that capture. A repeat of a refused transfer, hold or
  capture is refused again with its first refusal (code and message); a malformed one is
  not kept.
- every command's shape is checked before its id is looked up: no command is refused
  after finding its new id absent without keeping that refusal (the writer relies on it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

from ledger.domain import commands as c
from ledger.domain.account import Account, AccountKind, AccountState
from ledger.domain.balance import Balance, available_minor
from ledger.domain.errors import (
    AccountClosed,
    AccountFrozen,
    AccountNotFound,
    CaptureExceedsHold,
    HoldNotActive,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidHold,
    InvalidTransfer,
    LedgerError,
    LegCurrencyMismatch,
    TransferNotFound,
)
from ledger.domain.hold import Hold, HoldState
from ledger.domain.refusal import Refusal
from ledger.domain.results import AccountResult, HoldResult, TransferResult
from ledger.domain.transfer import Transfer

# PostgreSQL's bigint holds 9.22e18; a bank-internal account summing the largest legs could
# reach it after some thousands of transfers. A balance stays within this or is refused.
BALANCE_MINOR_MAX = 9 * 10**18

Loader = Callable[[UUID], Any]
BalanceLoader = Callable[[UUID], Balance]


def capture_transfer_id(hold_id: str, capture_id: str) -> str:
    """The client transfer id of a capture (client ids may not contain the infix)."""
    return f"{hold_id}{c.CAPTURE_INFIX}{capture_id}"


def reversal_transfer_id(transfer_id: str) -> str:
    """The client transfer id of a transfer's reversal: one per transfer."""
    return f"{transfer_id}{c.REVERSAL_SUFFIX}"


def aggregate_ids_of(command: Any) -> tuple[list[UUID], list[UUID]]:
    """The aggregates a command will look up, so that a writer can fetch them together:
    those it creates unless they exist (a retried transfer or hold finds its first
    result there), and those it needs to exist."""
    if isinstance(command, c.PostTransfer):
        return [Transfer.id_for(command.transfer_id)], [leg.account_id for leg in command.legs]
    if isinstance(command, c.PlaceHold):
        return [Hold.id_for(command.hold_id)], [command.debit_account_id, command.credit_account_id]
    if isinstance(command, c.CaptureHold):
        return [Transfer.id_for(capture_transfer_id(command.hold_id, command.capture_id))], [Hold.id_for(command.hold_id)]
    if isinstance(command, c.ReverseTransfer):
        return [Transfer.id_for(reversal_transfer_id(command.transfer_id))], [Transfer.id_for(command.transfer_id)]
    if isinstance(command, (c.VoidHold, c.ExpireHold)):
        return [], [Hold.id_for(command.hold_id)]
    return ([command.account_id], []) if isinstance(command, c.OpenAccount) else ([], [command.account_id])


class Batch:
    """Apply commands in memory; `finish()` hands the writer every aggregate to save.

    `load(aggregate_id)` returns the current aggregate or None; `balance_of(account_id)`
    the saved balance of an existing account. The Batch mutates the aggregates it is
    given: if saving them fails, the writer must drop them (and reload).
    Use a Batch once: execute commands, call `finish()`, save what it returns.
    """

    def __init__(self, load: Loader, balance_of: BalanceLoader, now: datetime) -> None:
        self._load = load
        self._balance_of = balance_of
        self.now = now
        self._touched: dict[UUID, Any] = {}  # every aggregate changed in this batch, in first-touch order
        # Every event of the batch in the order its commands triggered them, as the log must
        # tell it: an account unfrozen, paid from and frozen again in one batch was logged
        # unfrozen, frozen, paid (aggregate after aggregate), a payment on a card frozen for fraud.
        self.events: list[Any] = []
        self._events_taken: dict[UUID, int] = {}  # of each touched aggregate's pending events, how many are in `events`
        self._touched_by_command: list[Any] = []
        self._balances: dict[UUID, Balance] = {}  # as saved before this batch
        # Accounts whose balance row moves on though no money moved: new ones, and those
        # whose state or credit limit changed. The funds check depends on those too, so a
        # second writer holding the account as it was must fail to save, not pass.
        self._resaved: list[UUID] = []
        self._posted_delta: dict[UUID, int] = {}
        self._held_delta: dict[UUID, int] = {}
        self._incoming_held_delta: dict[UUID, int] = {}
        self._judged_by: dict[UUID, None] = {}  # every existing account a command looked at, in order
        self._judged_absent: dict[UUID, None] = {}  # every account or hold a command looked for and did not find

    # ---- lookups -------------------------------------------------------------------------

    def _get(self, aggregate_id: UUID) -> Any | None:
        aggregate = self._touched.get(aggregate_id)
        return aggregate if aggregate is not None else self._load(aggregate_id)

    def _touch(self, aggregate: Any, *, resave_balance: bool = False) -> None:
        self._touched.setdefault(aggregate.id, aggregate)
        self._touched_by_command.append(aggregate)
        if resave_balance:
            self._balance(aggregate.id)
            self._resaved.append(aggregate.id)

    def account(self, account_id: UUID) -> Account:
        account = self._get(account_id)
        if not isinstance(account, Account):
            if account is None:
                self._judged_absent[account_id] = None
            raise AccountNotFound(f"no account {account_id}")
        self._judged_by[account.id] = None
        return account

    def _balance(self, account_id: UUID) -> Balance:
        balance = self._balances.get(account_id)
        if balance is None:
            balance = self._balances[account_id] = self._balance_of(account_id)
        return balance

    def posted_minor(self, account: Account) -> int:
        return self._balance(account.id).posted_minor + self._posted_delta.get(account.id, 0)

    def held_minor(self, account: Account) -> int:
        return self._balance(account.id).held_minor + self._held_delta.get(account.id, 0)

    def incoming_held_minor(self, account: Account) -> int:
        return self._balance(account.id).incoming_held_minor + self._incoming_held_delta.get(account.id, 0)

    def available_minor(self, account: Account) -> int:
        return available_minor(self.posted_minor(account), self.held_minor(account), account.credit_limit_minor)

    # ---- dispatch ------------------------------------------------------------------------

    def execute(self, command: Any) -> Any:
        handler = {
            c.OpenAccount: self._open_account,
            c.FreezeAccount: self._freeze,
            c.UnfreezeAccount: self._unfreeze,
            c.CloseAccount: self._close,
            c.SetCreditLimit: self._set_credit_limit,
            c.PostTransfer: self._post_transfer,
            c.ReverseTransfer: self._reverse_transfer,
            c.PlaceHold: self._place_hold,
            c.CaptureHold: self._capture_hold,
            c.VoidHold: self._void_hold,
            c.ExpireHold: self._expire_hold,
        }[type(command)]
        self._touched_by_command = []
        try:
            return handler(command)
        finally:  # a refusal kept is an event too
            self._take_new_events()

    def _take_new_events(self) -> None:
        for aggregate in self._touched_by_command:  # bounded by what one command touches
            pending = aggregate.pending_events
            taken = self._events_taken.get(aggregate.id, 0)
            self.events.extend(pending[taken:])
            self._events_taken[aggregate.id] = len(pending)

    def touched(self, aggregate_id: UUID) -> Any | None:
        """The aggregate as this batch has changed it so far, or None if it has not."""
        return self._touched.get(aggregate_id)

    @property
    def touched_ids(self) -> list[UUID]:
        """Every aggregate this batch has changed so far (to drop if it cannot be saved)."""
        return list(self._touched)

    def finish(self) -> tuple[list[Any], dict[UUID, Balance]]:
        """Every aggregate with new events, and the new balance of every account opened,
        changed or whose money moved in this batch: the writer saves both in one transaction."""
        aggregates = [aggregate for aggregate in self._touched.values() if aggregate.pending_events]
        if sum(len(aggregate.pending_events) for aggregate in aggregates) != len(self.events):
            raise AssertionError("an event was triggered on an aggregate its command did not touch")
        balances = {
            account_id: self._balance(account_id).changed(
                self._posted_delta.get(account_id, 0), self._held_delta.get(account_id, 0),
                self._incoming_held_delta.get(account_id, 0),
            )
            for account_id in dict.fromkeys(
                [*self._resaved, *self._posted_delta, *self._held_delta, *self._incoming_held_delta])
        }
        return aggregates, balances

    def versions_only_read(self, saved: dict[UUID, Balance]) -> dict[UUID, int]:
        """The saved balance version of every account this batch judged by but does not
        save (`saved` is what `finish` returned): a refusal, or a no-op, for the account's
        funds or state holds only if that balance row (which moves with the state too) is
        still at this version when the batch commits. And version 0 (no balance yet, no
        events) for every account or hold it found absent: a payment refused for want of
        its account is kept for good, so it holds only if nothing is stored under that id
        when the batch commits either."""
        read = {account_id: self._balance(account_id).version for account_id in self._judged_by
                if account_id not in saved}
        read.update((aggregate_id, 0) for aggregate_id in self._judged_absent if aggregate_id not in saved)
        return read

    @contextmanager
    def _refusal_kept(self, refused_id: UUID, client_id: str, request_fingerprint: str, requested_by: str | None
                      ) -> Iterator[None]:
        """A refusal from here on depends on the ledger's state (funds, states, deadlines):
        it is kept under the id the command would have created, so a repeat gets it again
        (refusal.py). A conflict is not kept: it names an id that is taken already."""
        try:
            yield
        except IdempotencyConflict:
            raise
        except LedgerError as refusal:
            self._touch(Refusal(refused_id=refused_id, client_id=client_id, request_fingerprint=request_fingerprint,
                                code=refusal.code, detail=str(refusal), timestamp=self.now, requested_by=requested_by))
            raise

    def _post(self, account: Account, amount_minor: int) -> None:
        self._posted_delta[account.id] = self._posted_delta.get(account.id, 0) + amount_minor

    def _reserve(self, debit: Account, credit: Account, held_delta_minor: int) -> None:
        """A hold's reservation moves: held on its debit account, to be paid into its credit account."""
        self._held_delta[debit.id] = self._held_delta.get(debit.id, 0) + held_delta_minor
        self._incoming_held_delta[credit.id] = self._incoming_held_delta.get(credit.id, 0) + held_delta_minor

    # ---- accounts ------------------------------------------------------------------------

    def _open_account(self, command: c.OpenAccount) -> AccountResult:
        # The shape first, as for every command: a malformed request is refused before its
        # id is looked up, so no command is refused for what it found (or did not find) under
        # a new id without keeping that refusal (see refusal.py; the writer relies on it).
        c.check_account_shape(command)
        existing = self._get(command.account_id)
        if existing is not None:
            same = (
                isinstance(existing, Account) and existing.owner_id == command.owner_id and existing.kind == command.kind
                and existing.currency == command.currency
                and existing.opened_with_credit_limit_minor == command.credit_limit_minor
            )
            if not same:
                raise IdempotencyConflict(f"account {command.account_id} already exists with other attributes")
            return AccountResult(str(existing.id), existing.state, replayed=True)
        account = Account(
            account_id=command.account_id, owner_id=command.owner_id, kind=AccountKind(command.kind).value,
            currency=command.currency,
            credit_limit_minor=command.credit_limit_minor, timestamp=self.now, requested_by=command.requested_by,
        )
        self._touch(account)
        self._balances[account.id] = Balance()
        self._resaved.append(account.id)
        return AccountResult(str(account.id), account.state)

    def _freeze(self, command: c.FreezeAccount) -> AccountResult:
        account = self.account(command.account_id)
        account.check_freeze(command.reason)
        if account.adds_a_freeze(command.reason):
            self._touch(account, resave_balance=True)
            account.freeze(command.reason, at=self.now, requested_by=command.requested_by)
        return AccountResult(str(account.id), account.state)

    def _unfreeze(self, command: c.UnfreezeAccount) -> AccountResult:
        account = self.account(command.account_id)
        account.check_freeze(command.reason)
        if account.lifts_a_freeze(command.reason):
            self._touch(account, resave_balance=True)
            account.unfreeze(command.reason, at=self.now, requested_by=command.requested_by)
        return AccountResult(str(account.id), account.state)

    def _close(self, command: c.CloseAccount) -> AccountResult:
        account = self.account(command.account_id)
        if account.state == AccountState.CLOSED:
            return AccountResult(str(account.id), account.state, replayed=True)
        # This batch's postings and holds count.
        account.close(command.reason, self.posted_minor(account), self.held_minor(account), self.incoming_held_minor(account),
                      at=self.now, requested_by=command.requested_by)
        self._touch(account, resave_balance=True)
        return AccountResult(str(account.id), account.state)

    def _set_credit_limit(self, command: c.SetCreditLimit) -> AccountResult:
        account = self.account(command.account_id)
        account.set_credit_limit(command.credit_limit_minor, self.posted_minor(account), self.held_minor(account),
                                 at=self.now, requested_by=command.requested_by)
        self._touch(account, resave_balance=True)
        return AccountResult(str(account.id), account.state)

    # ---- transfers -----------------------------------------------------------------------

    def _check_debit(self, account: Account, amount_minor: int, what: str) -> None:
        """amount_minor > 0 is taken from the account (by a debit leg or a new hold)."""
        if account.state == AccountState.FROZEN:
            raise AccountFrozen(f"account {account.id} is frozen: {what} refused")
        if not account.is_internal and self.available_minor(account) < amount_minor:
            raise InsufficientFunds(
                f"account {account.id} has {self.available_minor(account)} {account.currency} (minor units) available,"
                f" {what} needs {amount_minor}"
            )

    def _check_fits(self, account: Account, posted_delta_minor: int, error: type[LedgerError], *,
                    held_delta_minor: int = 0, incoming_held_delta_minor: int = 0) -> None:
        """A balance the store (bigint) can hold, now and once every live hold on the account
        is captured: past it, the batch could not be saved at all, or a hold the ledger
        accepted (a promise to its payee) could never be captured. Checked on the side the
        change moves the account towards."""
        saved = self._balance(account.id)  # once: this runs for every leg of every transfer
        posted_minor = saved.posted_minor + self._posted_delta.get(account.id, 0) + posted_delta_minor
        if posted_delta_minor < 0 or held_delta_minor > 0:
            held_minor = saved.held_minor + self._held_delta.get(account.id, 0) + held_delta_minor
            fits = posted_minor - held_minor >= -BALANCE_MINOR_MAX
        else:
            incoming_minor = saved.incoming_held_minor + self._incoming_held_delta.get(account.id, 0)
            fits = posted_minor + incoming_minor + incoming_held_delta_minor <= BALANCE_MINOR_MAX
        if not fits:
            raise error(f"account {account.id} would pass {BALANCE_MINOR_MAX} minor units, the most a balance may hold"
                        " (its live holds captured)")

    def _check_held_fits(self, debit: Account, credit: Account, amount_minor: int) -> None:
        """Held amounts are bigints too; a bank-internal account reserves without a funds
        check, and any account may be paid into by many holds."""
        for account, held_minor in ((debit, self.held_minor(debit)), (credit, self.incoming_held_minor(credit))):
            if held_minor + amount_minor > BALANCE_MINOR_MAX:
                raise InvalidHold(f"account {account.id} would hold more than {BALANCE_MINOR_MAX} minor units,"
                                  " the most a balance may hold")

    @staticmethod
    def _check_open_in(account: Account, currency: str, what: str) -> None:
        if account.currency != currency:
            raise LegCurrencyMismatch(f"account {account.id} holds {account.currency}, {what} is in {currency}")
        if account.state == AccountState.CLOSED:
            raise AccountClosed(f"account {account.id} is closed")

    def _post_transfer(self, command: c.PostTransfer) -> TransferResult:
        c.check_transfer_shape(command)
        request_fingerprint = c.fingerprint(command)
        transfer_id = Transfer.id_for(command.transfer_id)
        existing = self._get(transfer_id)
        if existing is not None:
            _check_repeat(existing, Transfer, request_fingerprint, f"transfer {command.transfer_id}")
            return _transfer_result(existing, replayed=True)
        with self._refusal_kept(transfer_id, command.transfer_id, request_fingerprint, command.requested_by):
            accounts = [self.account(leg.account_id) for leg in command.legs]
            for leg, account in zip(command.legs, accounts, strict=True):
                self._check_open_in(account, leg.currency, "the leg")
                if leg.amount_minor < 0:
                    self._check_debit(account, -leg.amount_minor, "the transfer")
                self._check_fits(account, leg.amount_minor, InvalidTransfer)
        legs = [{"account_id": str(leg.account_id), "amount_minor": leg.amount_minor, "currency": leg.currency}
                for leg in command.legs]
        transfer = Transfer(
            client_transfer_id=command.transfer_id, legs=legs, code=command.code, external_ref=command.external_ref,
            customer_ids=list(command.customer_ids), metadata=dict(command.metadata),
            request_fingerprint=request_fingerprint, posted_at=self.now, timestamp=self.now,
            leg_owner_ids=[account.customer_id for account in accounts],
            requested_by=command.requested_by,
        )
        self._touch(transfer)
        for leg, account in zip(command.legs, accounts, strict=True):
            self._post(account, leg.amount_minor)
        return _transfer_result(transfer)

    def _reverse_transfer(self, command: c.ReverseTransfer) -> TransferResult:
        """A new transfer moving the legs of a posted one back, under its reversal id: at most
        one per transfer. Its refusal is not kept (the payee may not have the money yet; the
        bank tries again once she has), and nothing else is ever posted under that id."""
        c.check_reversal_shape(command)
        request_fingerprint = c.fingerprint(command)
        reversal_id = reversal_transfer_id(command.transfer_id)
        existing = self._get(Transfer.id_for(reversal_id))
        if existing is not None:
            _check_repeat(existing, Transfer, request_fingerprint, f"the reversal of transfer {command.transfer_id}")
            return _transfer_result(existing, replayed=True)
        original = self._get(Transfer.id_for(command.transfer_id))
        if not isinstance(original, Transfer):
            raise TransferNotFound(f"no transfer {command.transfer_id}")
        legs = [{**leg, "amount_minor": -leg["amount_minor"]} for leg in original.legs]
        accounts = [self.account(UUID(leg["account_id"])) for leg in legs]
        # The rules of any transfer: whoever was paid must have the money to give back, and
        # a frozen or closed account is not debited (the bank lifts a freeze first, if it may).
        for leg, account in zip(legs, accounts, strict=True):
            self._check_open_in(account, leg["currency"], "the reversal")
            if leg["amount_minor"] < 0:
                self._check_debit(account, -leg["amount_minor"], "the reversal")
            self._check_fits(account, leg["amount_minor"], InvalidTransfer)
        transfer = Transfer(
            client_transfer_id=reversal_id, legs=legs, code=c.REVERSAL_CODE, external_ref=original.external_ref,
            customer_ids=list(original.customer_ids), metadata=dict(original.metadata),
            request_fingerprint=request_fingerprint, posted_at=self.now, timestamp=self.now,
            leg_owner_ids=[account.customer_id for account in accounts], requested_by=command.requested_by,
            reverses=command.transfer_id, reversal_reason=command.reason, reversal_case_ref=command.case_ref,
        )
        self._touch(transfer)
        for leg, account in zip(legs, accounts, strict=True):
            self._post(account, leg["amount_minor"])
        return _transfer_result(transfer)

    # ---- holds ---------------------------------------------------------------------------

    def hold(self, hold_id: str) -> Hold:
        hold = self._get(Hold.id_for(hold_id))
        if not isinstance(hold, Hold):
            if hold is None:
                self._judged_absent[Hold.id_for(hold_id)] = None
            raise HoldNotFound(f"no hold {hold_id}")
        return hold

    def _place_hold(self, command: c.PlaceHold) -> HoldResult:
        c.check_hold_shape(command)
        request_fingerprint = c.fingerprint(command)
        hold_id = Hold.id_for(command.hold_id)
        existing = self._get(hold_id)
        if existing is not None:
            _check_repeat(existing, Hold, request_fingerprint, f"hold {command.hold_id}")
            return _first_hold_result(existing)
        with self._refusal_kept(hold_id, command.hold_id, request_fingerprint, command.requested_by):
            debit, credit = self.account(command.debit_account_id), self.account(command.credit_account_id)
            for account in (debit, credit):
                self._check_open_in(account, command.currency, "the hold")
            if command.expires_at <= self.now:
                raise InvalidHold(
                    f"hold {command.hold_id} would expire at {command.expires_at.isoformat()}, which has passed")
            self._check_debit(debit, command.amount_minor, "the hold")
            self._check_held_fits(debit, credit, command.amount_minor)
            self._check_fits(debit, 0, InvalidHold, held_delta_minor=command.amount_minor)
            self._check_fits(credit, 0, InvalidHold, incoming_held_delta_minor=command.amount_minor)
        hold = Hold(
            client_hold_id=command.hold_id, debit_account_id=str(debit.id), credit_account_id=str(credit.id),
            amount_minor=command.amount_minor, currency=command.currency, expires_at=command.expires_at,
            code=command.code, request_fingerprint=request_fingerprint, timestamp=self.now,
            debit_customer_id=debit.customer_id, requested_by=command.requested_by,
            external_ref=command.external_ref, metadata=dict(command.metadata),
        )
        self._touch(hold)
        # The credit account's money does not move yet, but its balance row does (what holds
        # will pay into it), so a writer that missed its closing cannot save the hold.
        self._reserve(debit, credit, command.amount_minor)
        return _hold_result(hold)

    def _capture_hold(self, command: c.CaptureHold) -> HoldResult:
        c.check_capture_shape(command)
        request_fingerprint = c.fingerprint(command)
        transfer_id = capture_transfer_id(command.hold_id, command.capture_id)
        capture_key = Transfer.id_for(transfer_id)
        earlier = self._get(capture_key)  # the capture's transfer, or its refusal
        if isinstance(earlier, Refusal):
            _check_repeat(earlier, Transfer, request_fingerprint, f"capture {command.capture_id} of hold {command.hold_id}")
        with self._refusal_kept(capture_key, transfer_id, request_fingerprint, command.requested_by):
            hold = self.hold(command.hold_id)
            if command.capture_id in hold.captures:
                if hold.captures[command.capture_id] != command.amount_minor:
                    raise IdempotencyConflict(f"capture {command.capture_id} of hold {command.hold_id} had another amount")
                return _first_hold_result(hold, command.capture_id, transfer_id)
            if hold.state != HoldState.ACTIVE:
                raise HoldNotActive(f"hold {command.hold_id} is {hold.state}")
            if self.now >= hold.expires_at:
                raise HoldNotActive(f"hold {command.hold_id} expired at {hold.expires_at.isoformat()}")
            if command.amount_minor > hold.remaining_minor:
                raise CaptureExceedsHold(
                    f"capture of {command.amount_minor} exceeds the {hold.remaining_minor} {hold.currency} (minor units)"
                    f" left on hold {command.hold_id}"
                )
            hold.check_room_for_a_capture()
            if earlier is not None:
                # Cannot happen for ids checked by the shape rules; kept so that an old id never breaks a whole batch.
                raise IdempotencyConflict(f"transfer {transfer_id} exists already; use another capture_id")
            debit = self.account(UUID(hold.debit_account_id))
            credit = self.account(UUID(hold.credit_account_id))
            for account in (debit, credit):
                if account.state == AccountState.CLOSED:
                    raise AccountClosed(f"account {account.id} is closed")
            # No funds check and no freeze check on the debit: the money was reserved when
            # the hold was placed, and a capture only settles what was promised then.
            self._check_fits(debit, -command.amount_minor, InvalidHold, held_delta_minor=-command.amount_minor)
            self._check_fits(credit, command.amount_minor, InvalidHold, incoming_held_delta_minor=-command.amount_minor)
        legs = [
            {"account_id": str(debit.id), "amount_minor": -command.amount_minor, "currency": hold.currency},
            {"account_id": str(credit.id), "amount_minor": command.amount_minor, "currency": hold.currency},
        ]
        transfer = Transfer(
            # customer_ids, the reference a client gives with its transfers, names the payer
            # (as a capture's always has); the event reaches its customers by leg_owner_ids.
            # Its references are the hold's: the line in history names the purchase.
            client_transfer_id=transfer_id, legs=legs, code=hold.code, external_ref=hold.external_ref,
            customer_ids=[debit.customer_id] if debit.customer_id is not None else [], metadata=dict(hold.metadata),
            request_fingerprint=request_fingerprint, posted_at=self.now, timestamp=self.now, hold_id=command.hold_id,
            capture_id=command.capture_id, requested_by=command.requested_by,
            leg_owner_ids=[debit.customer_id, credit.customer_id],
        )
        self._touch(transfer)
        self._touch(hold)
        hold.capture(client_hold_id=command.hold_id, capture_id=command.capture_id, amount_minor=command.amount_minor,
                     transfer_id=transfer_id, debit_customer_id=debit.customer_id, at=self.now,
                     requested_by=command.requested_by)
        self._reserve(debit, credit, -command.amount_minor)
        self._post(debit, -command.amount_minor)
        self._post(credit, command.amount_minor)
        return _hold_result(hold, transfer_id=transfer_id)

    def _void_hold(self, command: c.VoidHold) -> HoldResult:
        hold = self.hold(command.hold_id)
        if hold.state == HoldState.ACTIVE and self.now >= hold.expires_at:
            # Past its deadline a hold holds nothing, swept or not: the void finds it expired, and
            # so does every void after it. Before, a void in the seconds before the sweep was
            # recorded voided and answered 200, one after it refused 409: the answer and the
            # analysts' count of voids and expiries hung on the sweep's timing.
            self._release(hold, expire=True, requested_by=c.REQUESTED_BY_LEDGER)
            return _hold_result(hold)
        if hold.state in (HoldState.VOIDED, HoldState.EXPIRED):
            return _hold_result(hold, replayed=True)  # nothing is held any more: a repeat learns how it ended
        if hold.state != HoldState.ACTIVE:
            raise HoldNotActive(f"hold {command.hold_id} is {hold.state}")
        self._release(hold, expire=False, requested_by=command.requested_by)
        return _hold_result(hold)

    def _expire_hold(self, command: c.ExpireHold) -> HoldResult:
        hold = self.hold(command.hold_id)
        if hold.state != HoldState.ACTIVE or self.now < hold.expires_at:
            return _hold_result(hold, replayed=True)  # already settled, or not due: nothing to do
        self._release(hold, expire=True, requested_by=command.requested_by)
        return _hold_result(hold)

    def _release(self, hold: Hold, *, expire: bool, requested_by: str | None) -> None:
        debit, credit = self.account(UUID(hold.debit_account_id)), self.account(UUID(hold.credit_account_id))
        released = hold.remaining_minor
        self._touch(hold)
        if expire:
            hold.expire(client_hold_id=hold.client_hold_id, released_minor=released, debit_customer_id=debit.customer_id,
                        at=self.now, requested_by=requested_by)
        else:
            hold.void(client_hold_id=hold.client_hold_id, released_minor=released, debit_customer_id=debit.customer_id,
                      at=self.now, requested_by=requested_by)
        if released:
            self._reserve(debit, credit, -released)


def _check_repeat(existing: Any, kind: type, request_fingerprint: str, what: str) -> None:
    """`existing` is under the id a request would create: a repeat must have the same body,
    else it conflicts; the repeat of a refused request is refused again, alike."""
    if not isinstance(existing, (kind, Refusal)) or existing.request_fingerprint != request_fingerprint:
        raise IdempotencyConflict(f"{what} was used before with another body")
    if isinstance(existing, Refusal):
        raise existing.error()


def _transfer_result(transfer: Transfer, replayed: bool = False) -> TransferResult:
    return TransferResult(
        transfer_id=transfer.client_transfer_id, code=transfer.code, legs=list(transfer.legs),
        posted_at=transfer.posted_at, hold_id=transfer.hold_id, replayed=replayed,
    )


def _first_hold_result(hold: Hold, capture_id: str | None = None, transfer_id: str | None = None) -> HoldResult:
    """A repeated placement's or capture's answer: its first one, the hold as it stood just
    placed or just after that capture, whatever became of it since (a card network retrying
    its first capture after the second must not read the second's outcome as its own)."""
    captured_minor = 0
    if capture_id is not None:
        for earlier_id, amount_minor in hold.captures.items():  # in the order made; at most CAPTURES_PER_HOLD_MAX
            captured_minor += amount_minor
            if earlier_id == capture_id:
                break
    remaining_minor = hold.amount_minor - captured_minor
    return HoldResult(
        hold_id=hold.client_hold_id, state=HoldState.ACTIVE.value if remaining_minor else HoldState.CAPTURED.value,
        amount_minor=hold.amount_minor, captured_minor=captured_minor, remaining_minor=remaining_minor,
        expires_at=hold.expires_at, transfer_id=transfer_id, replayed=True,
    )


def _hold_result(hold: Hold, transfer_id: str | None = None, replayed: bool = False) -> HoldResult:
    return HoldResult(
        hold_id=hold.client_hold_id, state=hold.state, amount_minor=hold.amount_minor,
        captured_minor=hold.captured_minor, remaining_minor=hold.remaining_minor, expires_at=hold.expires_at,
        transfer_id=transfer_id, replayed=replayed,
    )
