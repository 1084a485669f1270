"""Reading domain events as the event store gives them back."""

from __future__ import annotations

from typing import Any


def stored_later(event: Any, field: str) -> Any:
    """A field added to a domain event after events of its kind were stored (the customer
    of an account's or a hold's later events, a hold's currency, a transfer's legs'
    customers, a freeze's reason): None on those. The event store rebuilds an event from its
    stored fields without calling its class (eventsourcing's Mapper.to_domain_event), so an
    event stored before has no such attribute at all; the default on the method's parameter
    only serves its replay."""
    return event.__dict__.get(field)
