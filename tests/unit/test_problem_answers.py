"""Rules of every service's error answers: a database that is down, restarting or failing
over is a 503 problem with Retry-After, whichever driver noticed; anything else unexpected
is a 500 that names no internals; the framework's own refusals keep their headers."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from eventsourcing.persistence import OperationalError as EventStoreOperationalError
from fastapi import FastAPI
from pydantic import BaseModel

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
