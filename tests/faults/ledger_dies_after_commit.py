"""The ledger service, for fault tests, as a process that dies (SIGKILL, by its own hand)
right after committing a batch holding a marked command: between the commit and the answer,
the window a crash hurts most. Run by uvicorn: `--factory tests.faults.ledger_dies_after_commit:create_app`.

KABINET_TEST_DIE_AFTER_COMMITTING: text in a stored event (a client id, an owner) that marks the command.
KABINET_TEST_CLAIM_LEASE_S: a shorter lease of an Idempotency-Key claim (kabinet_chassis.idempotency),
so that a test need not wait out the real one.
"""

from __future__ import annotations

import os
import signal

from kabinet_chassis import idempotency
from ledger import service, writer

DIE_AFTER_COMMITTING = "KABINET_TEST_DIE_AFTER_COMMITTING"
CLAIM_LEASE_S = "KABINET_TEST_CLAIM_LEASE_S"


def create_app():
    marker = os.environ.get(DIE_AFTER_COMMITTING)
    if marker:
        append_batch = writer.append_batch

        async def append_then_die(connection, stored_events, *args, **kwargs):
            notification_ids = await append_batch(connection, stored_events, *args, **kwargs)
            if any(marker.encode() in event.state for event in stored_events):
                os.kill(os.getpid(), signal.SIGKILL)  # committed; nobody is answered
            return notification_ids

        writer.append_batch = append_then_die
    if os.environ.get(CLAIM_LEASE_S):
        idempotency.CLAIM_LEASE_S = float(os.environ[CLAIM_LEASE_S])
    return service.create_app()
