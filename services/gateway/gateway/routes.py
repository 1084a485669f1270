"""The cabinet's customer routes: a customer reaches only their own accounts.

The gateway checks the token and ownership, then asks the ledger with the customer's
own token, which the ledger checks again (it too answers only the customer's accounts):
the gateway holds no credential that reads every account. Someone else's account
answers 404, exactly like an account that does not exist.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import UUID

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from opentelemetry import propagate
from pydantic import BaseModel

from gateway.customer_rate_limits import CustomerRateLimits
from kabinet_chassis.auth import Principal
from kabinet_chassis.errors import DependencyUnavailable, Problem, problem_responses
from kabinet_contracts import ledger_api
from kabinet_contracts.ledger import BANK_OWNER_ID

# For the whole answer: httpx's own timeout limits each read, so a ledger sending a byte a
# second (stuck mid-answer) would hold the customer for as long as it kept that up.
LEDGER_TIMEOUT_S = 5.0
# The most of a ledger answer the gateway reads: the ledger ends a page of lines once they
# pass 4 MiB, a line being at most about 100 KB (its transfer's metadata); whatever a
# runaway answer holds past this is not kept in memory.
LEDGER_ANSWER_BYTES_MAX = 16 * 2**20


class LedgerClient:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def get(self, path: str, authorization: str, params: Any = None) -> Any:
        """GET from the ledger as the customer (`authorization`: the customer's own header), in
        the customer's request's trace (ARCHITECTURE §8: a trace spans HTTP -> Kafka -> consumers)."""
        headers = {"Authorization": authorization}
        propagate.inject(headers)
        try:
            async with (
                asyncio.timeout(LEDGER_TIMEOUT_S),
                self.client.stream("GET", f"/ledger/v1{path}", params=params, headers=headers,
                                   timeout=LEDGER_TIMEOUT_S) as response,
            ):
                content = bytearray()
                async for chunk in response.aiter_bytes():
                    content += chunk
                    if len(content) > LEDGER_ANSWER_BYTES_MAX:
                        raise DependencyUnavailable("ledger", f"answered more than {LEDGER_ANSWER_BYTES_MAX} bytes")
        except TimeoutError:
            raise DependencyUnavailable("ledger", f"did not answer within {LEDGER_TIMEOUT_S:g} s") from None
        except httpx.HTTPError as error:
            raise DependencyUnavailable("ledger", str(error) or type(error).__name__) from None
        if not (response.is_success or response.is_client_error):
            raise DependencyUnavailable("ledger", f"answered {response.status_code}")
        try:
            body = json.loads(content)
        except ValueError:  # not the ledger speaking (a proxy's page, say)
            raise DependencyUnavailable("ledger", f"answered {response.status_code} without JSON") from None
        # JSON, but not the ledger's API either (a broken deploy): the customer's request was fine.
        if not isinstance(body, dict):
            raise DependencyUnavailable("ledger", f"answered {response.status_code} with JSON that is not an object")
        if response.is_client_error:
            code, detail, errors = body.get("code"), body.get("detail", ""), body.get("errors")
            if not isinstance(code, str) or not isinstance(detail, str):
                raise DependencyUnavailable("ledger", f"answered {response.status_code} without a problem's code")
            if response.status_code in (401, 403):
                _refused_token(code)
            raise Problem(response.status_code, code, detail, **({"errors": errors} if isinstance(errors, list) else {}))
        return body


def _refused_token(code: str) -> None:
    """The ledger refused a token the gateway has just accepted and a request the gateway
    allowed. Only its expiry in between is the customer's to cure (by a refresh); any other
    refusal is the bank's fault (mid-rotation, the ledger not yet trusting identity's new
    key), which a 401 would send her app to refresh for ever and a 403 would blame on her."""
    if code == "token_expired":
        raise Problem(401, code, "the access token has expired; refresh it", headers={"WWW-Authenticate": "Bearer"})
    raise DependencyUnavailable("ledger", "refused the customer's access token")


def _expected(body: dict, name: str, kind: type) -> Any:
    """A field of the ledger's answer the gateway relies on: without it, the answer is not the ledger's API."""
    value = body.get(name)
    if not isinstance(value, kind):
        raise DependencyUnavailable("ledger", f"answered without {name}")
    return value


def _customer(principal, rate_limits: CustomerRateLimits):
    """The caller, who must be a customer: a token naming the bank itself (the owner of
    every internal account) opens no cabinet, whoever signed it. Counted against the
    customer's request limits."""

    async def customer(me: Principal = Depends(principal)) -> Principal:  # async: on the event loop, one at a time
        if me.customer_id == BANK_OWNER_ID:
            raise Problem(403, "not_a_customer", "the cabinet is for customers; this token names the bank")
        rate_limits.admit(me.customer_id)
        return me

    return customer


def _not_stored(response: Response) -> None:
    """A customer's accounts and money are kept by no cache (a shared computer's browser, a proxy)."""
    response.headers["Cache-Control"] = "no-store"


QUERY_ERRORS_SHOWN_MAX = 10  # as the ledger: a query of thousands of made-up names is answered in a few lines


def _only_the_query_of(request: Request, query: type[BaseModel] | None) -> None:
    """The routes that pass on no query (an account) or only part of it (the customer's
    accounts, to which the gateway adds the owner) refuse a parameter they do not have by
    name, as the ledger does on the others: ignored, `at` on an account answered today's
    balances as if they were those asked for, and `limt` a page of another size."""
    names = set(query.model_fields) if query is not None else set()
    errors = [{"loc": ("query", name), "type": "extra_forbidden", "msg": "not a parameter of this request"}
              for name in dict.fromkeys(name for name, _ in request.query_params.multi_items()) if name not in names]
    if errors:
        raise RequestValidationError(errors[:QUERY_ERRORS_SHOWN_MAX])


def passed_on(request: Request) -> tuple[str, list[tuple[str, str]]]:
    """The customer's token and query, as asked: a parameter given twice reaches the ledger
    twice (which refuses it by name) rather than one of them quietly winning here."""
    return request.headers["authorization"], request.query_params.multi_items()


# The problems the customer routes answer (the ledger's refusals of a request are passed on as they are).
_PROBLEMS = {
    401: "No valid access token: `unauthorized` (none sent), `invalid_token`, `token_expired` (refresh it).",
    403: "`not_a_customer`: the token names the bank.",
    404: "`account_not_found`: no such account, or not the caller's.",
    422: "`validation_error` (each field in `errors`), `invalid_cursor`, `invalid_period`, `invalid_amount_range`.",
    429: "`too_many_requests`: more than the customer's requests a second or a minute; try again after `Retry-After`.",
    503: "`dependency_unavailable`: the ledger did not answer, or refused the customer's token; try again after"
         " `Retry-After`.",
}


def _documented(summary: str, body: Any, query: type[BaseModel] | None = None, *, lists: bool = False) -> dict:
    """A route's OpenAPI operation: its success body and problems, and the query parameters it
    passes on to the ledger, which checks them (declared here, the gateway would check them
    first and answer before knowing whose the account is)."""
    problems = {status: text for status, text in _PROBLEMS.items() if not (lists and status == 404)}
    documented = {"summary": summary, "response_model": None,
                  "responses": {200: {"model": body}, **problem_responses(problems)}}
    if query is not None:
        documented["openapi_extra"] = {"parameters": _query_parameters(query)}
    return documented


def _query_parameters(query: type[BaseModel]) -> list[dict]:
    schema = query.model_json_schema()
    return [{"name": name, "in": "query", "required": name in schema.get("required", ()),
             "description": field.pop("description"), "schema": field}
            for name, field in schema["properties"].items()]


def build_router(ledger: LedgerClient, principal, rate_limits: CustomerRateLimits) -> APIRouter:
    router = APIRouter(prefix="/v1/me", tags=["cabinet"], dependencies=[Depends(_not_stored)])
    # A default rather than an Annotated alias: a local alias does not resolve under
    # postponed annotations.
    me_dependency = Depends(_customer(principal, rate_limits))

    async def own_account(me: Principal, account_id: UUID, request: Request) -> dict:
        try:
            account = await ledger.get(f"/accounts/{account_id}", request.headers["authorization"])
        except Problem as problem:
            if problem.status == 404:
                raise Problem(404, "account_not_found", f"no account {account_id}") from None
            raise
        if _expected(account, "owner_id", str) != me.customer_id:
            raise Problem(404, "account_not_found", f"no account {account_id}")
        return account

    @router.get("/accounts", **_documented("My accounts, a page at a time", ledger_api.AccountsPage,
                                           ledger_api.AccountsQuery, lists=True))
    async def my_accounts(request: Request, me: Principal = me_dependency):
        """The caller's accounts, a page at a time (follow `next_cursor` until it is null)."""
        _only_the_query_of(request, ledger_api.AccountsQuery)
        authorization, paging = passed_on(request)  # a second `cursor` or `limit` too, which the ledger refuses by name
        found = await ledger.get("/accounts", authorization,
                                 [*paging, ("owner_id", me.customer_id)])  # a parameter, never a path
        mine = [account for account in _expected(found, "accounts", list)
                if isinstance(account, dict) and account.get("owner_id") == me.customer_id]
        return {**found, "accounts": mine}

    @router.get("/accounts/{account_id}", **_documented("One of my accounts and its balances", ledger_api.Account))
    async def my_account(account_id: UUID, request: Request, me: Principal = me_dependency):
        _only_the_query_of(request, None)
        return await own_account(me, account_id, request)

    @router.get("/accounts/{account_id}/balance", **_documented(
        "My account's balance", ledger_api.Balances | ledger_api.BalanceAt, ledger_api.BalanceQuery))
    async def my_balance(account_id: UUID, request: Request, me: Principal = me_dependency):
        """Posted, pending and available now; or, with `at`, the posted balance as it stood just
        before that instant (what a statement from `at` opens with)."""
        await own_account(me, account_id, request)
        return await ledger.get(f"/accounts/{account_id}/balance", *passed_on(request))

    @router.get("/accounts/{account_id}/history", **_documented(
        "My account's history, a page at a time", ledger_api.HistoryPage, ledger_api.HistoryQuery))
    async def my_history(account_id: UUID, request: Request, me: Principal = me_dependency):
        """The account's lines, newest first (follow `next_cursor` until it is null). A filtered
        page reads at most 20,000 entries, so with a rarely matching filter it may hold fewer
        lines than `limit`, even none, and still have a `next_cursor`; so may a page whose
        lines carry much metadata (a page ends once they pass 4 MiB)."""
        await own_account(me, account_id, request)
        return await ledger.get(f"/accounts/{account_id}/history", *passed_on(request))

    @router.get("/accounts/{account_id}/holds", **_documented(
        "My account's pending holds, a page at a time", ledger_api.PendingHoldsPage, ledger_api.PendingHoldsQuery))
    async def my_pending_holds(account_id: UUID, request: Request, me: Principal = me_dependency):
        """Money reserved and not moved yet (card purchases awaiting their clearing), newest first
        (follow `next_cursor` until it is null); those reserving my money (negative) add up to `pending`, negated."""
        await own_account(me, account_id, request)
        return await ledger.get(f"/accounts/{account_id}/holds", *passed_on(request))

    @router.get("/accounts/{account_id}/statement", **_documented(
        "My account's statement for a period, a page at a time", ledger_api.StatementPage, ledger_api.StatementQuery))
    async def my_statement(account_id: UUID, request: Request, me: Principal = me_dependency):
        """The period [since, until): balances and totals for the whole period, lines a page at
        a time (follow `next_cursor` until it is null), every page as the period stood at the first;
        a page holds fewer lines than `limit` once they pass 4 MiB (transfers' metadata)."""
        await own_account(me, account_id, request)
        return await ledger.get(f"/accounts/{account_id}/statement", *passed_on(request))

    @router.get("/", include_in_schema=False)
    async def me_root(me: Principal = me_dependency) -> dict:
        return {"customer_id": me.customer_id}

    return router
