"""Rules of a request's size, on every service (the chassis installs them): FastAPI reads and
parses a whole body before it checks the caller's token, so a body over the limit is refused
413 before any of it is parsed, whoever sends it and whether or not it says its length, and
nothing it asks for is done. The largest request the ledger takes is well within the limit."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from kabinet_chassis.request_limits import REQUEST_BODY_BYTES_MAX
from ledger.domain import commands
from ledger.service import build
from services.ledger.tests.integration.ledger_support import open_account, transfer_body
from tests.support.tokens import ledger_poster

pytestmark = pytest.mark.integration

OVERSIZE_BYTES = 2 * 1024 * 1024
CHUNK_BYTES = 64 * 1024


@pytest.fixture
async def ledger(stack, unique_name):
    """A running ledger on its own database; its client is anonymous (`ledger.poster` is a
    service's token that moves money)."""
    settings = stack.service_settings(f"ledger_{unique_name}")
    service, _ = build(settings)
    async with (
        service.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=service.http_app()),
                          base_url="http://ledger/ledger/v1") as client,
    ):
        client.poster = ledger_poster(settings.data_dir)
        yield client


async def funded_pair(ledger) -> tuple[str, str]:
    ledger.headers.update(ledger.poster)
    try:
        return await open_account(ledger, "settlement"), await open_account(ledger, owner="alice")
    finally:
        del ledger.headers["Authorization"]


def padded(body: dict, size_bytes: int) -> bytes:
    """A valid transfer, made `size_bytes` long with whitespace JSON allows: posted, were it read."""
    text = json.dumps(body).encode()
    return text[:-1] + b" " * (size_bytes - len(text)) + b"}"


def assert_refused_as_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "request_too_large" and problem["status"] == 413, problem
    assert str(REQUEST_BODY_BYTES_MAX) in problem["detail"], problem
    assert problem["type"] == "https://kabinet.dev/problems/request_too_large"


async def assert_not_posted(ledger, transfer_id: str, settlement: str, card: str) -> None:
    # The id is still free: posting it now is a first post, not a replay of the refused one.
    posted = await ledger.post("/transfers", json=transfer_body(transfer_id, (settlement, -100), (card, 100)),
                               headers={**ledger.poster, "Idempotency-Key": str(uuid.uuid4())})
    assert posted.status_code == 201 and posted.json()["replayed"] is False, posted.text


@pytest.mark.parametrize("caller", ["anonymous", "authorised"])
async def test_a_body_over_the_limit_is_refused_413_before_it_is_parsed_or_the_token_is_checked(ledger, caller):
    settlement, card = await funded_pair(ledger)
    transfer_id = f"oversize-{caller}"
    body = padded(transfer_body(transfer_id, (settlement, -100), (card, 100)), OVERSIZE_BYTES)
    headers = {"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4()),
               **(ledger.poster if caller == "authorised" else {})}
    response = await ledger.post("/transfers", content=body, headers=headers)
    assert_refused_as_too_large(response)
    assert response.json()["instance"] == "/ledger/v1/transfers"
    await assert_not_posted(ledger, transfer_id, settlement, card)


async def test_a_streamed_body_that_does_not_say_its_length_is_counted_and_refused_once_over_the_limit(ledger):
    settlement, card = await funded_pair(ledger)
    body = padded(transfer_body("oversize-streamed", (settlement, -100), (card, 100)), OVERSIZE_BYTES)
    chunks = [body[start:start + CHUNK_BYTES] for start in range(0, len(body), CHUNK_BYTES)]
    sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        for chunk in chunks:
            sent += 1
            yield chunk

    request = ledger.build_request("POST", "/transfers", content=stream(),
                                   headers={**ledger.poster, "Content-Type": "application/json",
                                            "Idempotency-Key": str(uuid.uuid4())})
    assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
    response = await ledger.send(request)
    assert_refused_as_too_large(response)
    # It stopped reading once past the limit: the rest was never taken in.
    assert sent <= REQUEST_BODY_BYTES_MAX // CHUNK_BYTES + 1 < len(chunks), (sent, len(chunks))
    await assert_not_posted(ledger, "oversize-streamed", settlement, card)


async def test_the_largest_transfer_the_ledger_takes_is_within_the_limit_and_posts(ledger):
    ledger.headers.update(ledger.poster)
    settlement = await open_account(ledger, "settlement")
    cards = [await open_account(ledger, owner=f"c{i}") for i in range(commands.LEGS_MAX - 1)]
    # Free text at its longest, each character outside the BMP: JSON's longest escape (12 bytes).
    wide = "\U0001F4B8"
    body = {
        **transfer_body("largest", (settlement, -100 * len(cards)), *((card, 100) for card in cards)),
        "external_ref": wide * commands.ID_CHARS_MAX,
        "customer_ids": [f"{i:02d}" + wide * (commands.ID_CHARS_MAX - 2) for i in range(commands.CUSTOMER_IDS_MAX)],
        "metadata": {f"{i:02d}" + wide * (commands.METADATA_VALUE_CHARS_MAX - 2): wide * commands.METADATA_VALUE_CHARS_MAX
                     for i in range(commands.METADATA_KEYS_MAX)},
    }
    content = json.dumps(body, indent=2).encode()  # ensure_ascii: every one escaped
    assert len(content) > REQUEST_BODY_BYTES_MAX // 5, "as large as a valid transfer gets"
    posted = await ledger.post("/transfers", content=content,
                               headers={"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())})
    assert posted.status_code == 201, posted.text[:500]
