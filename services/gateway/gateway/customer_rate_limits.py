"""How many requests one customer may make through the gateway: a runaway app (a retry loop,
a script paging statements without end) is answered 429 before it reaches the ledger, and
every other customer is served as before.

Counted per customer (the token's subject), in this gateway process: N replicas let a
customer N times as much. The limits guard the bank's services from one client; they are
not a quota to bill by.

Each limit is a generic cell rate (GCRA): one time a customer and limit, the "theoretical
arrival time" of their next request, which a request moves on by the limit's interval
(a minute ÷ the requests a minute). So a customer may send a limit's whole allowance at
once, and then one request per interval; the wait to tell a refused one is exact. The
`limits` library was tried first: its in-process storage sweeps every key after each
request, on the event loop (O(customers) a request), and its other storages need Redis.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from kabinet_chassis.errors import Problem

# Customers tracked at once, the least recently seen forgotten first: one who is forgotten
# starts again with a full allowance, and a customer sending many requests is never the one.
CUSTOMERS_TRACKED_MAX = 100_000
EARLY_TOLERANCE_S = 1e-6  # the intervals are floats (1/3 s): their rounding must not refuse the last request of a burst


class CustomerRateLimits:
    def __init__(self, per_second: int, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        # The burst an app's screen makes (accounts, balances, history at once), and what a
        # person could keep up: each bounded on its own. (period s, interval s, said as)
        self.limits = ((1.0, 1.0 / per_second, f"{per_second} requests a second"),
                       (60.0, 60.0 / per_minute, f"{per_minute} requests a minute"))
        self.clock = clock
        self.next_due: OrderedDict[str, list[float]] = OrderedDict()  # customer: a time for each limit

    def admit(self, customer_id: str) -> None:
        """Count one request of `customer_id`, or raise 429 saying which limit and when to retry.
        A refused request is not counted: a client that waits as told gets through."""
        now = self.clock()
        due = self.next_due.get(customer_id)
        if due is None:
            due = self.next_due[customer_id] = [now] * len(self.limits)
            if len(self.next_due) > CUSTOMERS_TRACKED_MAX:
                self.next_due.popitem(last=False)
        else:
            self.next_due.move_to_end(customer_id)
        for (period_s, interval_s, said_as), next_due in zip(self.limits, due, strict=True):
            early_s = next_due - now - (period_s - interval_s)  # how much sooner than the limit allows
            if early_s > EARLY_TOLERANCE_S:
                retry_after_s = max(1, math.ceil(early_s))
                raise Problem(429, "too_many_requests", f"more than {said_as} from one customer; retry in"
                              f" {retry_after_s} s", headers={"Retry-After": str(retry_after_s)})
        for index, (_, interval_s, _) in enumerate(self.limits):
            due[index] = max(due[index], now) + interval_s
