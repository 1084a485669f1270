"""Rules of every service's error answers: a database that is down, restarting or failing
over is a 503 problem with Retry-After, whichever driver noticed; anything else unexpected
is a 500 that names no internals; the framework's own refusals keep their headers."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eventsourcing.persistence import OperationalError as EventStoreOperationalError
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from kabinet_chassis.auth import Principal, TokenVerifier, issue_access_token, public_pem
from kabinet_chassis.errors import install_problem_handlers

DATABASE_DOWN = {
    "refused": ConnectionRefusedError(111, "Connection refused"),
    "starting_up": asyncpg.CannotConnectNowError("the database system is starting up"),
    "shut_down_by_admin": asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    "connection_died": asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    "event_store_lost": EventStoreOperationalError("server closed the connection unexpectedly"),
}


def app_raising(error: Exception) -> httpx.AsyncClient:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/read")
    async def read():
        raise error

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://svc")


@pytest.mark.parametrize("error", DATABASE_DOWN.values(), ids=DATABASE_DOWN.keys())
async def test_a_database_that_is_down_is_a_503_with_retry_after(error):
    async with app_raising(error) as client:
        response = await client.get("/read")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "dependency_unavailable" and int(response.headers["retry-after"]) > 0


async def test_any_other_unexpected_error_is_a_500_that_names_no_internals():
    async with app_raising(RuntimeError("secret table name")) as client:
        response = await client.get("/read")
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
    assert "secret" not in response.text


async def test_a_method_not_allowed_is_a_problem_that_says_which_methods_are():
    async with app_raising(RuntimeError()) as client:
        response = await client.delete("/read")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
    assert response.headers["allow"] == "GET"


class Order(BaseModel):
    metadata: dict[str, int]


async def test_a_refused_field_is_named_by_its_whole_path_even_when_a_part_is_called_body_or_path():
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/orders")
    async def order(order: Order, body: int = 0):
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
        response = await client.post("/orders", params={"body": "x"}, json={"metadata": {"path": "x", "legs": 1}})
    assert response.status_code == 422
    assert sorted(error["field"] for error in response.json()["errors"]) == ["body", "metadata.path"]


async def test_a_number_too_long_to_read_is_a_named_problem_that_changes_nothing():
    app = FastAPI()
    install_problem_handlers(app)
    received = []

    @app.post("/orders")
    async def order(order: Order):
        received.append(order)
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
        response = await client.post("/orders", content='{"metadata": {"limit": ' + "9" * 5_000 + "}}",
                                     headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "malformed_body" and "4300 digits" in response.json()["detail"]
    assert received == []


SIGNING_KEY = Ed25519PrivateKey.generate()


def app_behind_a_token_check(received: list) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    bearer = TokenVerifier(public_pem(SIGNING_KEY)).dependency()

    def poster(me: Principal = Depends(bearer)) -> Principal:  # as a route's role check wraps the token's
        return me

    @app.post("/orders")
    async def order(order: Order, me: Principal = Depends(poster)):
        received.append(order)
        return {}

    return app


@pytest.mark.parametrize("body", ["{not json", '{"metadata": {"limit": ' + "9" * 5_000 + "}}", '{"metadata": 1}'],
                         ids=["not-json", "number-too-long", "wrong-shape"])
async def test_an_anonymous_caller_is_asked_for_a_token_whatever_the_body_and_told_nothing_of_it(body):
    received: list = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app_behind_a_token_check(received)),
                                 base_url="http://svc") as client:
        anonymous = await client.post("/orders", content=body, headers={"Content-Type": "application/json"})
        forged = await client.post("/orders", content=body, headers={"Content-Type": "application/json",
                                                                     "Authorization": "Bearer a.b.c"})
        signed = await client.post("/orders", content=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {issue_access_token(SIGNING_KEY, 'alice')}"})
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthorized", anonymous.text
    assert anonymous.headers["www-authenticate"] == "Bearer" and "metadata" not in anonymous.text
    assert forged.status_code == 401 and forged.json()["code"] == "invalid_token", forged.text
    assert signed.status_code in (400, 422) and signed.json()["code"] in ("validation_error", "malformed_body")
    assert received == []
