"""The ledger service, for fault tests, as a process that dies (SIGKILL, by its own hand)
right after committing a batch holding a marked command: between the commit and the answer,
the window a crash hurts most. Run by uvicorn: `--factory tests.faults.ledger_dies_after_commit:create_app`.

KABINET_TEST_DIE_AFTER_COMMITTING: text in a stored event (a client id, an owner) that marks the command.
"""

from __future__ import annotations

import os
import signal

from ledger import service, writer

DIE_AFTER_COMMITTING = "KABINET_TEST_DIE_AFTER_COMMITTING"


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
    return service.create_app()
