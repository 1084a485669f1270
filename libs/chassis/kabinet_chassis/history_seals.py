"""The event history is tamper-evident: a hash chain, sealed in signed checkpoints
(ARCHITECTURE.md §6).

The append-only guards (append_only.py) stop a change made by mistake, but a table's
owner can switch them off. What such a forger cannot do without the seal key, an Ed25519
private key that never enters the database, is make the history agree with its seals again:

- every event, in log order, extends a chain: link = SHA-256(previous link ‖ the event's
  position, stream id, version, type and stored bytes), the first link's previous being
  32 zero bytes;
- a sealer (`Sealer`, one pass at a time per table: `seal_new_events`) appends a seal
  every SEAL_INTERVAL_S for the events committed since the last one: their range, how
  many, the chain's link after the last of them, when it was made, and a signature of
  all that (and of the events table's name) by the seal key, named by its key id. The
  seals table is append-only too.

Anyone can recompute a chain, so the signatures are what a forger cannot redo. They are
checked with public keys only: an auditor is given those, and can check without being
able to sign. A key is rotated by signing with a new one and keeping the old one's public
key among those a check holds (`verification_keys_for`).

An auditor's check (`check_seals`) recomputes each seal's range from the link the seal
before it stored, so each range is judged on its own: an event changed, deleted (the
newest sealed one included: the last seal names its position) or slipped in between
sealed ones shows as the seal whose range it is in. What a seal cannot cover is what is
not sealed yet: the events of the last SEAL_INTERVAL_S, reported as unsealed, and a seal
deleted from the end together with its events (an auditor who notes the last seal's
receipt a check showed, `Seal.receipt`, and gives it to the next check notices that one).
A seal deleted from the end with its events rewritten is not sealed again by a running
sealer: it remembers its newest seal (`LastSeal`) and stops.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kabinet_chassis import append_only
from kabinet_chassis.databases import apply_schema
from kabinet_chassis.dev_keys import dev_key_file, dev_key_path
from kabinet_chassis.ed25519_keys import load_private_key, load_public_keys, new_private_pem
from kabinet_chassis.settings import ServiceSettings

log = logging.getLogger(__name__)

SEALS_TABLE = "history_seals"
SEAL_INTERVAL_S = 2.0
SEAL_STALL_MAX_S = 60.0  # without a finished pass, the sealer's health check is down
LAST_PASS_WAIT_S = 10.0  # the most a clean stop waits for its last sealing pass
SEAL_EVENTS_MAX = 10_000  # events in one seal: one round's memory and transaction
# And bytes: an event may carry ~70 KB (a transfer's metadata, 64 legs), so 10,000 of them
# after a backlog would be ~700 MB read at once into the ledger's process, the bank's only writer.
SEAL_BYTES_MAX = 32 * 2**20
SEAL_ROUNDS_MAX = 20  # seals one pass makes at most, catching up after the sealer was away
CHECK_PAGE_SIZE = 5_000  # events (and seals) an auditor's check reads at a time
CHECK_PAGES_MAX = 1_000_000  # 5 billion events: a limit, not an expectation
PUBLIC_KEYS_MAX = 8  # the keys of past rotations a check holds
SEAL_PUBLIC_KEYS_WHAT = "to check the history's seals with"
GENESIS_LINK = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RECEIPT_HEX_CHARS = 32  # 128 bits of a seal's link: what a receipt shows of it
PROBLEMS_KEPT = 10  # problems the check keeps to show; it counts them all

_DEV_KEY_FILE = "dev-history-seal-ed25519-DO-NOT-USE-IN-PRODUCTION.pem"
# A seal's signature can be taken for no other message. v2: the table and the time signed too.
_SIGNED_LABEL = b"kabinet history seal v2\x00"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {SEALS_TABLE} (
    events_table text NOT NULL,
    seal_no bigint NOT NULL,
    first_position bigint NOT NULL,
    last_position bigint NOT NULL,
    events_count integer NOT NULL,
    chain_link bytea NOT NULL,
    key_id text NOT NULL,
    sealed_at timestamptz NOT NULL,
    signature bytea NOT NULL,
    PRIMARY KEY (events_table, seal_no)
);
-- A seals table made before seals were signed: its seals are reported as unsigned.
ALTER TABLE {SEALS_TABLE} ADD COLUMN IF NOT EXISTS signature bytea
"""

_EVENT_COLUMNS = "notification_id, originator_id, originator_version, topic, state"


def seal_key_for(settings: ServiceSettings) -> Ed25519PrivateKey:
    """The key a service signs its seals with: from its settings, or the development key
    generated at first run under data_dir/keys (never committed)."""
    if settings.history_seal_key:
        return load_private_key(settings.history_seal_key, "the history seal key")
    return load_private_key(dev_key_file(settings.data_dir, _DEV_KEY_FILE, new_private_pem), "the development seal key")


def verification_keys_for(settings: ServiceSettings) -> dict[str, Ed25519PublicKey]:
    """Every key a seal of the service may have been signed with, by key id: those of
    KABINET_HISTORY_SEAL_PUBLIC_KEYS (an auditor's, or the keys a rotation replaced: seals
    signed before it are still checked), and the public key of the seal key, if there is one
    (the development key of the data dir when no key is given at all and it has one). An
    auditor given public keys alone checks with those: no private key is read. A check is
    never the one to make a key: it would be a private key on an auditor's disk, and would
    check no seal anyway."""
    public_keys = list(load_public_keys(settings.history_seal_public_keys, SEAL_PUBLIC_KEYS_WHAT, PUBLIC_KEYS_MAX)
                       if settings.history_seal_public_keys else ())
    has_dev_key = dev_key_path(settings.data_dir, _DEV_KEY_FILE).exists()
    if settings.history_seal_key or (not public_keys and has_dev_key):
        public_keys.append(seal_key_for(settings).public_key())
    return {key_id(key): key for key in public_keys}


def key_id(public_key: Ed25519PublicKey) -> str:
    """Names a key: which key signed a seal."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def extend_chain(link: bytes, events: Iterable[Sequence[Any]]) -> bytes:
    """The chain's link after `events` (rows of _EVENT_COLUMNS, in log order), from `link`."""
    for position, stream_id, version, event_type, state in events:
        topic = event_type.encode()
        link = hashlib.sha256(b"".join((link, struct.pack(">qq", position, version), UUID(str(stream_id)).bytes,
                                         struct.pack(">I", len(topic)), topic, bytes(state)))).digest()
    return link


def signed_part(events_table: str, seal_no: int, first_position: int, last_position: int, events_count: int,
                chain_link: bytes, sealed_at: datetime) -> bytes:
    """What a seal's signature covers: the history it seals, its number, its range, its
    count, its link, and when it was made (the bank's word that the history up to it was
    this by then: an auditor's evidence of what was known when)."""
    table = events_table.encode()
    sealed_at_us = (sealed_at - _EPOCH) // timedelta(microseconds=1)
    return b"".join((_SIGNED_LABEL, struct.pack(">I", len(table)), table,
                     struct.pack(">qqqqq", seal_no, first_position, last_position, events_count, sealed_at_us),
                     chain_link))


async def ensure_schema(pool: asyncpg.Pool) -> None:
    await apply_schema(pool, SEALS_TABLE, SCHEMA)
    await append_only.guard(pool, SEALS_TABLE)


class SealsRewritten(Exception):
    """The seals table no longer holds, as it was, the seal a sealer made or started from."""


@dataclass
class LastSeal:
    """The newest seal a sealer made, or found when it started: the table must still hold
    it, with this link, at its next pass. A forger who deleted the newest seals and then
    rewrote the events they covered would otherwise have the ledger's own sealer sign the
    forgery as new history."""

    seal_no: int = 0  # 0: none known yet (the sealer's first pass trusts the table's newest)
    chain_link: bytes = GENESIS_LINK


async def seal_new_events(pool: asyncpg.Pool, events_table: str, key: Ed25519PrivateKey,
                          last_seal: LastSeal | None = None) -> int:
    """Seal the events committed since the last seal, up to SEAL_ROUNDS_MAX seals of
    SEAL_EVENTS_MAX or SEAL_BYTES_MAX; the number sealed. Another process sealing the same table at the
    moment makes this one wait, then seal what is left. Events become visible in log
    order (the recorder locks its table to insert), so a seal never passes over one that
    commits later. The hashing runs in a worker thread: the loop keeps serving meanwhile.

    With `last_seal` (a sealer's memory, kept up to date here), nothing is sealed, and
    SealsRewritten raised, unless the table still holds that seal as it was."""
    sealed = 0
    for _ in range(SEAL_ROUNDS_MAX):
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{SEALS_TABLE}:{events_table}")
            if last_seal is not None and last_seal.seal_no:
                kept_link = await connection.fetchval(
                    f"SELECT chain_link FROM {SEALS_TABLE} WHERE events_table = $1 AND seal_no = $2",
                    events_table, last_seal.seal_no)
                if kept_link != last_seal.chain_link:
                    raise SealsRewritten(
                        f"seal {last_seal.seal_no} of {events_table}, which this sealer made or started from, is"
                        f" {'gone' if kept_link is None else 'changed'}: the seals were deleted or rewritten. Sealing"
                        " stops (it would sign the history that now follows as it stands); an auditor's verify shows"
                        " what changed")
            last = await connection.fetchrow(
                f"SELECT seal_no, last_position, chain_link FROM {SEALS_TABLE} WHERE events_table = $1"
                " ORDER BY seal_no DESC LIMIT 1", events_table)
            seal_no, after, link = (last["seal_no"], last["last_position"], last["chain_link"]) if last else (
                0, 0, GENESIS_LINK)
            if last_seal is not None:
                last_seal.seal_no, last_seal.chain_link = seal_no, link
            # The events after it, while those before each are within SEAL_BYTES_MAX (one at least).
            rows = await connection.fetch(
                f"SELECT {_EVENT_COLUMNS}, bytes_through FROM (SELECT {_EVENT_COLUMNS},"
                "  sum(octet_length(state)) OVER (ORDER BY notification_id) AS bytes_through"
                f"  FROM {events_table} WHERE notification_id > $1 ORDER BY notification_id LIMIT $2) e"
                " WHERE bytes_through - octet_length(state) < $3 ORDER BY notification_id",
                after, SEAL_EVENTS_MAX, SEAL_BYTES_MAX)
            if not rows:
                return sealed
            events = [tuple(row)[:-1] for row in rows]  # as _EVENT_COLUMNS
            # PostgreSQL keeps microseconds, as Python does: the time read back is the time signed.
            seal = (events_table, seal_no + 1, rows[0]["notification_id"], rows[-1]["notification_id"],
                    len(events), await asyncio.to_thread(extend_chain, link, events), datetime.now(UTC))
            await connection.execute(
                f"INSERT INTO {SEALS_TABLE} (events_table, seal_no, first_position, last_position, events_count,"
                " chain_link, sealed_at, key_id, signature) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                *seal, key_id(key.public_key()), key.sign(signed_part(*seal)))
        if last_seal is not None:  # committed
            last_seal.seal_no, last_seal.chain_link = seal[1], seal[5]
        sealed += len(events)
        if len(events) < SEAL_EVENTS_MAX and rows[-1]["bytes_through"] < SEAL_BYTES_MAX:  # none left
            return sealed
    return sealed


class SealingStuck(Exception):
    """No sealing pass has finished for a while: new events stay unsealed meanwhile."""


class Sealer:
    """A service's sealer: every SEAL_INTERVAL_S, the events committed since (`run`). A
    database that fails is tried again at the next interval. Its health (`check`, watched in
    /health/ready) is down once no pass has finished for `stall_max_s`: an operator sees
    sealing stuck before an auditor finds the events unsealed. It remembers the newest seal
    it made (`LastSeal`): should that seal be deleted or changed, it seals nothing more and
    is down at once, until an operator has looked (a restart starts from the table again)."""

    def __init__(self, pool: asyncpg.Pool, events_table: str, key: Ed25519PrivateKey, stall_max_s: float = SEAL_STALL_MAX_S
                 ) -> None:
        self.pool, self.events_table, self.key, self.stall_max_s = pool, events_table, key, stall_max_s
        self.last_pass_at = time.monotonic()
        self.sealed_total = 0  # since this process started
        self.last_error: str | None = None
        self.last_seal = LastSeal()
        self.seals_rewritten: str | None = None  # why sealing stopped for good, if it did

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SEAL_INTERVAL_S)
            try:
                await self._pass()
            except SealsRewritten as rewritten:
                if self.seals_rewritten is None:
                    log.critical("%s", rewritten)
                self.seals_rewritten = str(rewritten)
                continue
            except Exception as error:
                if self.last_error is None:  # once per outage, not every interval
                    log.exception("sealing the history of %s failed; trying again every %.0f s", self.events_table,
                                  SEAL_INTERVAL_S)
                self.last_error = repr(error)
                continue
            if self.last_error is not None:
                log.info("sealing the history of %s works again", self.events_table)
            self.last_error, self.last_pass_at = None, time.monotonic()

    async def last_pass(self) -> None:
        """On a clean stop, after the writer stopped: the events committed since the last
        pass, so that a ledger stopped leaves none of its history unsealed. A database that
        fails or hangs is logged, not raised: the next process seals them at its first pass."""
        try:
            async with asyncio.timeout(LAST_PASS_WAIT_S):
                await self._pass()
        except Exception:
            log.exception("the last sealing pass of %s failed; the next start seals what is left", self.events_table)

    async def _pass(self) -> None:
        self.sealed_total += await seal_new_events(self.pool, self.events_table, self.key, self.last_seal)

    async def check(self) -> str:
        if self.seals_rewritten is not None:
            raise SealsRewritten(self.seals_rewritten)
        idle_s = time.monotonic() - self.last_pass_at
        if idle_s > self.stall_max_s:
            raise SealingStuck(f"the history of {self.events_table} has not been sealed for {idle_s:.0f} s (a pass is"
                               f" due every {SEAL_INTERVAL_S:.0f} s); last error: {self.last_error or 'none (hung?)'}")
        return f"sealed {self.sealed_total} events since this process started, a pass every {SEAL_INTERVAL_S:.0f} s"


@dataclass(frozen=True)
class Seal:
    seal_no: int
    first_position: int
    last_position: int
    events_count: int
    chain_link: bytes
    key_id: str
    sealed_at: datetime
    signature: bytes | None  # None: made before seals were signed

    @property
    def receipt(self) -> str:
        """What an auditor notes down and gives a later check (`check_seals(noted=…)`): this
        seal must still be there, with this link, and so every event up to it."""
        return f"{self.seal_no}:{self.chain_link.hex()[:RECEIPT_HEX_CHARS]}"


@dataclass
class SealCheck:
    """What the seals say about the history, as an auditor's check reads it."""

    problems: list[str]
    problems_count: int
    seals: int
    last_seal: Seal | None
    events_sealed: int
    events_unsealed: int  # committed after the last seal


def parse_receipt(receipt: str) -> tuple[int, str]:
    """A seal's receipt as `Seal.receipt` shows it: "<seal number>:<hex of its link>"."""
    number, _, link_hex = receipt.partition(":")
    if not (number.isdigit() and int(number) >= 1 and len(link_hex) >= 8
            and all(char in "0123456789abcdef" for char in link_hex.lower())):
        raise ValueError(f"a seal receipt looks like '12:0a1b2c3d…' (a seal's number, a colon, the hex a verify"
                         f" showed), not {receipt!r}")
    return int(number), link_hex.lower()


async def check_seals(connection: asyncpg.Connection, events_table: str, keys: dict[str, Ed25519PublicKey],
                      noted: tuple[int, str] | None = None,
                      on_progress: Callable[[int], None] | None = None) -> SealCheck:
    """Recompute every seal's range of events from the link of the seal before it, and find
    the seal an auditor `noted` (parse_receipt) still there with its link: seals cut from the
    end with their events look like a younger history otherwise. Call it in a
    repeatable-read transaction: events and seals are then read in one snapshot.
    `on_progress(position)` is told after each seal the position its range ends at."""
    problems: list[str] = []
    count = 0

    def problem(text: str) -> None:
        nonlocal count
        count += 1
        if len(problems) < PROBLEMS_KEPT:
            problems.append(text)

    if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", SEALS_TABLE):
        problem(f"{events_table} has no seals table: its history is not sealed (a ledger process creates it and"
                " seals the history when it starts)")
        return SealCheck(problems, count, 0, None, 0, 0)
    events = await connection.cursor(f"SELECT {_EVENT_COLUMNS} FROM {events_table} ORDER BY notification_id")
    pending: list[asyncpg.Record] = []  # events read past the seal being checked
    link, after, last_no, seals, sealed = GENESIS_LINK, 0, 0, 0, 0
    last_seal: Seal | None = None
    async for row in connection.cursor(
            f"SELECT seal_no, first_position, last_position, events_count, chain_link, key_id, sealed_at, signature"
            f" FROM {SEALS_TABLE} WHERE events_table = $1 ORDER BY seal_no", events_table, prefetch=CHECK_PAGE_SIZE):
        seal = Seal(**dict(row))
        seals += 1
        if seal.seal_no != last_no + 1:
            problem(f"seals {last_no + 1}..{seal.seal_no - 1} are missing (deleted): nothing the seals table holds"
                    " may go")
        in_range, pending = await _events_up_to(events, pending, seal.last_position)
        if extend_chain(link, in_range) != seal.chain_link:
            problem(f"seal {seal.seal_no}: the events at positions {after + 1}..{seal.last_position} are not those"
                    f" sealed at {seal.sealed_at.isoformat()} ({len(in_range)} now, {seal.events_count} then): one"
                    " was changed, deleted or slipped in since")
        signature_problem = _signature_problem(events_table, seal, keys)
        if signature_problem is not None:
            problem(signature_problem)
        if noted is not None and seal.seal_no == noted[0] and not seal.chain_link.hex().startswith(noted[1]):
            problem(f"seal {seal.seal_no} is not the one noted ({noted[0]}:{noted[1]}): the seals were rewritten")
        sealed += len(in_range)
        link, after, last_no, last_seal = seal.chain_link, seal.last_position, seal.seal_no, seal  # each range on its own
        if on_progress is not None:
            on_progress(seal.last_position)
    if noted is not None and noted[0] > last_no:
        problem(f"seal {noted[0]}, noted by an earlier check, is gone: the newest is {last_no}; seals and their events"
                " were cut from the end")
    unsealed = len(pending)
    for _ in range(CHECK_PAGES_MAX):  # the events after the last seal
        page = await events.fetch(CHECK_PAGE_SIZE)
        if not page:
            break
        unsealed += len(page)
    return SealCheck(problems, count, seals, last_seal, sealed, unsealed)


def _signature_problem(events_table: str, seal: Seal, keys: dict[str, Ed25519PublicKey]) -> str | None:
    """What is wrong with a seal's signature, if anything: without a good one, the seal
    (its link, its range, its time) may have been made by anyone who recomputed the chain."""
    key = keys.get(seal.key_id)
    if seal.signature is None:
        return f"seal {seal.seal_no} is not signed (made before seals were): its link may have been recomputed by anyone"
    if key is None:
        return (f"seal {seal.seal_no} was signed with key {seal.key_id}, which this check does not hold (it holds"
                f" {', '.join(keys) or 'none: set KABINET_HISTORY_SEAL_PUBLIC_KEYS'}): its signature is not checked")
    try:
        key.verify(seal.signature, signed_part(events_table, seal.seal_no, seal.first_position, seal.last_position,
                                               seal.events_count, seal.chain_link, seal.sealed_at))
    except InvalidSignature:
        return (f"seal {seal.seal_no}'s signature is not key {seal.key_id}'s: the seal was made or changed without"
                " the seal key")
    return None


async def _events_up_to(events: Any, pending: list[asyncpg.Record], position: int
                        ) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    """The events up to `position` (those read before first), and those read past it."""
    taken = [row for row in pending if row["notification_id"] <= position]
    pending = [row for row in pending if row["notification_id"] > position]
    for _ in range(CHECK_PAGES_MAX):
        if pending:
            break
        page = await events.fetch(CHECK_PAGE_SIZE)
        if not page:
            break
        taken.extend(row for row in page if row["notification_id"] <= position)
        pending = [row for row in page if row["notification_id"] > position]
    return taken, pending
