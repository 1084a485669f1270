"""Reading other processes in tests (psutil)."""

from __future__ import annotations

import psutil


def command_line(process: psutil.Process) -> str:
    """A process's command line; "" for one gone a moment ago, a zombie without one (a
    PostgreSQL backend whose client just left: ZombieProcess is a NoSuchProcess)."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""
