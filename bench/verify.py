"""How long `kabinet ledger verify` takes, against a plain read of the same events.

An auditor runs verify on the whole history, so its speed decides how often it can run.
The bench fills a ledger (accounts funded, then transfers with a fee leg and card holds
captured, posted by 32 clients through the batched writer, with the read model, the relay
and the sealer running as in production), stops it (the sealer seals the rest), and then
measures, side by side on the same PostgreSQL: reading every event in log order with one
COPY (what the database alone costs) and verify itself. Reported: events per second of
each and their ratio, and the most memory verify held at once (measured in a second run
under tracemalloc, which slows it: an auditor sizes the machine verify runs on by it, and
it grows with the ledger). Last line: one JSON object.

    .venv/bin/python -m bench.verify [--accounts 10000] [--transfers 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.common import console, emit_json, print_table
from bench.ledger import setup_accounts
from kabinet_chassis.devstack.ephemeral import EphemeralStack
from kabinet_chassis.eventstore import event_store_env, events_table
from ledger.application import LedgerApplication
from ledger.domain import commands as c
from ledger.service import build
from ledger.verify import verify

CLIENTS = 32
HOLD_EVERY = 4  # one operation in four is a card purchase: a hold, then its capture
FEE_MINOR = 3


async def fill(parts, accounts: list, fees, transfers: int) -> None:
    """`transfers` operations from CLIENTS clients, each waiting for its answer."""
    run_id = uuid.uuid4().hex[:8]
    per_client = transfers // CLIENTS

    async def client(number: int) -> None:
        rng = random.Random(number)
        for i in range(per_client):
            source, target = rng.sample(accounts, 2)
            amount = rng.randint(1, 100)
            operation_id = f"{run_id}-{number}-{i}"
            if i % HOLD_EVERY == 0:
                expires_at = datetime.now(UTC) + timedelta(days=7)
                await parts.writer.submit(c.PlaceHold(operation_id, source, target, amount, "RUB", expires_at, "card"))
                await parts.writer.submit(c.CaptureHold(operation_id, "capture-1", amount))
            else:
                await parts.writer.submit(c.PostTransfer(operation_id, (
                    c.Leg(source, -amount - FEE_MINOR, "RUB"), c.Leg(target, amount, "RUB"),
                    c.Leg(fees, FEE_MINOR, "RUB")), "p2p"))

    await asyncio.gather(*(client(number) for number in range(CLIENTS)))
    await parts.projection.wait_for(parts.writer.last_position, timeout_s=300)


async def _discard(_: bytes) -> None:
    """COPY's sink: the rows are read, not kept."""


async def plain_read_s(url: str, table: str) -> float:
    """Seconds to read every event in log order: one COPY, the rows thrown away."""
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await connection.copy_from_query(f"SELECT * FROM {table} ORDER BY notification_id", output=_discard)
        return time.perf_counter() - started
    finally:
        await connection.close()


async def main(account_count: int, transfers: int) -> dict:
    with EphemeralStack(prefix="kabinet-bench-") as stack:
        settings = stack.service_settings("ledger_verify_bench")
        service, parts = build(settings)
        async with service.running():
            with console.status(f"opening and funding {account_count} accounts…"):
                accounts, _, fees = await setup_accounts(parts, account_count)
            with console.status(f"posting {transfers} operations…"):
                await fill(parts, accounts, fees, transfers)
        table = events_table(parts.app.recorder)
        connection = await asyncpg.connect(settings.service_database_url)
        events = await connection.fetchval(f"SELECT count(*) FROM {table}")
        await connection.close()
        with console.status(f"reading {events} events…"):
            read_s = await plain_read_s(settings.service_database_url, table)
        app = LedgerApplication(env=event_store_env(settings))
        try:
            with console.status(f"verifying {events} events…"):
                started = time.perf_counter()
                report = await verify(app, settings)
                verify_s = time.perf_counter() - started
            with console.status(f"verifying {events} events again, its memory traced…"):
                tracemalloc.start()
                try:
                    await verify(app, settings)
                    peak_bytes = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
        finally:
            app.close()
    failed = [check.name for check in report.checks if not check.ok]
    assert not failed, f"verify failed on the bench's own ledger: {failed}"
    print_table("kabinet ledger verify vs a plain read of the same events (same PostgreSQL)",
                ("events", "plain read s", "plain read events/s", "verify s", "verify events/s", "verify÷read",
                 "verify peak MiB"),
                [(str(events), f"{read_s:.2f}", f"{events / read_s:.0f}", f"{verify_s:.2f}", f"{events / verify_s:.0f}",
                  f"{read_s / verify_s:.3f}", f"{peak_bytes / 2**20:.1f}")])
    return {"events": events, "accounts": account_count + 2, "verify_s": round(verify_s, 2),
            "verify_events_per_s": round(events / verify_s), "plain_read_events_per_s": round(events / read_s),
            "verify_to_read_ratio": round(read_s / verify_s, 4), "verify_peak_mib": round(peak_bytes / 2**20, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--transfers", type=int, default=50_000)
    arguments = parser.parse_args()
    emit_json(asyncio.run(main(arguments.accounts, arguments.transfers)))
