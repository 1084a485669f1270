"""Helpers shared by the benches: names, polling, the result table and JSON line.

A bench prints its human-readable output (progress on stderr, a table on stdout) and,
as the very last line of stdout, one JSON object with its figures.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

# Progress goes to stderr so that stdout holds only the table and the JSON line.
console = Console(stderr=True)


def unique(prefix: str) -> str:
    """A name no earlier run used: every measurement gets its own database, topic and group."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 120.0, interval_s: float = 0.01) -> None:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)  # the full table even when stdout is not a terminal


def emit_json(result: dict) -> None:
    """The bench's last line of output: one JSON object."""
    print(json.dumps(result), flush=True)
