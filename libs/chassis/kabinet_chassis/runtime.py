"""How a service process runs Python itself.

The young-generation threshold of the garbage collector: CPython's default (700
container objects) suits programs whose objects die one at a time. Our consumers and
relays hold batches of up to 500 events, about five tracked objects each, for the
length of a database round trip; at 700 several young collections run inside every
batch, each promotes the batch's live objects a generation, and enough of them reach
the old generation to set off full collections of the whole heap (about 50 ms each
in a service process). A young generation a few batches large lets a batch die young.
"""

from __future__ import annotations

import gc


def tune_garbage_collector(young_threshold: int) -> None:
    """Process-wide: the older generations keep CPython's own thresholds."""
    _, middle_threshold, old_threshold = gc.get_threshold()
    gc.set_threshold(young_threshold, middle_threshold, old_threshold)
