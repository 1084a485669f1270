"""Money: an integer number of minor units plus an ISO 4217 currency code.

Pure Python (no I/O, no pydantic) so that every domain layer may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")


class CurrencyMismatch(ValueError):
    """Arithmetic or comparison between amounts of different currencies."""


@dataclass(frozen=True, slots=True)
class Money:
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        # bool is an int subclass; a float must never sneak in as money.
        if type(self.amount_minor) is not int:
            raise TypeError(f"amount_minor must be int, got {type(self.amount_minor).__name__}")
        if not _CURRENCY_CODE.match(self.currency):
            raise ValueError(f"currency must be an ISO 4217 code like 'RUB', got {self.currency!r}")

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(f"{self.currency} and {other.currency} cannot be mixed")

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount_minor, self.currency)

    def __lt__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor < other.amount_minor

    def __le__(self, other: Money) -> bool:
        self._same_currency(other)
        return self.amount_minor <= other.amount_minor

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    def is_zero(self) -> bool:
        return self.amount_minor == 0
