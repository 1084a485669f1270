"""Rules of the gateway passing the customer's token on to the ledger: a refusal
of a token the gateway itself accepted is the bank's fault, told as such."""

from __future__ import annotations

import uuid

import httpx
import pytest

from gateway.service import GatewaySettings, build
from kabinet_chassis.auth import dev_signing_key, issue_access_token
from ledger.service import build as build_ledger

pytestmark = pytest.mark.integration

CABINET_PATHS = ["/v1/me/accounts", f"/v1/me/accounts/{uuid.uuid4()}"]


async def ask_gateway(stack, tmp_path, path: str, ledger_transport: httpx.AsyncBaseTransport) -> httpx.Response:
    """Alice asks the gateway (which trusts the development key of `tmp_path`) for `path`."""
    settings = GatewaySettings(database_url=stack.database_url, kafka_bootstrap_servers=stack.bootstrap_servers,
                               data_dir=tmp_path, ledger_url="http://ledger")
    gateway = build(settings, ledger_transport=ledger_transport)
    token = issue_access_token(dev_signing_key(tmp_path), "alice")
    async with (
        gateway.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.http_app()), base_url="http://gw") as client,
    ):
        return await client.get(path, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("path", CABINET_PATHS, ids=["accounts", "account"])
async def test_a_ledger_trusting_another_signing_key_than_the_gateway_is_a_503_not_a_401_that_no_refresh_cures(
        stack, unique_name, tmp_path, path):
    # Mid-rotation, the ledger not yet given identity's new key: the customer's fresh token is
    # good at the gateway and refused by the ledger. A 401 would send her app to refresh and
    # ask again, for ever; a 404 would tell her that her account is gone.
    ledger_service, _ = build_ledger(stack.service_settings(f"ledger_{unique_name}", data_dir=tmp_path / "ledger"))
    async with ledger_service.running():
        answer = await ask_gateway(stack, tmp_path, path, httpx.ASGITransport(app=ledger_service.http_app()))
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "dependency_unavailable" and int(answer.headers["Retry-After"]) > 0


@pytest.mark.parametrize("path", CABINET_PATHS, ids=["accounts", "account"])
async def test_a_token_expiring_between_the_gateway_and_the_ledger_is_a_401_token_expired_asking_for_a_bearer_token(
        stack, tmp_path, path):
    expired = httpx.MockTransport(lambda request: httpx.Response(
        401, json={"code": "token_expired", "detail": "the access token has expired; refresh it"},
        headers={"WWW-Authenticate": "Bearer", "Content-Type": "application/problem+json"}))
    answer = await ask_gateway(stack, tmp_path, path, expired)
    assert answer.status_code == 401 and answer.json()["code"] == "token_expired"  # a refresh cures this one
    assert answer.headers["WWW-Authenticate"] == "Bearer"  # RFC 9110 §15.5.2: every 401 names its scheme


@pytest.mark.parametrize("path", CABINET_PATHS, ids=["accounts", "account"])
async def test_a_ledger_forbidding_a_customer_what_the_gateway_allowed_her_is_a_503_not_a_forbidden(stack, tmp_path, path):
    forbidden = httpx.MockTransport(lambda request: httpx.Response(
        403, json={"code": "forbidden", "detail": "this access token may not move money (it needs the role ledger:post)"}))
    answer = await ask_gateway(stack, tmp_path, path, forbidden)
    assert answer.status_code == 503 and answer.json()["code"] == "dependency_unavailable", answer.text
    assert "ledger:post" not in answer.text  # the bank's roles are no business of the customer's


async def test_the_customers_request_reaches_the_ledger_in_the_same_trace(stack, tmp_path):
    # ARCHITECTURE §8: a trace spans HTTP -> Kafka -> consumers; one the gateway dropped would
    # leave the ledger's work (and the events it caused) unlinked from the customer's request.
    seen: list[httpx.Request] = []

    def ledger(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"accounts": [], "next_cursor": None})

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    settings = GatewaySettings(database_url=stack.database_url, kafka_bootstrap_servers=stack.bootstrap_servers,
                               data_dir=tmp_path, ledger_url="http://ledger")
    gateway = build(settings, ledger_transport=httpx.MockTransport(ledger))
    token = issue_access_token(dev_signing_key(tmp_path), "alice")
    async with (
        gateway.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.http_app()), base_url="http://gw") as client,
    ):
        answer = await client.get("/v1/me/accounts", headers={"Authorization": f"Bearer {token}",
                                                              "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert answer.status_code == 200, answer.text
    assert [request.headers.get("traceparent", "").split("-")[1:2] for request in seen] == [[trace_id]]
