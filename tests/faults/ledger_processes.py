"""The ledger as an operator runs it, for fault tests: its own process (to kill -9), its own
servers when a test kills them, and the checks every fault test ends with.

Nothing a test starts outlives it: every process is started inside a context manager that
kills it (by its own pid, never by name) when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from kabinet_chassis.devstack.ports import free_port
from kabinet_chassis.eventstore import event_store_env, events_table
from kabinet_chassis.settings import ServiceSettings
from ledger.application import LedgerApplication
from ledger.verify import Report, verify
from tests.support.tokens import ledger_poster

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20
SERVICE_FACTORY = "ledger.service:create_app"


@dataclass
class LedgerProcess:
    """One ledger process (uvicorn), started by `start()` and answering on `port`."""

    settings: ServiceSettings
    log_path: Path
    port: int = field(default_factory=free_port)
    factory: str = SERVICE_FACTORY
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ledger/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LedgerProcess:
        env = {**os.environ, "KABINET_SERVICE_NAME": self.settings.service_name,
               "KABINET_DATABASE_URL": self.settings.database_url,
               "KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka_bootstrap_servers,
               "KABINET_DATA_DIR": str(self.settings.data_dir), **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", self.factory, "--app-dir", str(REPO_ROOT),
                 "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.root_url}/health/live", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the ledger did not start; see {self.log_path}")

    def kill(self) -> None:
        """kill -9, as the OOM killer or a lost node does it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def died(self) -> bool:
        return self.process is not None and self.process.poll() is not None


@contextlib.contextmanager
def running(ledger: LedgerProcess) -> Iterator[LedgerProcess]:
    ledger.start()
    try:
        yield ledger
    finally:
        ledger.stop()


def poster_client(ledger: LedgerProcess, timeout_s: float = 30) -> httpx.AsyncClient:
    """A client of a service that moves money (as payments or cards), with its token."""
    return httpx.AsyncClient(base_url=ledger.base_url, timeout=timeout_s,
                             headers=ledger_poster(ledger.settings.data_dir))


async def open_account(client: httpx.AsyncClient, kind: str, owner: str) -> str:
    response = await client.post("/accounts", json={"owner_id": owner, "kind": kind, "currency": "RUB"},
                                 headers={"Idempotency-Key": f"open-{kind}-{owner}"})
    assert response.status_code == 201, response.text
    return response.json()["account_id"]


class TopUpStream:
    """The stream most fault tests post: top-up `i` pays i + 1 minor units from the bank's
    settlement account to card i mod the card count, under the id `stream-{i}`."""

    def __init__(self, settlement: str, cards: list[str]) -> None:
        self.settlement = settlement
        self.cards = cards

    @classmethod
    async def opened(cls, client: httpx.AsyncClient, card_count: int) -> TopUpStream:
        settlement = await open_account(client, "settlement", "bank")
        return cls(settlement, [await open_account(client, "card", f"customer-{i}") for i in range(card_count)])

    def body(self, i: int) -> dict:
        return {"transfer_id": f"stream-{i}", "code": "top_up", "legs": [
            {"account_id": self.settlement, "amount_minor": -(i + 1), "currency": "RUB"},
            {"account_id": self.cards[i % len(self.cards)], "amount_minor": i + 1, "currency": "RUB"}]}


RETRYABLE_STATUSES = {409, 502, 503, 504}  # 409: request_in_progress (an Idempotency-Key still claimed)


async def until_answered(send: Callable[[], Awaitable[httpx.Response]], limit_s: float = 60) -> httpx.Response:
    """What a well-behaved client does: retry the same request (same ids) while the ledger
    says to (503 with Retry-After) or cannot be reached; bounded."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            response = await send()
            if response.status_code not in RETRYABLE_STATUSES or time.monotonic() > deadline:
                return response
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def events_head(settings: ServiceSettings) -> int:
    app = LedgerApplication(env=event_store_env(settings))
    try:
        connection = await asyncpg.connect(settings.service_database_url)
        try:
            return await connection.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {events_table(app.recorder)}")
        finally:
            await connection.close()
    finally:
        app.close()


async def read_model_caught_up(settings: ServiceSettings, limit_s: float = 30) -> None:
    """Wait (bounded) until the ledger's read model has applied the whole log."""
    head = await events_head(settings)
    connection = await asyncpg.connect(settings.service_database_url)
    try:
        deadline = time.monotonic() + limit_s
        while True:
            position = await connection.fetchval(
                "SELECT position FROM projection_position WHERE projection = 'ledger_read_model'")
            if position >= head:
                return
            assert time.monotonic() < deadline, f"the read model is at {position}, the log at {head}"
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


async def verified(settings: ServiceSettings) -> Report:
    """`kabinet ledger verify` on the ledger's database (its read model caught up first)."""
    await read_model_caught_up(settings)
    app = LedgerApplication(env=event_store_env(settings))
    try:
        return await verify(app, settings)
    finally:
        app.close()


def failed_checks(report: Report) -> list[Any]:
    return [check for check in report.checks if not check.ok]
