"""Rules of the gateway and of access tokens at their margins: the gateway holds the cabinet's
rules itself, whatever the ledger behind it answers (another customer's account, a page
with someone else's accounts in it, a 404 in its own words); a query is refused in a few
lines, each name once; every query reaches the ledger as the customer sent it; a token is
taken only from identity, for the bank, with every claim its checks need, and a rotation
turns no expired token into a forged-looking one; a body's limit holds to the byte."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request

from gateway import routes
from gateway.service import GatewaySettings, build
from kabinet_chassis.auth import (
    ACCESS_TOKEN_LIFETIME_MAX_S,
    AUDIENCE,
    ISSUER,
    TokenVerifier,
    dev_signing_key,
    issue_access_token,
    public_pem,
)
from kabinet_chassis.errors import Problem, install_problem_handlers
from kabinet_chassis.request_limits import RequestBodyLimit

pytestmark = pytest.mark.integration

ALICES = str(uuid.uuid4())
BOBS = str(uuid.uuid4())


def account(account_id: str, owner_id: str) -> dict:
    """An account as the ledger answers it (only what the gateway reads matters here)."""
    return {"account_id": account_id, "owner_id": owner_id, "kind": "card", "currency": "RUB", "state": "open"}


class Ledger:
    """A ledger behind the gateway that answers as it is told, recording what it was asked."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.asked: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request)
        status, body = self.answer(request)
        return httpx.Response(status, json=body)

    def paths(self) -> list[str]:
        return [request.url.path for request in self.asked]


@contextlib.asynccontextmanager
async def gateway_before(stack, tmp_path, ledger) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in front of `ledger`, trusting the development key of `tmp_path`; `client.alice`
    is Alice's Authorization header."""
    settings = GatewaySettings(
        database_url=stack.database_url, kafka_bootstrap_servers=stack.bootstrap_servers, data_dir=tmp_path, ledger_url="http://ledger"
    )
    gateway = build(settings, ledger_transport=httpx.MockTransport(ledger))
    async with (
        gateway.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.http_app()), base_url="http://gw") as client,
    ):
        client.alice = {"Authorization": f"Bearer {issue_access_token(dev_signing_key(tmp_path), 'alice')}"}
        yield client


def answering_accounts(request: httpx.Request) -> tuple[int, dict]:
    """Alice's account is hers; Bob's is Bob's, whoever asks (a ledger that forgot to check the token's owner)."""
    path = request.url.path.removeprefix("/ledger/v1")
    if path == f"/accounts/{ALICES}":
        return 200, account(ALICES, "alice")
    if path == f"/accounts/{BOBS}":
        return 200, account(BOBS, "bob")
    if path == "/accounts":
        return 200, {"accounts": [account(ALICES, "alice"), account(BOBS, "bob")], "next_cursor": BOBS}
    return 200, {"lines": [], "holds": [], "next_cursor": None, "posted": {"amount_minor": 0, "currency": "RUB"}}


# ---- the gateway holds the cabinet's rules itself ----------------------------------------------


async def test_an_account_the_ledger_answers_as_someone_elses_is_not_found_and_nothing_of_it_is_asked(stack, tmp_path):
    # ARCHITECTURE §6: tokens and ownership are checked by the gateway and again by each
    # service; a ledger that slipped (a bad deploy) must not show Alice Bob's money.
    ledger = Ledger(answering_accounts)
    async with gateway_before(stack, tmp_path, ledger) as gateway:
        for route in ("", "/balance", "/history", "/holds", "/statement"):
            params = {"since": "2020-01-01T00:00:00Z"} if route == "/statement" else {}
            ledger.asked.clear()
            answer = await gateway.get(f"/v1/me/accounts/{BOBS}{route}", headers=gateway.alice, params=params)
            assert answer.status_code == 404, (route, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["code"] == "account_not_found" and "bob" not in answer.text, route
            assert ledger.paths() == [f"/ledger/v1/accounts/{BOBS}"], (route, "only the account, to check whose it is")
            mine = await gateway.get(f"/v1/me/accounts/{ALICES}{route}", headers=gateway.alice, params=params)
            assert mine.status_code == 200, (route, mine.text)


async def test_accounts_the_ledger_lists_that_are_not_hers_are_left_out_of_her_page(stack, tmp_path):
    ledger = Ledger(answering_accounts)
    async with gateway_before(stack, tmp_path, ledger) as gateway:
        page = await gateway.get("/v1/me/accounts", headers=gateway.alice, params={"limit": "2"})
    assert page.status_code == 200, page.text
    assert [seen["account_id"] for seen in page.json()["accounts"]] == [ALICES] and "bob" not in page.text
    assert page.json()["next_cursor"] == BOBS, "the ledger's paging is passed on as it is"
    assert [list(request.url.params.multi_items()) for request in ledger.asked] == [[("limit", "2"), ("owner_id", "alice")]]


async def test_a_ledger_404_in_its_own_words_reaches_the_customer_as_her_account_not_found(stack, tmp_path):
    # The cabinet's one 404 is `account_not_found`, naming only the account she asked for:
    # a ledger's route missing after a bad deploy tells her nothing of the ledger's paths.
    ledger = Ledger(lambda request: (404, {"code": "not_found", "detail": f"no route {request.url.path} in ledger-7"}))
    async with gateway_before(stack, tmp_path, ledger) as gateway:
        answer = await gateway.get(f"/v1/me/accounts/{ALICES}", headers=gateway.alice)
    assert answer.status_code == 404, answer.text
    problem = answer.json()
    assert (problem["code"], problem["detail"]) == ("account_not_found", f"no account {ALICES}")
    assert problem["instance"] == f"/v1/me/accounts/{ALICES}", "a problem names the request it answers"
    assert "ledger" not in answer.text


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (422, {"code": "validation_error", "detail": 5}),
        (422, {"code": "validation_error", "detail": None}),
        (307, {"accounts": [], "next_cursor": None}),
    ],
    ids=["number-as-detail", "null-detail", "redirect"],
)
async def test_a_ledger_answer_that_is_neither_its_api_nor_its_problem_is_a_503_naming_the_ledger(stack, tmp_path, status, body):
    async with gateway_before(stack, tmp_path, Ledger(lambda request: (status, body))) as gateway:
        answer = await gateway.get("/v1/me/accounts", headers=gateway.alice)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json" and int(answer.headers["Retry-After"]) > 0
    assert answer.json()["code"] == "dependency_unavailable" and answer.json()["dependency"] == "ledger"


async def test_every_query_the_customer_sends_reaches_the_ledger_as_she_sent_it(stack, tmp_path):
    # Dropped on the way, `at` would answer today's balance as the one asked for, and `limit`
    # and `cursor` the first page again and again.
    ledger = Ledger(answering_accounts)
    queries = {
        "/balance": [("at", "2024-01-01T00:00:00Z")],
        "/history": [("limit", "3"), ("code", "top_up")],
        "/holds": [("limit", "2"), ("cursor", "17")],
        "/statement": [("since", "2024-01-01T00:00:00Z"), ("until", "2024-02-01T00:00:00Z"), ("limit", "9")],
    }
    async with gateway_before(stack, tmp_path, ledger) as gateway:
        for route, query in queries.items():
            answer = await gateway.get(f"/v1/me/accounts/{ALICES}{route}", headers=gateway.alice, params=query)
            assert answer.status_code == 200, (route, answer.text)
    passed = {
        request.url.path.removeprefix(f"/ledger/v1/accounts/{ALICES}"): list(request.url.params.multi_items())
        for request in ledger.asked
        if request.url.path != f"/ledger/v1/accounts/{ALICES}"
    }
    assert passed == queries


async def test_a_query_of_many_made_up_names_is_refused_in_a_few_lines_each_name_once(stack, tmp_path):
    ledger = Ledger(answering_accounts)
    async with gateway_before(stack, tmp_path, ledger) as gateway:
        many = await gateway.get(f"/v1/me/accounts/{ALICES}", headers=gateway.alice, params=[(f"p{number}", "1") for number in range(500)])
        twice = await gateway.get(
            f"/v1/me/accounts/{ALICES}", headers=gateway.alice, params=[("at", "2020-01-01T00:00:00Z"), ("at", "2021-01-01T00:00:00Z")]
        )
    assert many.status_code == 422 and many.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in many.json()["errors"]] == [f"p{number}" for number in range(10)]
    assert twice.status_code == 422 and [error["field"] for error in twice.json()["errors"]] == ["at"]
    assert ledger.asked == [], "refused before the ledger is asked"


async def test_a_path_the_cabinet_does_not_have_is_a_not_found_problem(stack, tmp_path):
    async with gateway_before(stack, tmp_path, Ledger(answering_accounts)) as gateway:
        answer = await gateway.get("/v1/me/cards", headers=gateway.alice)
    assert answer.status_code == 404 and answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "not_found" and answer.json()["instance"] == "/v1/me/cards"


async def test_the_gateway_stops_reading_a_ledger_answer_once_it_passes_the_most_it_takes(stack, tmp_path, monkeypatch):
    # Counted chunk by chunk as the ledger sends them: what the gateway holds of a runaway
    # answer is bounded by the limit, not by what the sockets between them buffer.
    monkeypatch.setattr(routes, "LEDGER_ANSWER_BYTES_MAX", 2**20)
    chunk, sent = b" " * 2**16, []

    async def runaway():
        for _ in range(1024):  # 64 MiB
            sent.append(len(chunk))
            yield chunk

    async with gateway_before(stack, tmp_path, lambda request: httpx.Response(200, content=runaway())) as gateway:
        answer = await gateway.get("/v1/me/accounts", headers=gateway.alice)
    assert answer.status_code == 503 and answer.json()["code"] == "dependency_unavailable", answer.text
    assert sum(sent) <= routes.LEDGER_ANSWER_BYTES_MAX + len(chunk), f"the gateway read {sum(sent)} bytes"


async def not_ready_ledger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A ledger that answers, but is not ready (its database down, a standby)."""
    await reader.readuntil(b"\r\n\r\n")
    body = b'{"status": "not_ready"}'
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


async def test_a_ledger_that_answers_not_ready_keeps_the_gateway_not_ready(stack, tmp_path):
    # Ready, the gateway would take customers' requests only to answer each of them 503.
    ledger = await asyncio.start_server(not_ready_ledger, "127.0.0.1", 0)
    settings = GatewaySettings(
        database_url=stack.database_url,
        kafka_bootstrap_servers=stack.bootstrap_servers,
        data_dir=tmp_path,
        ledger_url=f"http://127.0.0.1:{ledger.sockets[0].getsockname()[1]}",
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build(settings).http_app()), base_url="http://gw") as client:
            answer = await client.get("/health/ready")
    finally:
        ledger.close()
    assert answer.status_code == 503, answer.text
    assert answer.json()["checks"] == {"ledger": {"status": "down"}}


# ---- access tokens ---------------------------------------------------------------------------

KEY = Ed25519PrivateKey.generate()
VERIFIER = TokenVerifier(public_pem(KEY))


def signed(claims: dict, key=KEY) -> str:
    return jwt.encode(claims, key, algorithm="EdDSA")


def claims_now(**changed) -> dict:
    now = int(time.time())
    claims = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **changed}
    return {name: value for name, value in claims.items() if value is not None}


def assert_invalid_token(token: str, verifier: TokenVerifier = VERIFIER) -> Problem:
    with pytest.raises(Problem) as refused:
        verifier.verify(token)
    assert refused.value.status == 401 and refused.value.code == "invalid_token", refused.value.detail
    assert refused.value.headers == {"WWW-Authenticate": "Bearer"}
    return refused.value


def test_a_token_well_signed_by_identitys_key_but_issued_by_another_or_for_another_audience_is_refused():
    # Identity's key may sign tokens for other parties (a partner's API); they open no cabinet.
    assert VERIFIER.verify(signed(claims_now())).customer_id == "alice"
    assert_invalid_token(signed(claims_now(iss="partner-sso")))
    assert_invalid_token(signed(claims_now(aud="kabinet-partners")))


def test_a_token_is_taken_only_in_compact_form_with_nothing_after_its_three_parts():
    token = signed(claims_now())
    assert VERIFIER.verify(token).customer_id == "alice"
    for trailing in ("==", ".", "=\u00a0"):
        assert_invalid_token(token + trailing)


@pytest.mark.parametrize("missing", ["exp", "iat", "sub"])
def test_a_token_without_a_claim_its_checks_need_is_an_invalid_token_never_an_internal_error(missing):
    # Without `exp` it would never expire; without `iat` its lifetime could not be capped.
    assert_invalid_token(signed({name: value for name, value in claims_now().items() if name != missing}))


@pytest.mark.parametrize("as_text", ["exp", "iat"])
def test_a_token_whose_times_are_written_as_text_is_an_invalid_token_never_an_internal_error(as_text):
    # RFC 7519 §2: a NumericDate is a JSON number. Like roles that are not a list of names,
    # a well-signed token that is not as identity makes them is a 401, not a 500 and a logged stack.
    claims = claims_now()
    assert_invalid_token(signed({**claims, as_text: str(claims[as_text])}))


def test_the_lifetime_cap_counts_from_when_the_token_was_issued_not_from_now():
    # Issued an hour ago to live 25 h: it was issued to live longer than a day, however long it has left.
    issued = int(time.time()) - 3600
    assert_invalid_token(signed(claims_now(iat=issued, exp=issued + ACCESS_TOKEN_LIFETIME_MAX_S + 3600)))


def test_a_token_expired_under_the_old_key_of_a_rotation_is_told_expired_so_the_app_refreshes_it():
    # An `invalid_token` would send her app to log her out instead of refreshing.
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    rotating = TokenVerifier(public_pem(old) + public_pem(new))
    expired = signed(claims_now(iat=int(time.time()) - 900, exp=int(time.time()) - 600), key=old)
    with pytest.raises(Problem) as refused:
        rotating.verify(expired)
    assert refused.value.status == 401 and refused.value.code == "token_expired"


def test_a_token_signed_with_the_public_key_as_a_shared_secret_is_an_invalid_token():
    # The algorithm-confusion forgery: anyone holds identity's public key.
    for algorithm in ("HS256", "none"):
        signing_input = f"{part({'alg': algorithm, 'typ': 'JWT'})}.{part(claims_now())}"
        mac = hmac.new(public_pem(KEY).encode(), signing_input.encode(), hashlib.sha256).digest()
        assert_invalid_token(f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}")


def part(content: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(content).encode()).rstrip(b"=").decode()


# ---- a body's limit, to the byte --------------------------------------------------------------

LIMIT_BYTES = 64


def limited_app(read: list) -> RequestBodyLimit:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/orders")
    async def order(request: Request):
        read.append(await request.body())
        return {"read_bytes": len(read[-1])}

    return RequestBodyLimit(app, max_bytes=LIMIT_BYTES)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_of_exactly_the_limit_is_taken_and_one_byte_more_is_refused(declared):
    read: list = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited_app(read)), base_url="http://svc") as client:

        async def post(size: int) -> httpx.Response:
            body = b"x" * size

            async def chunks():
                yield body[: size // 2]
                yield body[size // 2 :]

            return await client.post("/orders", content=body if declared else chunks())

        taken, refused = await post(LIMIT_BYTES), await post(LIMIT_BYTES + 1)
    assert taken.status_code == 200 and taken.json() == {"read_bytes": LIMIT_BYTES}, taken.text
    assert refused.status_code == 413 and refused.json()["code"] == "request_too_large", refused.text
    assert len(read) == 1


async def test_a_body_declared_over_the_limit_is_refused_before_any_of_it_is_received():
    # A client sending `Expect: 100-continue` waits for this answer before sending its body.
    received: list = []
    sent: list = []

    async def receive():
        received.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "raw_path": b"/orders",
        "root_path": "",
        "query_string": b"",
        "scheme": "http",
        "server": ("svc", 80),
        "client": ("127.0.0.1", 1),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
        "headers": [(b"host", b"svc"), (b"content-length", str(LIMIT_BYTES + 1).encode()), (b"expect", b"100-continue")],
    }
    await limited_app([])(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert received == [], "not a byte of the body was asked for"
