"""Rules of the gateway in front of the ledger: whatever the ledger does (answers garbage,
trickles its answer, answers far too much), the customer gets a problem+json answer in
bounded time; the cabinet's answers are never kept by a cache; a token is taken only as
identity made it."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import routes
from gateway.service import GatewaySettings, build
from kabinet_chassis.auth import AUDIENCE, ISSUER, TokenVerifier, dev_signing_key, issue_access_token, public_pem
from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.errors import Problem

pytestmark = pytest.mark.integration

SOME_ACCOUNT = uuid.uuid4()


def gateway_settings(stack, tmp_path, ledger_url: str) -> GatewaySettings:
    return GatewaySettings(database_url=stack.database_url, kafka_bootstrap_servers=stack.bootstrap_servers,
                           data_dir=tmp_path, ledger_url=ledger_url)


def bearer(key, customer_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_access_token(key, customer_id)}"}


async def ask_gateway(settings: GatewaySettings, path: str, customer_id: str = "alice",
                      ledger_transport: httpx.AsyncBaseTransport | None = None) -> httpx.Response:
    gateway = build(settings, ledger_transport=ledger_transport)
    async with (
        gateway.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.http_app()), base_url="http://gw") as client,
    ):
        return await client.get(path, headers=bearer(dev_signing_key(settings.data_dir), customer_id))


def ledger_answering(status: int, body) -> httpx.MockTransport:
    """A ledger that answers every request with this (a broken deploy, a proxy in between)."""
    return httpx.MockTransport(lambda request: httpx.Response(status, json=body))


@pytest.mark.parametrize(("status", "body"), [
    (200, ["not", "an", "object"]),
    (200, {"unexpected": "shape"}),
    (404, ["not", "a", "problem"]),
    (404, {"code": None, "detail": None}),
], ids=["list", "object-without-fields", "refusal-as-list", "refusal-with-null-code"])
@pytest.mark.parametrize("path", ["/v1/me/accounts", f"/v1/me/accounts/{SOME_ACCOUNT}"], ids=["list", "account"])
async def test_a_ledger_answering_json_that_is_not_its_api_is_a_dependency_unavailable_not_an_internal_error(
        stack, tmp_path, path, status, body):
    answer = await ask_gateway(gateway_settings(stack, tmp_path, "http://ledger"), path,
                               ledger_transport=ledger_answering(status, body))
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "dependency_unavailable" and "Retry-After" in answer.headers


async def trickling_ledger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A ledger that begins its answer and then sends one byte every 0.2 s (stuck mid-answer,
    a saturated link): no single read ever waits long, the answer as a whole takes 20 s."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
    try:
        for _ in range(100):
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b" ")
    except ConnectionError:
        pass  # the gateway gave up and hung up: what it should do
    finally:
        writer.close()


async def test_a_ledger_trickling_its_answer_is_given_up_on_within_the_ledger_time_limit(
        stack, tmp_path, monkeypatch):
    monkeypatch.setattr(routes, "LEDGER_TIMEOUT_S", 1.0)
    server = await asyncio.start_server(trickling_ledger, "127.0.0.1", 0)
    async with server:
        host, port = server.sockets[0].getsockname()[:2]
        settings = gateway_settings(stack, tmp_path, f"http://{host}:{port}")
        started = time.monotonic()
        answer = await ask_gateway(settings, "/v1/me/accounts")
        waited_s = time.monotonic() - started
    assert answer.status_code == 503 and answer.json()["code"] == "dependency_unavailable", answer.text
    assert "Retry-After" in answer.headers
    assert waited_s < routes.LEDGER_TIMEOUT_S + 2, f"the customer waited {waited_s:.1f} s"


class FloodingLedger:
    """A ledger that answers 64 MiB at full speed (a runaway page, a broken deploy), counting what it got to send."""

    answer_bytes = 64 * 2**20

    def __init__(self) -> None:
        self.sent_bytes = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % self.answer_bytes)
        chunk = b" " * 2**16
        try:
            while self.sent_bytes < self.answer_bytes:
                writer.write(chunk)
                await writer.drain()
                self.sent_bytes += len(chunk)
        except ConnectionError:
            pass  # the gateway stopped reading and hung up: what it should do
        finally:
            writer.close()


async def test_the_gateway_reads_no_more_of_a_ledger_answer_than_the_largest_the_ledger_gives(
        stack, tmp_path, monkeypatch):
    monkeypatch.setattr(routes, "LEDGER_ANSWER_BYTES_MAX", 2**20)
    ledger = FloodingLedger()
    server = await asyncio.start_server(ledger, "127.0.0.1", 0)
    async with server:
        host, port = server.sockets[0].getsockname()[:2]
        answer = await ask_gateway(gateway_settings(stack, tmp_path, f"http://{host}:{port}"), "/v1/me/accounts")
    assert answer.status_code == 503 and answer.json()["code"] == "dependency_unavailable", answer.text
    # What the gateway read, plus what the two sockets' buffers hold between the ledger and it.
    assert ledger.sent_bytes < ledger.answer_bytes / 2, f"the gateway took in {ledger.sent_bytes} bytes"


async def open_card(bank, owner: str) -> str:
    response = await bank.ledger.post("/accounts", json={"owner_id": owner, "kind": "card", "currency": "RUB"},
                                      headers={"Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 201, response.text
    return response.json()["account_id"]


async def test_no_cache_keeps_a_customers_accounts_balances_or_history(bank):
    # A shared computer's browser, or a proxy between the app and the bank, must not keep them.
    card = await open_card(bank, "alice")
    period = {"since": "2020-01-01T00:00:00+00:00", "until": "2099-01-01T00:00:00+00:00"}
    for path, params in (("/v1/me/accounts", {}), (f"/v1/me/accounts/{card}", {}),
                         (f"/v1/me/accounts/{card}/balance", {}), (f"/v1/me/accounts/{card}/history", {}),
                         (f"/v1/me/accounts/{card}/statement", period)):
        answer = await bank.get(path, params=params, headers=bearer(bank.key, "alice"))
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers.get("cache-control") == "no-store", path


@pytest.mark.parametrize("roles", [5, "support", [["support"]], [None]], ids=["number", "string", "nested", "null"])
def test_a_signed_token_whose_roles_are_not_a_list_of_names_is_an_invalid_token(roles):
    # A role given as "support" must not become the roles s, u, p, p, o, r, t; a number must not be a 500.
    key = Ed25519PrivateKey.generate()
    now = int(time.time())
    token = jwt.encode({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, "roles": roles},
                       key, algorithm="EdDSA")
    with pytest.raises(Problem) as refused:
        TokenVerifier(public_pem(key)).verify(token)
    assert refused.value.status == 401 and refused.value.code == "invalid_token"


@pytest.mark.parametrize("odd_byte", [b"\xa0", b"\x85", b"\x1c"], ids=["no-break-space", "next-line", "separator"])
async def test_a_token_with_a_stray_byte_after_it_is_an_invalid_token_not_an_internal_error(bank, odd_byte):
    # Python's str.strip() takes these for whitespace, and base64 skips them: the token verified,
    # then the gateway could not pass its header on to the ledger (a 500).
    bank._transport.raise_app_exceptions = False  # answered as uvicorn answers, not raised into the test
    card = await open_card(bank, "alice")
    token = issue_access_token(bank.key, "alice").encode()
    for path in ("/v1/me/accounts", f"/v1/me/accounts/{card}"):
        answer = await bank.get(path, headers={"Authorization": b"Bearer " + token + odd_byte})
        assert answer.status_code == 401 and answer.json()["code"] == "invalid_token", (path, answer.text)
    answer = await bank.get("/v1/me/accounts", headers={"Authorization": b"Bearer \t" + token + b" \t"})
    assert answer.status_code == 200, "spaces and tabs around a token are HTTP's own, and allowed"


def test_while_identity_rotates_its_signing_key_tokens_signed_by_the_old_and_the_new_key_are_both_accepted():
    # The gateway is given both public keys (one PEM after the other) for as long as tokens
    # signed by the old key live: a rotation logs no customer out, and a third key is still refused.
    old, new, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    verifier = TokenVerifier(public_pem(old) + public_pem(new))
    for key in (old, new):
        assert verifier.verify(issue_access_token(key, "alice")).customer_id == "alice"
    with pytest.raises(Problem) as refused:
        verifier.verify(issue_access_token(stranger, "alice"))
    assert refused.value.status == 401 and refused.value.code == "invalid_token"


async def test_a_ledger_that_is_down_or_failing_is_a_503_with_retry_after_that_tells_nothing_of_its_insides(
        stack, tmp_path):
    failing = ledger_answering(500, {"code": "internal_error", "detail": "relation ledger_accounts: password=hunter2"})
    answer = await ask_gateway(gateway_settings(stack, tmp_path, "http://ledger"), "/v1/me/accounts",
                               ledger_transport=failing)
    assert answer.status_code == 503 and answer.json()["code"] == "dependency_unavailable"
    assert "hunter2" not in answer.text and "ledger_accounts" not in answer.text
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    server.close()
    await server.wait_closed()  # nothing listens there now
    answer = await ask_gateway(gateway_settings(stack, tmp_path, f"http://{host}:{port}"), "/v1/me/accounts")
    assert answer.status_code == 503 and answer.json()["code"] == "dependency_unavailable", answer.text
    assert int(answer.headers["Retry-After"]) > 0


async def test_the_gateway_starts_while_the_broker_is_down(stack, tmp_path):
    # It consumes nothing and publishes nothing: Kafka's outage must not keep customers out.
    settings = GatewaySettings(database_url=stack.database_url, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
                               data_dir=tmp_path, ledger_url="http://ledger")
    async with build(settings).running() as gateway:
        assert gateway.dead_loops() == []
