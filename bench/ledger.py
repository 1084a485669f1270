"""Ledger throughput against pgbench TPC-B, measured side by side on the same PostgreSQL.

A durable transfer is counted from the moment the command is accepted by the ledger
until its events are committed (synchronous_commit on) together with the balances they
change: the balance projection is saved in the events' transaction, so the writer's
answer means both. Each client submits a transfer, waits for that answer, then submits
the next. Clients run in this process against the service's command boundary (the
batched writer), with the history projection and the relay running beside it as in
production; pgbench's clients are C processes over TCP. Both use one PostgreSQL server.
After each run the bench waits for the history projection (entries, statements) to
catch up and reports how long that took after the last transfer.

Workloads: uniform over 10,000 customer accounts, and the same with a fee leg to one
hot fee account. Client counts 1, 8 and 32. Each measured run (pgbench's too) starts
after a CHECKPOINT. Last line: one JSON object.

    .venv/bin/python -m bench.ledger [--seconds 5] [--accounts 10000]

(Run as a module: as a script, this file would shadow the `ledger` package.)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import subprocess
import time
import uuid

import asyncpg

from bench.common import console, emit_json, print_table
from kabinet_chassis.devstack.ephemeral import EphemeralStack
from kabinet_chassis.devstack.postgres import pg_binary
from ledger.domain import commands as c
from ledger.service import build

CLIENT_COUNTS = (1, 8, 32)
PGBENCH_SCALE = 32  # TPC-B scale >= the largest client count
FUNDING_MINOR = 10_000_000


# A backend reports its statistics at most once a second while busy, and about 10 s after it
# goes idle (PGSTAT_IDLE_INTERVAL): read right after a run, the WAL flushes of the run's last
# second were missing and those of the run before counted. Each reading waits this long first.
STATS_SETTLE_S = 11


async def wal_flushes(url: str) -> int:
    """WAL flushes so far, as the server's statistics show them once settled: pg_stat_io's
    WAL row on PostgreSQL 18 and later (pg_stat_wal lost wal_sync then), pg_stat_wal on older
    servers (16 and 17 have pg_stat_io, but no WAL row)."""
    await asyncio.sleep(STATS_SETTLE_S)
    connection = await asyncpg.connect(url)
    try:
        if int(await connection.fetchval("SHOW server_version_num")) >= 180_000:
            return int(await connection.fetchval("SELECT coalesce(sum(fsyncs), 0) FROM pg_stat_io WHERE object = 'wal'"))
        return int(await connection.fetchval("SELECT wal_sync FROM pg_stat_wal"))
    finally:
        await connection.close()


async def checkpoint(url: str) -> None:
    """Every measured run starts from a clean server: the dirty pages of the run before
    (pgbench's above all) must not be flushed during the next one."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()


async def setup_accounts(parts, count: int) -> tuple[list, object, object]:
    settlement = uuid.uuid4()
    fees = uuid.uuid4()
    await parts.writer.submit(c.OpenAccount(settlement, "bank", "settlement", "RUB"))
    await parts.writer.submit(c.OpenAccount(fees, "bank", "fee_income", "RUB"))
    accounts = [uuid.uuid4() for _ in range(count)]
    await asyncio.gather(*(parts.writer.submit(c.OpenAccount(a, f"customer-{i}", "card", "RUB")) for i, a in enumerate(accounts)))
    await asyncio.gather(*(
        parts.writer.submit(c.PostTransfer(f"fund-{a}", (c.Leg(settlement, -FUNDING_MINOR, "RUB"), c.Leg(a, FUNDING_MINOR, "RUB")),
                                           "top_up"))
        for a in accounts
    ))
    await parts.projection.wait_for(parts.writer.last_position, timeout_s=120)
    return accounts, settlement, fees


async def run_ledger_load(parts, accounts, fees, clients: int, seconds: float, hot: bool) -> dict:
    latencies_ms: list[float] = []
    deadline = time.perf_counter() + seconds
    run_id = uuid.uuid4().hex[:8]

    async def client(number: int) -> None:
        rng = random.Random(number)
        i = 0
        while time.perf_counter() < deadline:
            source, target = rng.sample(accounts, 2)
            amount = rng.randint(1, 100)
            legs = [c.Leg(source, -amount - (3 if hot else 0), "RUB"), c.Leg(target, amount, "RUB")]
            if hot:
                legs.append(c.Leg(fees, 3, "RUB"))
            started = time.perf_counter()
            await parts.writer.submit(c.PostTransfer(f"{run_id}-{number}-{i}", tuple(legs), "p2p"))
            latencies_ms.append((time.perf_counter() - started) * 1000)
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    finished = time.perf_counter()
    await parts.projection.wait_for(parts.writer.last_position, timeout_s=120)
    latencies_ms.sort()
    return {
        "transfers": len(latencies_ms),
        "per_s": len(latencies_ms) / elapsed,
        "p50_ms": statistics.median(latencies_ms),
        "p99_ms": latencies_ms[min(len(latencies_ms) - 1, int(len(latencies_ms) * 0.99))],
        "history_lag_ms": (time.perf_counter() - finished) * 1000,
    }


def pgbench(url: str, clients: int, seconds: float) -> float:
    output = subprocess.run(
        [str(pg_binary("pgbench")), "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(int(seconds)),
         "-M", "prepared", "-n", url],
        check=True, capture_output=True, text=True,
    ).stdout
    match = re.search(r"tps = ([0-9.]+)", output)
    assert match, output
    return float(match.group(1))


async def main(seconds: float, account_count: int) -> dict:
    with EphemeralStack(prefix="kabinet-bench-") as stack:
        admin = await asyncpg.connect(stack.database_url)
        await admin.execute("DROP DATABASE IF EXISTS pgbench")
        await admin.execute("CREATE DATABASE pgbench")
        await admin.close()
        pgbench_url = stack.database_url.rsplit("/", 1)[0] + "/pgbench"
        with console.status(f"pgbench -i -s {PGBENCH_SCALE}…"):
            subprocess.run([str(pg_binary("pgbench")), "-i", "-q", "-s", str(PGBENCH_SCALE), pgbench_url],
                           check=True, capture_output=True)

        settings = stack.service_settings("ledger_bench")
        service, parts = build(settings)
        results: dict = {}
        async with service.running():
            with console.status(f"opening and funding {account_count} accounts…"):
                accounts, _, fees = await setup_accounts(parts, account_count)
            await run_ledger_load(parts, accounts, fees, 8, 1.0, hot=False)  # warm-up
            for clients in CLIENT_COUNTS:
                await checkpoint(stack.database_url)
                with console.status(f"pgbench, {clients} clients…"):
                    tps = pgbench(pgbench_url, clients, seconds)
                row = {"pgbench_tps": tps}
                for hot in (False, True):
                    await checkpoint(stack.database_url)
                    with console.status("letting the server's statistics settle…"):
                        flushes_before = await wal_flushes(stack.database_url)
                    with console.status(f"ledger, {clients} clients, {'hot fee account' if hot else 'uniform'}…"):
                        load = await run_ledger_load(parts, accounts, fees, clients, seconds, hot)
                    with console.status("letting the server's statistics settle…"):
                        flushes_after = await wal_flushes(stack.database_url)
                    load["wal_flushes_per_transfer"] = (flushes_after - flushes_before) / max(1, load["transfers"])
                    row["hot" if hot else "uniform"] = load
                results[clients] = row
            batches, commands_total = parts.writer.batches_total, parts.writer.commands_total
    rows = []
    for clients, row in results.items():
        uniform, hot = row["uniform"], row["hot"]
        rows.append((str(clients), f"{row['pgbench_tps']:.0f}", f"{uniform['per_s']:.0f}",
                     f"{uniform['per_s'] / row['pgbench_tps']:.2f}", f"{hot['per_s']:.0f}",
                     f"{hot['per_s'] / uniform['per_s']:.2f}", f"{uniform['p50_ms']:.1f}/{hot['p50_ms']:.1f}",
                     f"{uniform['p99_ms']:.1f}/{hot['p99_ms']:.1f}",
                     f"{uniform['wal_flushes_per_transfer']:.3f}/{hot['wal_flushes_per_transfer']:.3f}"))
    print_table("ledger vs pgbench TPC-B (same PostgreSQL, synchronous_commit on; uniform/hot)",
                ("clients", "pgbench tps", "uniform /s", "ratio", "hot /s", "hot÷uniform", "p50 ms", "p99 ms",
                 "WAL flush/transfer"), rows)
    print(f"writer: {commands_total} commands in {batches} batches ({commands_total / max(1, batches):.1f} per batch)")
    top = results[32]
    return {
        "ratio_32": round(top["uniform"]["per_s"] / top["pgbench_tps"], 3),
        "hot_ratio_32": round(top["hot"]["per_s"] / top["uniform"]["per_s"], 3),  # the goal's hot ÷ uniform
        "hot_pgbench_ratio_32": round(top["hot"]["per_s"] / top["pgbench_tps"], 3),
        "transfers_per_s_32": round(top["uniform"]["per_s"], 1),
        "hot_transfers_per_s_32": round(top["hot"]["per_s"], 1),
        "pgbench_tps_32": round(top["pgbench_tps"], 1),
        "p50_ms_32": round(top["uniform"]["p50_ms"], 2),
        "p99_ms_32": round(top["uniform"]["p99_ms"], 2),
        "wal_flushes_per_transfer_32": round(top["uniform"]["wal_flushes_per_transfer"], 4),
        "by_clients": {
            str(k): {"pgbench_tps": round(v["pgbench_tps"], 1), "uniform_per_s": round(v["uniform"]["per_s"], 1),
                     "hot_per_s": round(v["hot"]["per_s"], 1), "ratio": round(v["uniform"]["per_s"] / v["pgbench_tps"], 3)}
            for k, v in results.items()
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--accounts", type=int, default=10_000)
    arguments = parser.parse_args()
    emit_json(asyncio.run(main(arguments.seconds, arguments.accounts)))
