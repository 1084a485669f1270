"""The ledger's internal HTTP API, for other services (thin: parse, submit, answer).

Every call carries an access token (ARCHITECTURE.md §6: tokens are checked by the gateway
and again by each service). Moving money or managing accounts needs the `ledger:post`
role (a service's token); reading any account needs it or `ledger:read`. A customer's own
token, which the gateway passes on, reads only the customer's accounts: another's answers
404, exactly like an account that does not exist.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from datetime import datetime, timedelta
from typing import Annotated, Any
from uuid import UUID, uuid5

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from kabinet_chassis.auth import Principal
from kabinet_chassis.errors import Problem, problem_responses
from kabinet_chassis.idempotency import callers_scope, idempotency_key, run_once
from kabinet_contracts import ledger_api
from kabinet_contracts.ledger import BANK_OWNER_ID, CloseReason, FreezeReason, ReversalReason
from kabinet_contracts.roles import LEDGER_POST, LEDGER_READ
from ledger import projections
from ledger.domain import commands
from ledger.domain.account import AccountKind
from ledger.domain.errors import LedgerError
from ledger.writer import LedgerBusy, LedgerUnavailable


def _outside_the_calendar() -> ValueError:
    return ValueError(f"must be from {commands.INSTANT_MIN.isoformat()} to before {commands.INSTANT_MAX.isoformat()}")


def _within_the_ledgers_calendar(instant: datetime) -> datetime:
    if not commands.INSTANT_MIN <= instant < commands.INSTANT_MAX:
        raise _outside_the_calendar()
    return instant


# An instant as RFC 3339 writes it: a date, a time to the second (with a fraction if need
# be, after a point or, as ISO 8601 allows, a comma) and its offset from UTC. Parsing alone
# would take a number too, as seconds since 1970, or as milliseconds once it is large
# enough: a bank's API does not guess which, and its fraction would come rounded.
_RFC_3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")


def _written_as_rfc_3339(value: Any) -> Any:
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC_3339.fullmatch(value)):
        return value
    raise ValueError("an instant is written as RFC 3339: 2026-11-26T12:00:00Z, or with its offset, +03:00")


WrittenAsRfc3339 = BeforeValidator(_written_as_rfc_3339)  # last in an Annotated list: it runs first
# An instant with a timezone, in the range the ledger stores (a far-off one would overflow
# on its way to UTC and answer 500 instead of naming the field).
Instant = Annotated[AwareDatetime, AfterValidator(_within_the_ledgers_calendar), WrittenAsRfc3339]

_BEYOND_MICROSECONDS = re.compile(r"[.,]\d{6}(\d+)")


def _rounded_up_to_a_microsecond(value: Any, parse: ValidatorFunctionWrapHandler) -> datetime:
    """The ledger keeps microseconds; a client may write nanoseconds (Go's RFC3339Nano,
    Java's Instant), which parsing cuts off. Cut, 12:00:00.123456500 would fall before a
    posting made at 12:00:00.123456. Rounded up, the entries before the microsecond used
    are exactly those before the instant written, whichever side of a period it bounds."""
    instant = parse(value)
    beyond = _BEYOND_MICROSECONDS.search(value) if isinstance(value, str) else None
    if not (beyond and beyond.group(1).strip("0")):
        return instant
    try:
        return instant + timedelta(microseconds=1)
    except OverflowError:  # the last microsecond of year 9999 has none after it: bad input, not a 500
        raise _outside_the_calendar() from None


# An instant a read is asked at or bounded by (`at`, `since`, `until`).
BoundaryInstant = Annotated[AwareDatetime, WrapValidator(_rounded_up_to_a_microsecond),
                            AfterValidator(_within_the_ledgers_calendar), WrittenAsRfc3339]
# An amount of money in a request body: a JSON integer and nothing else. Parsed leniently,
# `true` would move one kopeck, "250" or 300.0 three hundred: a client's serialisation bug
# must be refused by name, not paid out.
MinorUnits = Annotated[int, Strict()]

CODE_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
# A transfer's or a hold's code.
PostingCode = Annotated[str, Field(pattern=CODE_PATTERN, description="why the money moves (`top_up`, `card_purchase`…);"
                                                                      " not `reversal`, which only reversals carry")]
CURRENCY_PATTERN = r"^[A-Z]{3}$"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
HoldId = Annotated[str, Path(pattern=ID_PATTERN)]
# Any transfer's id: a client's, a capture's (hold id, ":capture:", capture id) or a reversal's (":reversal" after).
_TRANSFER_ID_CHARS_MAX = commands.POSTED_TRANSFER_ID_CHARS_MAX + len(commands.REVERSAL_SUFFIX)
_TRANSFER_ID_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._:\-]{{0,{_TRANSFER_ID_CHARS_MAX - 1}}}$"
TransferId = Annotated[str, Path(pattern=_TRANSFER_ID_PATTERN)]


# Every idempotent ledger call stores a business refusal (409 account_closed, say) as its answer.
_run_once = functools.partial(run_once, refusals=(LedgerError,))

# A page cursor: the (position, seq) of the last line of the page before, as "position.seq"
# (bigint and int, so bounded in digits).
_CURSOR_PATTERN = r"^\d{1,18}\.\d{1,4}$"
# A statement's page cursor also names the log position its first page was read as of
# ("position.seq.as_of"), so every page of one statement shows the same period as then.
_STATEMENT_CURSOR_PATTERN = r"^\d{1,18}\.\d{1,4}\.\d{1,18}$"
# A page of transfers found by reference: the id of the last transfer on the page before.
TransferCursor = Annotated[str | None, Query(pattern=_TRANSFER_ID_PATTERN)]
# A poster's reference to search by. No NUL: PostgreSQL text cannot hold one, so no reference has one.
ExternalRef = Annotated[str, Query(min_length=1, max_length=commands.ID_CHARS_MAX, pattern=r"^[^\x00]+$")]
# A page of holds: the log position of the last hold's placement on the page before.
_HOLDS_CURSOR_PATTERN = r"^\d{1,18}$"
HoldsCursor = Annotated[str | None, Query(pattern=_HOLDS_CURSOR_PATTERN)]


def _as_the_contract_says(query: type[BaseModel], name: str, **rules: Any) -> Any:
    """`Query(**rules)`, described as the customer API's contract (kabinet_contracts.ledger_api)
    describes the parameter: the gateway passes these reads on, and the ledger's document must
    say as much as the gateway's (that an amount filter takes credits and debits alike, say)."""
    return Query(description=query.model_fields[name].description, **rules)


def _after(cursor: str | None) -> tuple[int, ...] | None:
    return tuple(int(part) for part in cursor.split(".")) if cursor is not None else None


def _cursor(after: tuple[int, ...] | None) -> str | None:
    return ".".join(map(str, after)) if after else None


QUERY_ERRORS_SHOWN_MAX = 10  # a query of thousands of made-up names is answered in a few lines


def _query_as_declared(request: Request) -> None:
    """A read's query holds only the parameters its route declares, each once. Ignored, a
    misspelt one (`date` for `at`, `amount_min` for `amount_min_minor`) or a second `code`
    would get an answer that looks like the one asked for: today's balance, the whole history."""
    declared = {param.alias for param in request.scope["route"].dependant.query_params}  # none come through dependencies
    given = Counter(name for name, _ in request.query_params.multi_items())
    errors = [{"loc": ("query", name), "type": "extra_forbidden", "msg": "not a parameter of this request"}
              if name not in declared else {"loc": ("query", name), "type": "repeated", "msg": "given more than once"}
              for name, count in given.items() if name not in declared or count > 1]
    if errors:
        raise RequestValidationError(errors[:QUERY_ERRORS_SHOWN_MAX])


QUERY_AS_DECLARED = [Depends(_query_as_declared)]


# An account opened without an id gets one derived from the request's Idempotency-Key, as
# kept for its caller: a retry after a failure that released the key (a 5xx after the
# commit) opens the same account again, which the ledger answers as a replay, never a
# second account; another caller's same key derives another account.
ACCOUNT_IDS_BY_KEY = UUID("3d7f2a10-5b7e-4c1d-8e2f-9a6b4c0d1e22")
OPEN_ACCOUNT_SCOPE = "ledger.open_account"


def _derived_account_id(kept_scope: str, key: str) -> UUID:
    # A key kept under the bare scope was sent before keys named their caller, when the
    # account was derived from the key alone: its retry must reach that same account.
    return uuid5(ACCOUNT_IDS_BY_KEY, key if kept_scope == OPEN_ACCOUNT_SCOPE else f"{kept_scope}\n{key}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAccountBody(_Body):
    account_id: UUID | None = None
    owner_id: str = Field(min_length=1, max_length=128)
    kind: AccountKind  # named in the schema; an unknown one is refused by name (never echoed back, whatever its size)
    currency: str = Field(pattern=CURRENCY_PATTERN)
    credit_limit_minor: MinorUnits = Field(default=0, ge=0)


class FreezeBody(_Body):
    reason: FreezeReason = Field(description="why; freezes stack, one per reason, each lifted on its own")


class UnfreezeBody(_Body):
    reason: FreezeReason = Field(description="the reason of the freeze it lifts: the account stays frozen while"
                                             " another is left")


class CloseBody(_Body):
    reason: CloseReason


class CreditLimitBody(_Body):
    credit_limit_minor: MinorUnits = Field(ge=0, description="how far below zero the account may go; 0 for none")


class LegBody(_Body):
    account_id: UUID
    amount_minor: MinorUnits = Field(description="positive credits the account, negative debits it")
    currency: str = Field(pattern=CURRENCY_PATTERN)


class TransferBody(_Body):
    transfer_id: str = Field(pattern=ID_PATTERN, description="client-given; the idempotency key")
    legs: list[LegBody] = Field(min_length=2, max_length=64)
    code: PostingCode
    external_ref: str | None = Field(default=None, max_length=commands.ID_CHARS_MAX)
    customer_ids: list[str] = Field(default_factory=list, max_length=16)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)


class PlaceHoldBody(_Body):
    hold_id: str = Field(pattern=ID_PATTERN)
    debit_account_id: UUID
    credit_account_id: UUID
    amount_minor: MinorUnits = Field(gt=0)
    currency: str = Field(pattern=CURRENCY_PATTERN)
    expires_at: Instant
    code: PostingCode
    # What the hold is for (a card authorisation's RRN, the merchant): its captures post with them.
    external_ref: str | None = Field(default=None, max_length=commands.ID_CHARS_MAX)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)


class ReversalBody(_Body):
    reason: ReversalReason
    case_ref: str | None = Field(default=None, min_length=1, max_length=commands.ID_CHARS_MAX,
                                 description="the bank's case that decided it (a dispute, a support ticket, an"
                                             " internal memo), kept with the reversal for auditors; not shown to"
                                             " customers")


class CaptureBody(_Body):
    capture_id: str = Field(pattern=ID_PATTERN)
    amount_minor: MinorUnits = Field(gt=0)


# How long a read from the read model waits for it to show what was committed before the
# read came (a moment, longer under load); within the 5 s the gateway gives the ledger.
READ_MODEL_WAIT_S = 2.0
# How long a command about an account waits for the read model before answering 503: its
# answer is the account as the read model shows it, and a retry answers from its key.
COMMAND_READ_MODEL_WAIT_S = 30.0


class Ledger:
    """What the routes need; filled in when the service starts."""

    writer: Any = None
    pool: Any = None
    claimant: Any = None  # this process, as the owner of its Idempotency-Key claims
    projection: Any = None

    async def submit(self, command: Any) -> Any:
        try:
            return await self.writer.submit(command)
        except LedgerBusy as busy:
            raise Problem(503, "ledger_busy", str(busy), headers={"Retry-After": "1"}) from None
        except LedgerUnavailable as unavailable:
            raise Problem(503, "ledger_unavailable", str(unavailable), headers={"Retry-After": "5"}) from None

    async def read_your_writes(self, timeout_s: float) -> None:
        """Wait until the read model shows everything committed before this call."""
        try:
            await self.projection.wait_for(await self._committed_position(), timeout_s)
        except TimeoutError as behind:  # committed, but not readable yet: a command's retry answers from its key
            raise Problem(503, "read_model_behind", str(behind), headers={"Retry-After": "1"}) from None

    async def _committed_position(self) -> int:
        """The log's last committed position. The active writer's last commit is that (it is
        the one writer); a process that is not (a standby, or one that has just lost the
        lead and is still asked until its readiness is next probed) committed nothing since,
        so it asks the log: waiting for its own last commit, it answered from a read model
        without a payment the active writer had just confirmed."""
        return self.writer.last_position if self.writer.is_active else await self.writer.log_head()


def _bad_parameter(code: str, field: str, message: str) -> Problem:
    """Bad input that only a rule across parameters finds, named like any other (`errors[].field`)."""
    return Problem(422, code, f"`{field}` {message}", errors=[{"field": field, "message": message, "type": code}])


def _invalid_period() -> Problem:
    return _bad_parameter("invalid_period", "until", "must be after `since`")


def _sees_every_account(me: Principal) -> bool:
    return LEDGER_POST in me.roles or LEDGER_READ in me.roles


# Freezes a customer is not told the reason of: the subject of an anti-money-laundering
# review must not learn of it (tipping off). She learns that the bank froze the account,
# and asks the bank why.
_UNDISCLOSED_FREEZES = {FreezeReason.COMPLIANCE_REVIEW.value: "by_the_bank"}


def _as_seen_by(me: Principal, account: dict) -> dict:
    """The account as the caller may see it: staff and services whole, its customer without
    the reasons the bank keeps to itself."""
    if _sees_every_account(me):
        return account
    return {**account, "freeze_reasons": sorted({_UNDISCLOSED_FREEZES.get(reason, reason)
                                                 for reason in account["freeze_reasons"]})}


def _access(principal):
    """The two kinds of caller: one that may move money (its token has `ledger:post`), and
    one that reads (`ledger:post`, `ledger:read`, or a customer's own token)."""

    def poster(me: Principal = Depends(principal)) -> Principal:
        if LEDGER_POST not in me.roles:
            raise Problem(403, "forbidden", f"this access token may not move money or manage accounts in the ledger"
                                            f" (it needs the role {LEDGER_POST})")
        return me

    def reader(me: Principal = Depends(principal)) -> Principal:
        # The bank owns every internal account: a token naming it reads them only with a role.
        if me.customer_id == BANK_OWNER_ID and not _sees_every_account(me):
            raise Problem(403, "forbidden", f"this access token names the bank but has no ledger role ({LEDGER_READ})")
        return me

    return poster, reader


def _result(result: Any) -> dict:
    return result.to_dict() if hasattr(result, "to_dict") else dict(vars(result))


# The problems each route answers, for its OpenAPI operation (who may call it is in its description).
_REFUSED_TOKEN = {401: "No valid access token: `unauthorized` (none sent), `invalid_token`, `token_expired`."}
_TRY_AGAIN = "Try again after `Retry-After`:"
_POSTER = {**_REFUSED_TOKEN, 403: f"`forbidden`: the token has no role `{LEDGER_POST}`.",
           503: f"{_TRY_AGAIN} `ledger_busy`, `ledger_unavailable`, `dependency_unavailable`."}
# The account routes: keyed, and answering the account as the read model then shows it.
_KEYED = {**_POSTER, 400: "`idempotency_key_required`, `idempotency_key_invalid` (longer than 255 characters).",
          503: f"{_TRY_AGAIN} `ledger_busy`, `ledger_unavailable`, `read_model_behind`, `dependency_unavailable`."}
_KEY_REFUSALS = "`request_in_progress` (a request with this Idempotency-Key is still running; try again)"
_INVALID = "`validation_error` (each field in `errors`)"
_REUSED = "`idempotency_key_reused` (another body with this key)"
_READER = {**_REFUSED_TOKEN, 403: "`forbidden`: the token names the bank but has no ledger role.",
           503: f"{_TRY_AGAIN} `read_model_behind`, `dependency_unavailable`."}
# The reads for staff and services only (a transfer, a hold, a search by reference).
_STAFF_READER = {**_READER, 403: f"`forbidden`: the token has no role `{LEDGER_READ}` or `{LEDGER_POST}`."}
_NO_ACCOUNT = {404: "`account_not_found`."}
_ACCOUNT_READ = problem_responses({**_READER, **_NO_ACCOUNT, 422: _INVALID})


def _answers(status: int, body: Any, problems: dict) -> dict:
    """A route's documented answers: its success body (written by the route, so documented
    rather than a response_model that would rewrite it) and its problems."""
    return {status: {"model": body}, **problems}


def build_router(ledger: Ledger, principal) -> APIRouter:
    """`principal`: the dependency giving the caller's checked token (auth.TokenVerifier)."""
    router = APIRouter(prefix="/ledger/v1", tags=["ledger"])
    poster, reader = _access(principal)
    # Defaults rather than Annotated aliases: a local alias does not resolve under postponed annotations.
    # Each mutating route lists `posts` among its dependencies, which run before its parameters'
    # (a customer's token is refused 403 before a missing Idempotency-Key is 400); one that
    # needs the caller also takes `post`, which FastAPI then runs no second time.
    post = Depends(poster)
    posts = [post]
    reads = Depends(reader)

    async def visible_account(account_id: UUID, me: Principal) -> dict:
        found = await projections.account(ledger.pool, account_id)
        if found is None or not (_sees_every_account(me) or found["owner_id"] == me.customer_id):
            raise Problem(404, "account_not_found", f"no account {account_id}")
        return found

    async def staff_only(me: Principal, doing: str, customers_do: str) -> None:
        """403 for a customer's token (she does `customers_do` instead); then the read model
        caught up, so what was just posted or placed is found."""
        if not _sees_every_account(me):
            raise Problem(403, "forbidden", f"{doing} needs the role {LEDGER_READ} or {LEDGER_POST};"
                                            f" a customer {customers_do}")
        await ledger.read_your_writes(READ_MODEL_WAIT_S)

    async def staff_read(me: Principal, what: str, record_id: str, find, customers_read: str) -> dict:
        """A transfer or a hold by its id, for staff and services (a customer reads `customers_read`
        instead): 403 for a customer's token, 404 `<what>_not_found` if there is none."""
        await staff_only(me, f"reading a {what}", f"reads {customers_read}")
        found = await find(ledger.pool, record_id)
        if found is None:
            raise Problem(404, f"{what}_not_found", f"no {what} {record_id}")
        return found

    @router.post("/accounts", status_code=201, dependencies=posts, summary="Open an account", response_model=None,
                 responses=_answers(201, ledger_api.Account, problem_responses({
                     **_KEYED, 409: f"{_KEY_REFUSALS}, `idempotency_conflict` (`account_id` exists with other"
                                    " attributes).", 422: f"{_INVALID}, `invalid_account`, {_REUSED}."})))
    async def open_account(body: OpenAccountBody, key: Annotated[str, Depends(idempotency_key)], me: Principal = post):
        """A customer or bank-internal account; without `account_id`, one is derived from the
        Idempotency-Key, so a retry opens no second account. Needs the role `ledger:post`."""
        kept_scope = await callers_scope(ledger.pool, scope=OPEN_ACCOUNT_SCOPE, caller=me.customer_id, key=key)

        async def operation():
            command = commands.OpenAccount(
                account_id=body.account_id or _derived_account_id(kept_scope, key), owner_id=body.owner_id,
                kind=body.kind.value, currency=body.currency, credit_limit_minor=body.credit_limit_minor,
                requested_by=me.customer_id,
            )
            await ledger.submit(command)
            await ledger.read_your_writes(COMMAND_READ_MODEL_WAIT_S)
            return 201, await projections.account(ledger.pool, command.account_id)

        return await _run_once(ledger.pool, ledger.claimant, scope=kept_scope, key=key, body=body.model_dump(mode="json"),
                              operation=operation)

    for action, command_type, body_type, summary, refusals in (
            ("freeze", commands.FreezeAccount, FreezeBody, "Freeze an account for a reason: no debits until every"
             " freeze is lifted", "`account_closed`"),
            ("unfreeze", commands.UnfreezeAccount, UnfreezeBody, "Lift an account's freeze of a reason",
             "`account_closed`"),
            ("close", commands.CloseAccount, CloseBody, "Close an account for good, for a reason",
             "`account_not_empty` (money or live holds left on it), `account_frozen` (a freeze other than the"
             " customer's own is left)")):
        router.add_api_route(
            f"/accounts/{{account_id}}/{action}", _account_action(ledger, command_type, body_type, post), methods=["POST"],
            name=f"{action}_account", dependencies=posts, summary=summary, response_model=None,
            description=f"{summary}; the account as it then stands. Needs the role `{LEDGER_POST}`.",
            responses=_answers(200, ledger_api.Account, problem_responses({
                **_KEYED, **_NO_ACCOUNT, 409: f"{_KEY_REFUSALS}, {refusals}.", 422: f"{_INVALID}, {_REUSED}."})))

    @router.put("/accounts/{account_id}/credit-limit", dependencies=posts, summary="Set an account's credit limit",
                response_model=None, responses=_answers(200, ledger_api.Account, problem_responses({
                    **_KEYED, **_NO_ACCOUNT,
                    409: f"{_KEY_REFUSALS}, `account_closed`, `insufficient_funds` (below what is already used).",
                    422: f"{_INVALID}, `invalid_account` (a bank-internal account), {_REUSED}."})))
    async def set_credit_limit(account_id: UUID, body: CreditLimitBody, key: Annotated[str, Depends(idempotency_key)],
                               me: Principal = post):
        """A customer account's credit limit (lending sets it); refused below what is already used.
        Needs the role `ledger:post`."""
        async def operation():
            await ledger.submit(commands.SetCreditLimit(account_id=account_id, credit_limit_minor=body.credit_limit_minor,
                                                        requested_by=me.customer_id))
            await ledger.read_your_writes(COMMAND_READ_MODEL_WAIT_S)
            return 200, await projections.account(ledger.pool, account_id)

        scope = await callers_scope(ledger.pool, scope="ledger.set_credit_limit", caller=me.customer_id, key=key)
        return await _run_once(ledger.pool, ledger.claimant, scope=scope, key=key,
                              body={"account_id": str(account_id), **body.model_dump(mode="json")},
                              operation=operation)

    @router.post("/transfers", status_code=201, dependencies=posts, summary="Post a transfer", response_model=None,
                 responses=_answers(201, ledger_api.TransferPosted, problem_responses({
                     **_POSTER, **_NO_ACCOUNT,
                     409: "`insufficient_funds`, `account_frozen`, `account_closed`, `idempotency_conflict` (this"
                          " `transfer_id` was posted with another body).",
                     422: f"{_INVALID}, `unbalanced_transfer`, `currency_mismatch`, `invalid_transfer`."})))
    async def post_transfer(body: TransferBody, me: Principal = post):
        """Two or more legs summing to zero per currency, all posted or none. `transfer_id` is the
        idempotency key: posted again with the same body, it answers as the first time
        (`replayed`). Needs the role `ledger:post`."""
        command = commands.PostTransfer(
            transfer_id=body.transfer_id,
            legs=tuple(commands.Leg(leg.account_id, leg.amount_minor, leg.currency) for leg in body.legs),
            code=body.code, external_ref=body.external_ref, customer_ids=tuple(body.customer_ids),
            metadata=dict(body.metadata), requested_by=me.customer_id,
        )
        return _result(await ledger.submit(command))

    @router.post("/transfers/{transfer_id}/reversal", status_code=201, dependencies=posts,
                 summary="Reverse a posted transfer", response_model=None,
                 responses=_answers(201, ledger_api.TransferPosted, problem_responses({
                     **_POSTER, 404: "`transfer_not_found`.",
                     409: "`insufficient_funds` (a payee no longer has the money), `account_frozen`, `account_closed`,"
                          " `idempotency_conflict` (reversed already, for another reason or case).",
                     422: f"{_INVALID}, `invalid_transfer` (the transfer is itself a reversal)."})))
    async def reverse_transfer(transfer_id: TransferId, body: ReversalBody, me: Principal = post):
        """Storno: posts a transfer moving the legs of `transfer_id` back, with its references,
        under the id `<transfer_id>:reversal` and the code `reversal`. A transfer is reversed at
        most once: asked again for the same reason (and case), this answers as the first time (`replayed`).
        A refusal is not kept: once the payee has the money again, ask again. Needs the role
        `ledger:post`."""
        return _result(await ledger.submit(commands.ReverseTransfer(
            transfer_id=transfer_id, reason=body.reason.value, case_ref=body.case_ref, requested_by=me.customer_id)))

    @router.post("/holds", status_code=201, dependencies=posts, summary="Place a hold", response_model=None,
                 responses=_answers(201, ledger_api.Hold, problem_responses({
                     **_POSTER, **_NO_ACCOUNT,
                     409: "`insufficient_funds`, `account_frozen`, `account_closed`, `idempotency_conflict` (this"
                          " `hold_id` was placed with another body).",
                     422: f"{_INVALID}, `currency_mismatch`, `invalid_hold`."})))
    async def place_hold(body: PlaceHoldBody, me: Principal = post):
        """Reserves money on the debit account for the credit account until captured, voided or
        `expires_at`. `hold_id` is the idempotency key: a repeat answers with the hold as it was
        placed, whatever became of it since. Each capture posts a transfer with the
        hold's `code`, `external_ref` and `metadata`. Needs the role `ledger:post`."""
        command = commands.PlaceHold(
            hold_id=body.hold_id, debit_account_id=body.debit_account_id, credit_account_id=body.credit_account_id,
            amount_minor=body.amount_minor, currency=body.currency, expires_at=body.expires_at, code=body.code,
            external_ref=body.external_ref, metadata=body.metadata, requested_by=me.customer_id,
        )
        return _result(await ledger.submit(command))

    @router.post("/holds/{hold_id}/captures", status_code=201, dependencies=posts, summary="Capture a hold",
                 response_model=None, responses=_answers(201, ledger_api.Hold, problem_responses({
                     **_POSTER, 404: "`hold_not_found`.",
                     409: "`hold_not_active`, `capture_exceeds_hold`, `account_closed`, `idempotency_conflict` (this"
                          " `capture_id` with another amount).",
                     422: _INVALID})))
    async def capture_hold(hold_id: HoldId, body: CaptureBody, me: Principal = post):
        """Moves all or part of what the hold reserves, once per `capture_id` (the idempotency
        key: a repeat answers with the hold as it stood just after that capture); several
        captures may take up to the held amount. Needs the role `ledger:post`."""
        return _result(await ledger.submit(commands.CaptureHold(hold_id=hold_id, capture_id=body.capture_id,
                                                                amount_minor=body.amount_minor,
                                                                requested_by=me.customer_id)))

    @router.post("/holds/{hold_id}/void", dependencies=posts, summary="Void a hold", response_model=None,
                 responses=_answers(200, ledger_api.Hold, problem_responses({
                     **_POSTER, 404: "`hold_not_found`.", 409: "`hold_not_active`.", 422: _INVALID})))
    async def void_hold(hold_id: HoldId, me: Principal = post):
        """Releases what the hold still reserves: the hold answers `voided`, or `expired` if its
        deadline came first (it holds nothing either way; a repeat gets the same state with
        `replayed`). Refused for a hold fully captured. Needs the role `ledger:post`."""
        return _result(await ledger.submit(commands.VoidHold(hold_id=hold_id, requested_by=me.customer_id)))

    @router.get("/transfers", dependencies=QUERY_AS_DECLARED, summary="The transfers posted with a reference",
                response_model=None, responses=_answers(200, ledger_api.TransfersPage, problem_responses({
                    **_STAFF_READER, 422: f"{_INVALID}, `invalid_cursor` (not a transfer with this `external_ref`)."})))
    async def find_transfers(
        external_ref: ExternalRef,
        cursor: TransferCursor = None,
        limit: Annotated[int, Query(ge=1, le=projections.TRANSFERS_PAGE_SIZE_MAX)] = projections.TRANSFERS_PAGE_SIZE_MAX,
        me: Principal = reads,
    ):
        """The transfers posted with this `external_ref` (a card network's RRN, a payment
        system's id): a payment, the captures of the hold placed with it, its reversal; in
        posting order, a page at a time (follow `next_cursor` until it is null). For
        reconciliation and the bank's staff: needs the role `ledger:read` or `ledger:post`."""
        await staff_only(me, "finding transfers", "reads her accounts' history")
        try:
            found, next_after = await projections.transfers_by_reference(ledger.pool, external_ref, after=cursor,
                                                                         limit=limit)
        except projections.UnknownCursor as unknown:
            raise Problem(422, "invalid_cursor", str(unknown)) from None
        return {"transfers": found, "next_cursor": next_after}

    @router.get("/transfers/{transfer_id}", dependencies=QUERY_AS_DECLARED, summary="A posted transfer, and who asked",
                response_model=None, responses=_answers(200, ledger_api.Transfer, problem_responses({
                    **_STAFF_READER, 404: "`transfer_not_found`.", 422: _INVALID})))
    async def get_transfer(transfer_id: TransferId, me: Principal = reads):
        """A posted transfer (a capture's included, under its transfer id) as its poster gave
        it, and who asked for it. Needs the role `ledger:read` or `ledger:post`: a customer
        reads her money's movements in her accounts' history."""
        return await staff_read(me, "transfer", transfer_id, projections.transfer, "her accounts' history")

    @router.get("/holds", dependencies=QUERY_AS_DECLARED, summary="The holds placed with a reference",
                response_model=None, responses=_answers(200, ledger_api.HoldsPage, problem_responses({
                    **_STAFF_READER, 422: _INVALID})))
    async def find_holds(
        external_ref: ExternalRef,
        cursor: HoldsCursor = None,
        limit: Annotated[int, Query(ge=1, le=projections.HOLDS_PAGE_SIZE_MAX)] = projections.HOLDS_PAGE_SIZE_MAX,
        me: Principal = reads,
    ):
        """The holds placed with this `external_ref` (a card authorisation's RRN), live or
        finished: what each reserved, what its captures took, what became of the rest; in the
        order placed, a page at a time (follow `next_cursor` until it is null). A hold's
        captures are found among the transfers with the same reference. For the bank's staff
        and card processing: needs the role `ledger:read` or `ledger:post`."""
        await staff_only(me, "finding holds", "reads her accounts' pending holds")
        found, next_after = await projections.holds_by_reference(
            ledger.pool, external_ref, after=int(cursor) if cursor is not None else None, limit=limit)
        return {"holds": found, "next_cursor": str(next_after) if next_after is not None else None}

    @router.get("/holds/{hold_id}", dependencies=QUERY_AS_DECLARED, summary="A hold as it stands",
                response_model=None, responses=_answers(200, ledger_api.PlacedHold, problem_responses({
                    **_STAFF_READER, 404: "`hold_not_found`.", 422: _INVALID})))
    async def get_hold(hold_id: HoldId, me: Principal = reads):
        """A hold: its accounts, what it held, what its captures took and what it still
        reserves, its state and deadline. Needs the role `ledger:read` or `ledger:post`: a
        customer reads her account's pending holds."""
        return await staff_read(me, "hold", hold_id, projections.hold, "her accounts' pending holds")

    @router.get("/accounts/{account_id}", dependencies=QUERY_AS_DECLARED, summary="An account and its balances",
                response_model=None, responses=_answers(200, ledger_api.Account, _ACCOUNT_READ))
    async def get_account(account_id: UUID, me: Principal = reads):
        """Needs the role `ledger:read` or `ledger:post`, or the owner's own token (another
        customer's account answers 404, like one that does not exist)."""
        return _as_seen_by(me, await visible_account(account_id, me))

    @router.get("/accounts", dependencies=QUERY_AS_DECLARED, summary="An owner's accounts, a page at a time",
                response_model=None, responses=_answers(200, ledger_api.AccountsPage, problem_responses({
                    **_READER, 403: "`forbidden`: a customer's token names another owner, or the token names the"
                                    " bank but has no ledger role.",
                    422: f"{_INVALID}, `invalid_cursor` (not one of this owner's accounts)."})))
    async def list_accounts(
        # No NUL: PostgreSQL text cannot hold one (a 500, not "no such owner"), so no owner has one.
        owner_id: Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[^\x00]+$")],
        cursor: Annotated[UUID | None, _as_the_contract_says(ledger_api.AccountsQuery, "cursor")] = None,
        limit: Annotated[int, _as_the_contract_says(ledger_api.AccountsQuery, "limit", ge=1,
                                                    le=projections.ACCOUNTS_PAGE_SIZE_MAX)
                         ] = projections.ACCOUNTS_PAGE_SIZE_MAX,
        me: Principal = reads,
    ):
        """An owner's accounts, a page at a time (follow `next_cursor` until it is null). The
        owner is a query parameter, not a path segment: an id with '/' or '..' in it can
        never reach another route or another owner. Needs the role `ledger:read` or
        `ledger:post`, or the owner's own token."""
        if not _sees_every_account(me) and owner_id != me.customer_id:
            raise Problem(403, "forbidden", "a customer's access token lists only the customer's own accounts")
        try:
            accounts, next_after = await projections.accounts_of(ledger.pool, owner_id, after=cursor, limit=limit)
        except projections.UnknownCursor as unknown:
            raise Problem(422, "invalid_cursor", str(unknown)) from None
        return {"accounts": [_as_seen_by(me, account) for account in accounts],
                "next_cursor": str(next_after) if next_after else None}

    @router.get("/accounts/{account_id}/balance", dependencies=QUERY_AS_DECLARED, summary="An account's balance",
                response_model=None,
                responses=_answers(200, ledger_api.Balances | ledger_api.BalanceAt, _ACCOUNT_READ))
    async def get_balance(account_id: UUID,
                          at: Annotated[BoundaryInstant | None, _as_the_contract_says(ledger_api.BalanceQuery, "at")]
                          = None, me: Principal = reads):
        """Posted, pending and available now; or, with `at`, the posted balance as it stood
        just before that instant (what a statement from `at` opens with). Needs the role
        `ledger:read` or `ledger:post`, or the owner's own token."""
        found = await visible_account(account_id, me)
        if at is None:
            return found["balances"]
        await ledger.read_your_writes(READ_MODEL_WAIT_S)  # past balances come from the read model
        amount = await projections.balance_at(ledger.pool, account_id, at)
        return {"at": at.isoformat(), "posted": {"amount_minor": amount, "currency": found["currency"]}}

    @router.get("/accounts/{account_id}/history", dependencies=QUERY_AS_DECLARED,
                summary="An account's history, a page at a time", response_model=None,
                responses=_answers(200, ledger_api.HistoryPage, problem_responses({
                    **_READER, **_NO_ACCOUNT, 422: f"{_INVALID}, `invalid_period` (`until` not after `since`),"
                                                  " `invalid_amount_range`."})))
    async def get_history(
        account_id: UUID,
        since: Annotated[BoundaryInstant | None, _as_the_contract_says(ledger_api.HistoryQuery, "since")] = None,
        until: Annotated[BoundaryInstant | None, _as_the_contract_says(ledger_api.HistoryQuery, "until")] = None,
        amount_min_minor: Annotated[int | None, _as_the_contract_says(
            ledger_api.HistoryQuery, "amount_min_minor", ge=0, le=commands.AMOUNT_MINOR_MAX)] = None,
        amount_max_minor: Annotated[int | None, _as_the_contract_says(
            ledger_api.HistoryQuery, "amount_max_minor", ge=0, le=commands.AMOUNT_MINOR_MAX)] = None,
        counterparty_account_id: Annotated[UUID | None, _as_the_contract_says(
            ledger_api.HistoryQuery, "counterparty_account_id")] = None,
        code: Annotated[str | None, _as_the_contract_says(ledger_api.HistoryQuery, "code", pattern=CODE_PATTERN)] = None,
        cursor: Annotated[str | None, _as_the_contract_says(ledger_api.HistoryQuery, "cursor",
                                                            pattern=_CURSOR_PATTERN)] = None,
        limit: Annotated[int, _as_the_contract_says(ledger_api.HistoryQuery, "limit", ge=1,
                                                    le=projections.PAGE_SIZE_MAX)] = 50,
        me: Principal = reads,
    ):
        """The account's lines, newest first (follow `next_cursor` until it is null), filtered
        by period, amount, counterparty and code; every amount in the account's `currency`. A
        filtered page reads at most 20,000 entries, so it may hold fewer lines than `limit`;
        so may a page whose lines carry much metadata (a page ends once they pass 4 MiB).
        Needs the role `ledger:read` or `ledger:post`, or the owner's own token."""
        found = await visible_account(account_id, me)
        # An empty range is a mistake in the request, as for a statement, not an empty history.
        if since is not None and until is not None and until <= since:
            raise _invalid_period()
        if amount_min_minor is not None and amount_max_minor is not None and amount_max_minor < amount_min_minor:
            raise _bad_parameter("invalid_amount_range", "amount_max_minor", "must not be below `amount_min_minor`")
        after = _after(cursor)
        await ledger.read_your_writes(READ_MODEL_WAIT_S)
        lines, next_after = await projections.history(
            ledger.pool, account_id, since=since, until=until, amount_min_minor=amount_min_minor,
            amount_max_minor=amount_max_minor, code=code, after=after, limit=limit,
            counterparty_account_id=str(counterparty_account_id) if counterparty_account_id else None,
        )
        return {"account_id": str(account_id), "currency": found["currency"], "lines": lines,
                "next_cursor": _cursor(next_after)}

    @router.get("/accounts/{account_id}/holds", dependencies=QUERY_AS_DECLARED,
                summary="An account's pending holds, a page at a time", response_model=None,
                responses=_answers(200, ledger_api.PendingHoldsPage, _ACCOUNT_READ))
    async def get_pending_holds(
        account_id: UUID,
        cursor: Annotated[str | None, _as_the_contract_says(ledger_api.PendingHoldsQuery, "cursor",
                                                            pattern=_HOLDS_CURSOR_PATTERN)] = None,
        limit: Annotated[int, _as_the_contract_says(ledger_api.PendingHoldsQuery, "limit", ge=1,
                                                    le=projections.PAGE_SIZE_MAX)] = 50,
        me: Principal = reads,
    ):
        """The account's live holds, newest first (follow `next_cursor` until it is null): money
        reserved and not moved yet, such as card purchases awaiting their clearing; those that
        reserve its money (negative) add up to its `pending` balance, negated. Needs the role
        `ledger:read` or `ledger:post`, or the owner's own token."""
        found = await visible_account(account_id, me)
        await ledger.read_your_writes(READ_MODEL_WAIT_S)
        holds, next_before = await projections.pending_holds(
            ledger.pool, account_id, before=int(cursor) if cursor is not None else None, limit=limit)
        return {"account_id": str(account_id), "currency": found["currency"], "holds": holds,
                "next_cursor": str(next_before) if next_before is not None else None}

    @router.get("/accounts/{account_id}/statement", dependencies=QUERY_AS_DECLARED,
                summary="An account's statement for a period, a page at a time", response_model=None,
                responses=_answers(200, ledger_api.StatementPage, problem_responses({
                    **_READER, **_NO_ACCOUNT, 422: f"{_INVALID}, `invalid_period` (`until` not after `since`)."})))
    async def get_statement(
        account_id: UUID,
        since: Annotated[BoundaryInstant, _as_the_contract_says(ledger_api.StatementQuery, "since")],
        until: Annotated[BoundaryInstant, _as_the_contract_says(ledger_api.StatementQuery, "until")],
        cursor: Annotated[str | None, _as_the_contract_says(ledger_api.StatementQuery, "cursor",
                                                            pattern=_STATEMENT_CURSOR_PATTERN)] = None,
        limit: Annotated[int, _as_the_contract_says(ledger_api.StatementQuery, "limit", ge=1,
                                                    le=projections.STATEMENT_PAGE_LINES_MAX)
                         ] = projections.STATEMENT_PAGE_LINES_MAX,
        me: Principal = reads,
    ):
        """The period [since, until): balances and totals for the whole period, lines a page
        at a time (follow `next_cursor` until it is null), all as of the first page. A page
        holds fewer lines than `limit` once they pass 4 MiB (transfers' metadata). Needs the
        role `ledger:read` or `ledger:post`, or the owner's own token."""
        found = await visible_account(account_id, me)
        if until <= since:
            raise _invalid_period()
        position, seq, as_of = _after(cursor) or (None, None, None)
        await ledger.read_your_writes(READ_MODEL_WAIT_S)
        body, next_after = await projections.statement(
            ledger.pool, account_id, since, until, after=(position, seq) if cursor else None, as_of=as_of, limit=limit,
        )
        return {"account_id": str(account_id), "currency": found["currency"], **body,
                "next_cursor": _cursor(next_after)}

    return router


def _account_action(ledger: Ledger, command_type: type, body_type: type[_Body], post):
    """`post`: the dependency giving a caller that may manage accounts."""

    async def action(account_id: UUID, body: _Body, key: Annotated[str, Depends(idempotency_key)],
                     me: Principal = post):
        async def operation():
            await ledger.submit(command_type(account_id=account_id, reason=body.reason.value, requested_by=me.customer_id))
            await ledger.read_your_writes(COMMAND_READ_MODEL_WAIT_S)
            return 200, await projections.account(ledger.pool, account_id)

        scope = await callers_scope(ledger.pool, scope=f"ledger.{command_type.__name__}", caller=me.customer_id, key=key)
        return await _run_once(ledger.pool, ledger.claimant, scope=scope, key=key,
                              body={"account_id": str(account_id), **body.model_dump(mode="json")}, operation=operation)

    action.__annotations__["body"] = body_type  # this action's own body, for FastAPI to read and document
    return action


