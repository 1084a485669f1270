"""An account's money: the sum of its transfer legs and of its live holds."""

from __future__ import annotations

from dataclasses import dataclass


def available_minor(posted_minor: int, held_minor: int, credit_limit_minor: int) -> int:
    """What an account may still spend: settled money less what holds reserve, plus its credit
    limit (the rule the writer refuses a debit by, and the balance customers are shown)."""
    return posted_minor - held_minor + credit_limit_minor


@dataclass(frozen=True, slots=True)
class Balance:
    """posted: settled money; held: reserved by live holds; incoming held: reserved by live
    holds elsewhere to be paid in here; all in the account's minor units.

    Not an event of its own: it is what the account's legs (in `Transfer.Posted`) and
    reservations (in `Hold` events) add up to. The writer saves it in the same
    transaction as the events that change it (the inline balance projection), and
    `version` counts those saves, so a second writer with a stale balance is refused
    instead of overwriting it.
    """

    posted_minor: int = 0
    held_minor: int = 0
    version: int = 0  # 0: not saved yet (an account opened in this batch)
    # What live holds on other accounts will pay into this one: it cannot close under them.
    incoming_held_minor: int = 0

    def changed(self, posted_delta_minor: int, held_delta_minor: int, incoming_held_delta_minor: int = 0) -> Balance:
        """The balance to save next: the deltas applied, one version on."""
        return Balance(self.posted_minor + posted_delta_minor, self.held_minor + held_delta_minor, self.version + 1,
                       self.incoming_held_minor + incoming_held_delta_minor)
