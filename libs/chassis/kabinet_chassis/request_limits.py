"""A limit on the size of a request's body, for every service (installed by `Service.http_app`).

FastAPI reads and parses a whole body before it runs a route's dependencies, the token check
among them: without a limit anyone who reaches a service's port, with no token, could make it
hold and parse a body of any size (a 256 MiB JSON grew the ledger by 512 MiB before its 401),
and a few such requests get the bank's one writer killed for its memory. Starlette has no such
limit of its own, and the ASGI packages that add one either trust Content-Length alone or have
not been kept up, so this is ours: a body declared larger is refused before any of it is read,
and one that does not say (chunked) or says less is counted as it arrives and refused once it
passes the limit, before the route sees any of it.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kabinet_chassis.errors import Problem, http_problem_code, problem_response

# The largest valid request is a ledger transfer (ledger/domain/commands.py): 64 legs, 32
# metadata keys and values of at most 256 characters, 16 customer ids and an external ref of
# at most 128. With every character of its free text written as JSON's longest escape (a
# character outside the BMP as a surrogate pair, "\\ud83d\\ude00": 12 bytes) and every other
# one as "\\u00XX" (6 bytes), it comes to about 253 KB. 1 MiB leaves four times that for a
# client's whitespace and for requests yet to come, and is a small price for any process.
REQUEST_BODY_BYTES_MAX = 1024 * 1024


class RequestBodyLimit:
    """Refuses a body over `max_bytes` with a 413 problem `request_too_large`. Pure ASGI, so
    that it sees the body's chunks as they arrive, before anything reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int = REQUEST_BODY_BYTES_MAX) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = f"the request's body is larger than this service takes, {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # Answered before any of it is read (and before a client expecting 100-continue sends it).
            problem = Problem(413, http_problem_code(413), self.too_large)
            await problem_response(problem, Request(scope))(scope, receive, send)
            return
        received_bytes = 0

        async def counted() -> Message:
            nonlocal received_bytes
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > self.max_bytes:
                    # FastAPI lets an HTTPException from reading the body through as it is; the
                    # chassis answers it as the problem `request_too_large` (errors.py).
                    raise HTTPException(413, self.too_large)
            return message

        await self.app(scope, counted, send)
