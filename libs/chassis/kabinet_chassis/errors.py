"""RFC 9457 problem+json for every error, with a stable `code` (ARCHITECTURE.md §7)."""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kabinet_chassis.databases import DATABASE_DOWN_ERRORS

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
DEPENDENCY_RETRY_AFTER_S = 5
# What FastAPI says of a body it could not parse for a reason other than bad JSON syntax.
_BODY_NOT_PARSED = "There was an error parsing the body"
# The most dependencies a route's tree is searched through for its token check.
_DEPENDENCIES_SEARCHED_MAX = 64


class Problem(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body = {
            "type": f"https://kabinet.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            **self.extra,
        }
        if instance:
            body["instance"] = instance
        return body


class DependencyUnavailable(Problem):
    """A database, broker or service we need is down: 503 with Retry-After, never a hang."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(
            503, "dependency_unavailable", f"{dependency} is unavailable: {detail}",
            headers={"Retry-After": str(DEPENDENCY_RETRY_AFTER_S)}, dependency=dependency,
        )


class FieldProblem(BaseModel):
    field: str = Field(description="the field as the request names it: `legs[0].amount_minor`, `until`")
    message: str
    type: str = Field(description="what is wrong with it, as a code: `missing`, `extra_forbidden`, `invalid_period`…")


class ProblemDocument(BaseModel):
    """The body of every error answer, as `Problem.body` writes it (RFC 9457), for the OpenAPI
    documents: the answers themselves are written by `problem_response`."""

    # Some problems carry more members (a 503 `dependency_unavailable` names the `dependency`).
    model_config = ConfigDict(title="Problem", extra="allow")

    type: str = Field(description="a URI naming the problem: https://kabinet.dev/problems/<code>")
    title: str
    status: int = Field(description="the HTTP status of the answer")
    code: str = Field(description="stable, for programs to act on: `insufficient_funds`, `token_expired`…")
    detail: str = Field(description="for people to read; its wording may change")
    instance: str | None = Field(default=None, description="the path of the request answered")
    errors: list[FieldProblem] | None = Field(default=None, description="with a 422: each field that is wrong")


PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"
# The headers some problems come with: how to authenticate, when to try again.
_PROBLEM_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`: send an access token", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}},
}


def problem_responses(answers: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the problems it answers: {status: which codes, and when}.
    The schema they refer to is among `problem_schemas()`, which the document must hold."""
    return {status: {"description": description,
                     "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}},
                     **({"headers": _PROBLEM_HEADERS[status]} if status in _PROBLEM_HEADERS else {})}
            for status, description in answers.items()}


def problem_schemas() -> dict[str, dict[str, Any]]:
    """The OpenAPI components `problem_responses` refer to (FastAPI puts a model given to
    `responses=` under application/json only, so the routes refer to these by hand)."""
    problem = ProblemDocument.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**problem.pop("$defs"), PROBLEM_SCHEMA_REF.rsplit("/", 1)[1]: problem}


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(request.url.path if request else None),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


_HTTP_PROBLEM_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                       413: "request_too_large"}


def http_problem_code(status: int) -> str:
    """The `code` of a problem answered for an HTTP error that names no code of its own."""
    return _HTTP_PROBLEM_CODES.get(status, f"http_{status}")


def _field_name(location: tuple[Any, ...]) -> str:
    # ("body", "legs", 0, "amount_minor") -> "legs[0].amount_minor". Only the first part says
    # where: a metadata key or a query parameter may be called "path" or "body" too.
    parts = location[1:] if location and location[0] in ("body", "query", "path", "header") else location
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or ".".join(map(str, location))


def domain_problem(error: Exception) -> Problem:
    """A domain refusal (a `code` and `status` on its class) as the problem it answers with."""
    return Problem(getattr(error, "status", 409), getattr(error, "code", "refused"), str(error))


async def _caller_refused(request: Request) -> Problem | StarletteHTTPException | None:
    """The route's token check, if it has one, when the request is refused before it ran:
    FastAPI parses a body before running a route's dependencies, so a body that is not JSON
    was refused to anyone, an anonymous caller told about it instead of asked for a token."""
    pending = [getattr(request.scope.get("route"), "dependant", None)]
    for _ in range(_DEPENDENCIES_SEARCHED_MAX):
        if not pending:
            return None
        dependant = pending.pop()
        if dependant is None:
            continue
        if isinstance(dependant.call, HTTPBearer):
            try:
                checked = dependant.call(request)
                if inspect.isawaitable(checked):
                    await checked
            except (Problem, StarletteHTTPException) as refused:
                return refused
            return None
        pending.extend(dependant.dependencies)
    return None


def install_problem_handlers(app: FastAPI, domain_errors: tuple[type[Exception], ...] = ()) -> None:
    """Domain errors must carry `code` and `status` class attributes."""

    async def on_problem(request: Request, error: Problem) -> JSONResponse:
        return problem_response(error, request)

    async def as_refused_caller(request: Request) -> JSONResponse | None:
        refused = await _caller_refused(request)
        if refused is None:
            return None
        return await (on_problem if isinstance(refused, Problem) else on_http)(request, refused)

    async def on_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        if (unauthenticated := await as_refused_caller(request)) is not None:
            return unauthenticated
        errors = [
            {"field": _field_name(tuple(e["loc"])), "message": e["msg"], "type": e["type"]} for e in error.errors()
        ]
        names = ", ".join(e["field"] for e in errors[:5])
        problem = Problem(422, "validation_error", f"invalid request: {names}", errors=errors)
        return problem_response(problem, request)

    async def on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = http_problem_code(error.status_code)
        detail = str(error.detail)
        if error.status_code == 400 and detail == _BODY_NOT_PARSED:
            if (unauthenticated := await as_refused_caller(request)) is not None:
                return unauthenticated
            # Valid JSON that Python will not read: an integer of more than 4,300 digits, which
            # would take quadratic time to convert. Named, as any refused input is.
            code, detail = "malformed_body", ("the body could not be read: it is not JSON, or holds a number of more"
                                              f" than {sys.get_int_max_str_digits()} digits")
        # Its headers too: a 405 names what is Allowed, a 401 how to authenticate.
        return problem_response(Problem(error.status_code, code, detail, headers=dict(error.headers or {})), request)

    async def on_domain(request: Request, error: Exception) -> JSONResponse:
        return problem_response(domain_problem(error), request)

    async def on_database_down(request: Request, error: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %r", request.method, request.url.path, error)
        return problem_response(DependencyUnavailable("database", type(error).__name__), request)

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "internal_error", "an unexpected error occurred; it has been logged"), request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for error_type in domain_errors:
        app.add_exception_handler(error_type, on_domain)
    for error_type in DATABASE_DOWN_ERRORS:
        app.add_exception_handler(error_type, on_database_down)
    app.add_exception_handler(Exception, on_unexpected)
